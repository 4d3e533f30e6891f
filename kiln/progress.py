"""The one progress display: rich bars on a terminal, periodic log lines elsewhere (CI, workers)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from kiln.log import get_logger

T = TypeVar("T")
log = get_logger("kiln.progress")


def _interactive() -> bool:
    return sys.stderr.isatty()


class Counter:
    """A live status line: a main count (with optional total) plus named side counts."""

    def __init__(self, description: str, total: int | None, progress: Progress | None,
                 log_every_s: float) -> None:
        self.description = description
        self.total = total
        self.completed = 0
        self.fields: dict[str, float] = {}
        self._progress = progress
        self._task = progress.add_task(description, total=total, extra="") if progress else None
        self._log_every_s = log_every_s
        self._last_log = time.monotonic()

    def advance(self, n: int = 1, **fields: float) -> None:
        """Add `n` to the main count and each keyword to its side count."""
        self.completed += n
        for key, value in fields.items():
            self.fields[key] = self.fields.get(key, 0) + value
        self._show()

    def set(self, **fields: float) -> None:
        """Replace side counts (for gauges such as loss or learning rate)."""
        self.fields.update(fields)
        self._show()

    def summary(self) -> str:
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
        total = f"/{self.total}" if self.total is not None else ""
        return f"{self.description}: {self.completed}{total} {extra}".rstrip()

    def _show(self) -> None:
        if self._progress is not None:
            extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.fields.items())
            self._progress.update(self._task, completed=self.completed, extra=extra)
        elif time.monotonic() - self._last_log >= self._log_every_s:
            self._last_log = time.monotonic()
            log.info(self.summary())


def _fmt(value: float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return f"{value:.4g}"
    return f"{int(value):,}"


@contextmanager
def counter(description: str, total: int | None = None, *, log_every_s: float = 10.0,
            enabled: bool = True) -> Iterator[Counter]:
    """`with counter("crawl", total=100) as c: c.advance(1, bytes=n)` — bar on a TTY, logs elsewhere."""
    if enabled and _interactive():
        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[extra]}")]
        with Progress(*columns, transient=False) as progress:
            c = Counter(description, total, progress, log_every_s)
            yield c
    else:
        c = Counter(description, total, None, log_every_s if enabled else float("inf"))
        yield c
        if enabled:
            log.info(c.summary())


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress display."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with counter(description, total) as c:
        for item in items:
            yield item
            c.advance()
