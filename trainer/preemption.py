"""Stopping a run early and cleanly: on a signal (a scheduler's preemption or time limit) or a
wall-clock budget, the run ends at the next step boundary with a checkpoint, so the same command
continues it. Megatron-LM's `--exit-signal-handler` and `--exit-duration-in-mins`.

- `train.exit_signals` (default `[SIGTERM]`): Kubernetes, SLURM and torchrun all send SIGTERM
  before they kill. Under torchrun the agent forwards it to every worker and sends SIGKILL 30 s
  later, so a run whose step and save take longer needs a planned stop (below). The run exits
  with 128 + the signal's number (143 for SIGTERM), as a process the signal ended would, so a
  wrapper can tell it apart from a finished run.
- `train.time_limit_minutes`: the run stops at the first step boundary past that wall time,
  counted from the trainer's start, and exits with 0. Leave room for one step and a save.

Every rank checks at each step boundary and the ranks agree (a max over the world), so all of
them save and stop after the same step even when the signal reached only some of them. The first
signal is caught; the handler then steps aside, so a second one acts as it would without us (a
stuck save can still be interrupted).
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType

import torch

from kiln.log import get_logger
from tensor_parallel import runtime

log = get_logger(__name__)


class StopRequested(Exception):
    """The run stopped early by request after `step`, its state saved (when saving is on)."""

    def __init__(self, step: int, reason: str, exit_code: int, saved: str | None) -> None:
        where = f"checkpoint {saved}" if saved else "nothing saved (checkpoint.save is false)"
        super().__init__(f"stopped after step {step} ({reason}): {where}"
                         + ("; run the same command to continue" if saved else ""))
        self.step, self.reason, self.exit_code, self.saved = step, reason, exit_code, saved


class GracefulStop:
    """`with GracefulStop(signals, minutes, started) as stop:` ... `stop.poll()` at each step
    boundary: None, or (reason, exit code) agreed by every rank."""

    def __init__(self, signals: list[signal.Signals], time_limit_minutes: float | None,
                 started: float) -> None:
        self.signals = signals
        self.deadline = None if time_limit_minutes is None else started + 60 * time_limit_minutes
        self.received = 0
        self._previous: dict[signal.Signals, object] = {}

    @property
    def armed(self) -> bool:
        return bool(self._previous) or self.deadline is not None

    def __enter__(self) -> GracefulStop:
        if self.signals and threading.current_thread() is not threading.main_thread():
            log.warning("train.exit_signals: not the main thread, signals keep their default action")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum
        sig = signal.Signals(signum)
        signal.signal(sig, self._previous.get(sig, signal.SIG_DFL))  # a second one acts at once
        log.warning("received %s: stopping after this step with a checkpoint (send it again to "
                    "stop at once)", sig.name)

    def poll(self) -> tuple[str, int] | None:
        """Whether any rank was asked to stop: (reason, exit code), the same on every rank."""
        if not self.armed:
            return None
        over = self.deadline is not None and time.monotonic() >= self.deadline
        flags = torch.tensor([self.received, int(over)], dtype=torch.int64, device=runtime.device())
        if runtime.world_size() > 1:
            runtime.all_reduce_max(flags)
        received, over = flags.tolist()
        if received:
            return f"received {signal.Signals(received).name}", 128 + received
        if over:
            return "train.time_limit_minutes reached", 0
        return None


__all__ = ["GracefulStop", "StopRequested"]
