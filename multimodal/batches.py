"""Column batches shared by the decode stages: fill per-file rows, record failures as a
``reason`` ("" = good row), and tell good rows from rejected ones."""
from __future__ import annotations

import math
import time

import numpy as np

from pipelines.io import first_line


def fill_rows(out: dict, paths: list[str], work, errors: tuple, start: float, drop: str | None = None) -> dict:
    """Run ``work(i, path) -> {column: value}`` for each file into the preallocated columns of
    ``out``; an exception in ``errors`` becomes that row's ``reason``. Adds per-row
    ``decode_s`` and removes the ``drop`` column (a model input nobody consumes)."""
    for i, path in enumerate(paths):
        try:
            row = work(i, path)
        except errors as e:
            out["reason"][i] = first_line(e)
            continue
        for k, v in row.items():
            out[k][i] = v
    out["decode_s"] = np.full(len(paths), (time.perf_counter() - start) / max(len(paths), 1), np.float32)
    if drop:
        del out[drop]
    return out


def ok_mask(reasons) -> np.ndarray:
    """True where a row's ``reason`` is empty (the row is good)."""
    return np.array([not r or (isinstance(r, float) and math.isnan(r)) for r in reasons], bool)
