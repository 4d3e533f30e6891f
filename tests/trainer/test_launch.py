"""`trainer.launch`: the Python way to run a training config (what the demo calls)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kiln.errors import ConfigError
from tests.trainer.conftest import TINY
from trainer.launch import command, run


def test_command_uses_torchrun_for_several_ranks() -> None:
    cmd = command("c.yaml", ["parallel.tp=2"], nproc=2)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in cmd and cmd[-3:] == ["c.yaml", "--set", "parallel.tp=2"]
    assert command("c.yaml")[1].endswith("trainer/main.py")


def test_config_errors_surface_before_launch() -> None:
    with pytest.raises(ConfigError):
        run(TINY, ["train.stepz=1"])


def test_run_returns_the_run_directory(tmp_path: Path) -> None:
    run_dir = run(TINY, ["train.steps=2", "train.log_every=1", "checkpoint.save=false",
                         f"run_dir={tmp_path / 'run'}"])
    assert Path(run_dir) == tmp_path / "run"
    records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [1, 2] and all("loss" in r for r in records)
    assert (Path(run_dir) / "loss.png").exists() and (Path(run_dir) / "tensorboard").is_dir()
