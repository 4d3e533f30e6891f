"""Run a training config from Python: in this process, or as a one-process or torchrun child.

    from trainer.launch import run
    run_dir = run("trainer/configs/tiny-pretrain.yaml", ["train.steps=20"], nproc=2)
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence

from kiln.errors import KilnError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = os.path.join(ROOT, "trainer", "main.py")


class TrainingFailed(KilnError):
    """The training child process exited non-zero; its exit code is kept."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def command(config: str, overrides: Sequence[str] = (), nproc: int = 1) -> list[str]:
    """The command line that trains `config` on `nproc` local ranks."""
    if nproc == 1:
        cmd = [sys.executable, MAIN]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", MAIN]
    cmd += ["--config", str(config)]
    if overrides:
        cmd += ["--set", *overrides]
    return cmd


def run(config: str, overrides: Sequence[str] = (), nproc: int = 1, *,
        in_process: bool = False) -> str:
    """Train and return the run directory (metrics.jsonl, checkpoints/, tensorboard/, loss.png).

    `in_process=True` (one rank only) trains inside this interpreter; on a machine without CUDA
    that installs the CPU backend for the rest of the process. Otherwise a child process (or
    `nproc` torchrun ranks) trains and `TrainingFailed` carries its exit code on failure.
    """
    from trainer.config import load_run_config

    cfg = load_run_config(config, overrides)  # config errors surface here, before any launch
    if in_process:
        if nproc != 1:
            raise ValueError("in_process training runs one rank; use nproc=1")
        from trainer.main import main

        main(["--config", str(config), *(["--set", *overrides] if overrides else [])])
        return cfg.run_dir
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(command(config, overrides, nproc), env=env, check=False)
    if proc.returncode != 0:
        raise TrainingFailed(f"training {config} exited with code {proc.returncode}",
                             proc.returncode)
    return cfg.run_dir
