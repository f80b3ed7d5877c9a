"""Benchmark helpers: machine facts and a wall-clock timer (never time lazy calls)."""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager


def machine() -> dict:
    """Cores and GPU name (or None) of this machine, for every benchmark's JSON."""
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return {"cores": os.cpu_count(), "gpu": gpu}


@contextmanager
def timer():
    """``with timer() as t: ...`` then ``t()`` is the elapsed seconds."""
    start = time.perf_counter()
    end = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def emit(result: dict) -> None:
    """Print the benchmark's JSON as the last line, with ``machine`` added."""
    print(json.dumps({**result, "machine": machine()}), flush=True)
