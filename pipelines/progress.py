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


class Progress:
    """Progress of a loop driven by events (``update(done)`` as work completes, ``finish()`` at the end):
    a line at most every ``every_s`` seconds and one at the end, on a terminal only (see module doc)."""

    def __init__(self, label: str, total: int | None = None, unit: str = "items", every_s: float = 5.0,
                 stream=None):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.stream = stream or sys.stderr
        self.enabled = progress_enabled(self.stream)
        self.start = self.last = time.monotonic()
        self.done = 0

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        of = f"/{self.total}" if self.total is not None else ""
        rate = self.done / elapsed if elapsed else 0
        return f"[{self.label}] {self.done}{of} {self.unit} ({rate:.1f}/s, {elapsed:.1f} s)"

    def update(self, done: int) -> None:
        """``done`` items so far; prints when ``every_s`` has passed since the last line."""
        self.done = done
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every_s:
            print(self.line(), file=self.stream, flush=True)
            self.last = now

    def finish(self) -> None:
        if self.enabled:
            print(self.line(), file=self.stream, flush=True)


def progress(items: Iterable[T], label: str, total: int | None = None, unit: str = "items",
             every_s: float = 5.0, stream=None) -> Iterator[T]:
    """Yield ``items`` unchanged, printing a progress line at most every ``every_s`` seconds and at the end."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    bar = Progress(label, total, unit, every_s, stream)
    if not bar.enabled:
        yield from items
        return
    for item in items:
        yield item
        bar.update(bar.done + 1)
    bar.finish()
