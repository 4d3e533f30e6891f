"""`train.profile_steps`: torch.profiler over a window of training steps, per rank.

Like Megatron-LM's `--profile --profile-step-start/--profile-step-end --profile-ranks`. The
window's trace goes to `<run_dir>/profile/` in the layout TensorBoard's profiler plugin reads
(`rank<R>.<time>.pt.trace.json`, also openable in Perfetto or chrome://tracing), with the ops
that took most self time as a table beside it (`ops-rank<R>.txt`).
"""

from __future__ import annotations

import os

from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

from kiln.log import get_logger
from kiln.paths import write_text

log = get_logger(__name__)

TOP_OPS = 40


class StepProfiler:
    """Call `before(step)` / `after(step)` around each step (1-based step numbers)."""

    def __init__(self, run_dir: str, steps: list[int] | None, ranks: list[int], rank: int,
                 on_gpu: bool) -> None:
        self.first, self.last = steps if steps else (0, -1)
        self.active = steps is not None and rank in ranks
        self.dir, self.rank, self.on_gpu = os.path.join(run_dir, "profile"), rank, on_gpu
        self._prof: profile | None = None
        self._started = 0

    def before(self, step: int) -> None:
        if self.active and self._prof is None and self.first <= step <= self.last:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_gpu else [])
            self._prof = profile(activities=activities, profile_memory=True)
            self._prof.__enter__()
            self._started = step  # after a resume inside the window, later than `first`

    def after(self, step: int) -> None:
        if self._prof is None or step < self.last:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.active = False
        tensorboard_trace_handler(self.dir, worker_name=f"rank{self.rank}")(prof)
        sort = "self_cuda_time_total" if self.on_gpu else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS)
        write_text(os.path.join(self.dir, f"ops-rank{self.rank}.txt"),
                   f"steps {self._started}-{step}, rank {self.rank}\n{table}\n")
        log.info("profile of steps %d-%d written to %s", self._started, step, self.dir)

    def close(self) -> None:
        """Stop a window the run ended inside (its last step is past train.steps), unwritten."""
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None


__all__ = ["StepProfiler"]
