"""Time slicing and the data's shape, shared by the recsys steps.

The data step records the shape of the data it wrote (``dataset.json`` in the run folder:
user/item/category counts, the time cuts, where the data came from); later steps read it, so
the same steps run on generated data and on the user's own interactions (``input.path``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .config import RecsysConfig

DAY_S = 86_400
SHAPE_FILE = "dataset.json"


def slice_bounds(cfg: RecsysConfig) -> tuple[int, int, int]:
    """Timestamps (s) splitting generated data: retriever < t1 <= ranker < t2 <= test < end."""
    d = cfg.data
    t2 = (d.days - d.test_days) * DAY_S
    t1 = t2 - d.ranker_days * DAY_S
    return t1, t2, d.days * DAY_S


@dataclass(frozen=True)
class DataShape:
    """What the later steps need to know about the run's data. Ids are dense (0..n-1); ``ts`` are
    seconds since ``t0`` (epoch seconds of the first interaction; 0 for generated data)."""

    num_users: int
    num_items: int
    num_categories: int
    t1: int
    t2: int
    end: int
    source: str = "generated"
    t0: int = 0
    exclude_seen: bool = False

    @property
    def bounds(self) -> tuple[int, int, int]:
        return self.t1, self.t2, self.end

    @property
    def own_ids(self) -> bool:
        """Whether the users and items carry the user's own ids (``key`` columns of ``users``/``items``)."""
        return self.source != "generated"

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict) -> DataShape:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in value.items() if k in names})


def generated_shape(cfg: RecsysConfig) -> DataShape:
    d = cfg.data
    return DataShape(d.num_users, d.num_items, d.num_categories, *slice_bounds(cfg))


def data_shape(cfg: RecsysConfig, out: str) -> DataShape:
    """The shape recorded in run folder ``out`` (``dataset.json``); the generator's config for a run
    folder written before it was recorded."""
    from pipelines.io import exists, read_json

    uri = f"{out}/{SHAPE_FILE}"
    if exists(uri):
        return DataShape.from_dict(read_json(uri))
    return generated_shape(cfg)
