"""Throttled progress lines for long conversions: records done, rate, ETA, on stderr.

A conversion of COCO train runs for tens of minutes; one line every few seconds tells the user it
is alive and when it will end, without flooding a CI log.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """`3725.2` -> `"1:02:05"`; negative or unknown durations print as `"?"`.

    Args:
        seconds: a duration in seconds.

    Returns:
        `H:MM:SS`.
    """
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_bytes(n: float) -> str:
    """`1536` -> `"1.5 KiB"`.

    Args:
        n: a size in bytes.

    Returns:
        The size with a binary unit.
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable; keeps type checkers content


class Progress:
    """Prints `label: done/total (pct) rate ETA` at most once per `interval` seconds.

    Items finished by an earlier (resumed) run count as done but not towards the rate, so the
    ETA reflects the speed of this run.
    """

    def __init__(
        self,
        total: int,
        *,
        label: str,
        unit: str = "images",
        initial: int = 0,
        interval: float = 2.0,
        stream: TextIO | None = None,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        total: number of items the whole job has.
        label: prefix of every line, e.g. `"convert coco"`.
        unit: what an item is called in the line.
        initial: items already done before this run started.
        interval: minimum seconds between two lines.
        stream: where lines go (default: `sys.stderr` at print time, so pytest's capture works).
        enabled: False prints nothing (library use, quiet runs).
        clock: monotonic time source, injectable for tests.
        """
        self.total = total
        self.label = label
        self.unit = unit
        self.initial = initial
        self.interval = interval
        self.stream = stream
        self.enabled = enabled
        self.clock = clock
        self.start = clock()
        self.last_print = self.start
        self.done = 0  # items done by this run

    def update(self, done: int, *, force: bool = False) -> None:
        """Record that this run has finished `done` items; print if the interval has passed.

        Args:
            done: items finished by this run so far (absolute, not an increment).
            force: print even if the last line is younger than `interval`.
        """
        self.done = done
        now = self.clock()
        if not self.enabled or (not force and now - self.last_print < self.interval):
            return
        self.last_print = now
        print(self.line(now), file=self.stream or sys.stderr, flush=True)

    def line(self, now: float | None = None) -> str:
        """The current progress line (without printing it).

        Returns:
            e.g. `"convert coco: 1200/5000 images (24.0%), 85.3 images/s, ETA 0:00:44"`.
        """
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        finished = self.initial + self.done
        pct = 100.0 * finished / self.total if self.total else 100.0
        eta = (self.total - finished) / rate if rate > 0 else float("inf")
        return (
            f"{self.label}: {finished}/{self.total} {self.unit} ({pct:.1f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {format_duration(eta)}"
        )

    def elapsed(self) -> float:
        """Seconds since this run started."""
        return self.clock() - self.start
