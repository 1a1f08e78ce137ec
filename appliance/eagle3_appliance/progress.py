"""Progress of long work: a bar on a terminal, plain log lines at a steady pace otherwise.

Loading a large target takes minutes and a long ``validate`` or benchmark run as long; without
a sign of life an operator cannot tell slow from stuck. :class:`Progress` counts steps of a
known total. On a terminal (``stream.isatty()``) it draws a tqdm bar; otherwise (a log file,
a Slurm job, a container) it writes one line when it starts, then one every ``interval_s``
seconds, then one when it ends, each with the count, the share of the total, the time spent
and, once known, the time left. Lines go to ``logger`` at INFO, or without one to ``stream``
(stderr: a benchmark's stdout stays its table and JSON)::

    with Progress("loading weights", total=291, unit="tensors", logger=logger) as progress:
        for item in work:
            ...
            progress.update()
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

__all__ = ["Progress", "track"]

T = TypeVar("T")

DEFAULT_INTERVAL_S = 10.0


class Progress:
    """Counts ``done`` of ``total``; reports as a bar or as log lines (see the module docstring)."""

    def __init__(
        self,
        what: str,
        total: int | None,
        *,
        unit: str = "steps",
        logger: logging.Logger | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        stream: IO[str] | None = None,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.unit, self.logger = what, total, unit, logger
        self.interval_s, self.clock = interval_s, clock
        self.done = 0
        self.started = clock()
        self._last_line = self.started
        self._closed = False
        self.stream = stream if stream is not None else sys.stderr
        use_bar = bar if bar is not None else _isatty(self.stream)
        self._bar: Any = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=what, unit=f" {unit}", file=self.stream, dynamic_ncols=True, leave=True)
        else:
            self._log()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = self.clock()
        if now - self._last_line >= self.interval_s:
            self._last_line = now
            self._log()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        else:
            self._log(final=True)

    def line(self, final: bool = False) -> str:
        """The text of a log line now (also what the tests read)."""
        elapsed = self.clock() - self.started
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        share = f" ({100 * self.done / self.total:.0f} %)" if self.total else ""
        text = f"{self.what}: {count} {self.unit}{share}, {elapsed:.1f} s elapsed"
        if final:
            return f"{text}, done" if self.total is None or self.done >= self.total else f"{text}, stopped"
        if self.total and 0 < self.done < self.total:
            left = elapsed / self.done * (self.total - self.done)
            text += f", about {left:.0f} s left"
        return text

    def write(self, text: str) -> None:
        """Print a line of the program's own output without breaking the bar (stdout)."""
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def _log(self, final: bool = False) -> None:
        if self.logger is not None:
            self.logger.info("%s", self.line(final))
        else:
            print(self.line(final), file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable[T], progress: Progress) -> Iterator[T]:
    """Yield from ``iterable``, counting each item once it has been handled; close at the end."""
    try:
        for item in iterable:
            yield item
            progress.update()
    finally:
        progress.close()


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False
