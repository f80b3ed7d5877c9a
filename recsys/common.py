"""Time slicing shared by the recsys steps."""
from __future__ import annotations

from .config import RecsysConfig

DAY_S = 86_400


def slice_bounds(cfg: RecsysConfig) -> tuple[int, int, int]:
    """Timestamps (s) splitting the data: retriever < t1 <= ranker < t2 <= test < end."""
    d = cfg.data
    t2 = (d.days - d.test_days) * DAY_S
    t1 = t2 - d.ranker_days * DAY_S
    return t1, t2, d.days * DAY_S
