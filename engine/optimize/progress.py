"""Progress of long steps on stderr, only when stderr is a terminal (a log or a pipe stays quiet)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from time import perf_counter_ns
from typing import TextIO

#: Redraws at most this often (a fast loop must not be slowed down by the terminal).
_REDRAW_NS = 100_000_000


class Progress:
    """Counts the items of one step at a time on one redrawn line: ``label  12/100  3.1 s``."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = enabled if enabled is not None else bool(isatty and isatty())

    def status(self, text: str) -> None:
        """One line about what happens next (terminal only)."""
        if self.enabled:
            print(text, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        """One line the user should read, terminal or not."""
        print(text, file=self.stream, flush=True)

    @contextmanager
    def step(self, label: str, total: int) -> Iterator[Tick]:
        """A step of ``total`` items; call the yielded tick once per item."""
        tick = Tick(self, label, total)
        try:
            yield tick
        finally:
            tick.finish()


class Tick:
    """The counter of one step."""

    def __init__(self, progress: Progress, label: str, total: int) -> None:
        self.progress, self.label, self.total = progress, label, total
        self.done = 0
        self.started = self.drawn = perf_counter_ns()

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = perf_counter_ns()
        if self.progress.enabled and now - self.drawn >= _REDRAW_NS:
            self.drawn = now
            self._draw(now, end="")

    def _draw(self, now: int, *, end: str) -> None:
        seconds = (now - self.started) / 1e9
        print(f"\r{self.label}  {self.done}/{self.total}  {seconds:.1f} s\x1b[K", end=end, file=self.progress.stream)
        self.progress.stream.flush()

    def finish(self) -> None:
        """End the step's line."""
        if self.progress.enabled:
            self._draw(perf_counter_ns(), end="\n")
