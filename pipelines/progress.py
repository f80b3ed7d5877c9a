"""Progress of long driver-side loops: one short line every few seconds on a terminal, nothing in logs.

``for episode in progress(episodes, "collect", total=n, unit="episodes"): ...`` prints
``[collect] 120/400 episodes (35/s, 3.4 s)`` at most every ``every_s`` seconds and once at the end,
only when stderr is a terminal (or ``ADBRAY_PROGRESS=1``); ``ADBRAY_PROGRESS=0`` silences it.
Ray Data pipelines keep Ray Data's own progress bars.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress_enabled(stream=None) -> bool:
    """Whether progress lines are shown: ``$ADBRAY_PROGRESS`` (1/0) or, unset, stderr is a terminal."""
    flag = os.environ.get("ADBRAY_PROGRESS")
    if flag in ("0", "1"):
        return flag == "1"
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def progress(items: Iterable[T], label: str, total: int | None = None, unit: str = "items",
             every_s: float = 5.0, stream=None) -> Iterator[T]:
    """Yield ``items`` unchanged, printing a progress line at most every ``every_s`` seconds and at the end."""
    stream = stream or sys.stderr
    if not progress_enabled(stream):
        yield from items
        return
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    start = last = time.monotonic()
    done = 0

    def line() -> str:
        elapsed = time.monotonic() - start
        of = f"/{total}" if total is not None else ""
        return f"[{label}] {done}{of} {unit} ({done / elapsed if elapsed else 0:.1f}/s, {elapsed:.1f} s)"

    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_s:
            print(line(), file=stream, flush=True)
            last = now
    print(line(), file=stream, flush=True)
