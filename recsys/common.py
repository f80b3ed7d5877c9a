"""Run-folder layout and cluster connection shared by the recsys steps."""
from __future__ import annotations

from pipelines.connect import connect

from .config import RecsysConfig

DAY_S = 86_400


def connect_for(cfg: RecsysConfig, address: str | None) -> None:
    """Attach to ``address`` (or RAY_ADDRESS / the job's cluster); else start a small local Ray."""
    connect(address, num_cpus=cfg.local_ray.cpus, object_store_memory=cfg.local_ray.object_store_mb << 20)


def slice_bounds(cfg: RecsysConfig) -> tuple[int, int, int]:
    """Timestamps (s) splitting the data: retriever < t1 <= ranker < t2 <= test < end."""
    d = cfg.data
    t2 = (d.days - d.test_days) * DAY_S
    t1 = t2 - d.ranker_days * DAY_S
    return t1, t2, d.days * DAY_S
