"""`train.hang_dump_minutes`: when one step (with its evaluation and save) runs longer, the
Python stack of every thread is logged, and again each such interval until the step ends.

A run that hangs in a collective (a dead, stuck or diverged rank) otherwise sits silent until
`parallel.timeout_minutes` fails it; the stacks show where each rank waits. A Python thread reads
them (`sys._current_frames`) under the GIL, which torch's waits release: faulthandler's C
watchdog would also catch a hang that holds the GIL, but it reads the frames of running threads
unlocked, and crashed a healthy run that way when a step was merely slow (measured: SIGSEGV
within a few dumps). The trainer turns on faulthandler only for crashes, so a segfault or abort
in native code (a kernel, a collective library) leaves the Python stack that led to it.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback

from kiln.log import get_logger

log = get_logger(__name__)


def thread_stacks() -> str:
    """Every thread's Python stack, most recent call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class HangWatchdog:
    """`with HangWatchdog(minutes) as watchdog:` ... `watchdog.step(n)` as step n starts."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else 60 * minutes
        self._step, self._since = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HangWatchdog:
        if self.seconds is not None:
            self._thread = threading.Thread(target=self._watch, name="kiln-hang-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def step(self, number: int) -> None:
        self._step, self._since = number, time.monotonic()

    def _watch(self) -> None:
        seen, dumps = None, 0
        while True:
            step, since = self._step, self._since
            if (step, since) != seen:
                seen, dumps = (step, since), 0
            due = since + self.seconds * (dumps + 1)
            if self._stop.wait(max(due - time.monotonic(), 0.0)):
                return
            if (self._step, self._since) == seen:
                dumps += 1
                log.warning("step %d has run for %.1f min (train.hang_dump_minutes); the stacks "
                            "of this process's threads:\n%s", step,
                            (time.monotonic() - since) / 60, thread_stacks())

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()


__all__ = ["HangWatchdog", "thread_stacks"]
