"""Helpers for trainer tests: run the trainer in subprocesses (one process, or torchrun ranks).

The trainer's CPU backend changes process-wide torch state, so it never runs inside pytest's own
process: every training run here is a child process on gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "trainer" / "configs" / "tiny-pretrain.yaml")
DRIVER = str(ROOT / "tests" / "trainer" / "train_driver.py")


def child_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", KILN_LOG_LEVEL="WARNING")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_trainings(out: Path, runs: dict[str, list[str]], nproc: int = 1,
                  timeout: int = 300) -> None:
    """Each run: [config path, override, ...], trained in turn in one launch of `nproc` ranks;
    writes out/<name>/metrics.jsonl."""
    cmd = [sys.executable, DRIVER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", DRIVER]
    proc = subprocess.run([*cmd, str(out), json.dumps(runs)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def run_layouts(out: Path, layouts: dict[str, list[str]], *common: str, nproc: int = 1,
                config: str = TINY, timeout: int = 300) -> None:
    """Train `config` under each named layout (overrides) in one launch of `nproc` ranks."""
    run_trainings(out, {name: [config, *common, *overrides] for name, overrides in layouts.items()},
                  nproc=nproc, timeout=timeout)


def train_in_this_process(runs: list[tuple[str, list[str]]]) -> None:
    """Train each (config path, overrides) in turn in this (child) process, one runtime each."""
    import trainer.stages.grpo  # noqa: F401  (megatron is imported before the CPU backend is on)
    import trainer.stages.ppo  # noqa: F401
    import trainer.stages.rm  # noqa: F401
    from kiln.log import setup_logging
    from tensor_parallel import runtime
    from trainer.config import load_run_config
    from trainer.loop import train

    setup_logging("WARNING")
    for config, overrides in runs:
        cfg = load_run_config(config, overrides)
        runtime.init(seed=cfg.train.seed)
        train(cfg)
        runtime.shutdown(keep_process_group=True)
    runtime.shutdown()


def run_test_module_as_child(module_file: str, out: Path, timeout: int = 400) -> None:
    """`python <test module> <out>`: a module whose `__main__` trains with the CPU backend."""
    proc = subprocess.run([sys.executable, module_file, str(out)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]


def metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in metrics(run_dir)]


def val_loss(run_dir: Path) -> float:
    return [r["val_loss"] for r in metrics(run_dir) if "val_loss" in r][-1]


@pytest.fixture
def tiny_config() -> str:
    return TINY
