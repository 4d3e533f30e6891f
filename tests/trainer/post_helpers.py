"""Shared by the post-training stage tests: the tiny configs and a launcher for `post_driver.py`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.trainer.conftest import ROOT, child_env

CONFIGS = ROOT / "trainer" / "configs"
DATA = CONFIGS / "data"
POST_DRIVER = str(ROOT / "tests" / "trainer" / "post_driver.py")


def config(stage: str) -> str:
    return str(CONFIGS / f"tiny-{stage}.yaml")


def run_post(out: Path, runs: dict[str, list[str]], nproc: int = 1, timeout: int = 300) -> None:
    """Each run: [config path, override, ...]; writes out/<name>/metrics.jsonl."""
    if nproc == 1:
        cmd = [sys.executable, POST_DRIVER]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", POST_DRIVER]
    proc = subprocess.run([*cmd, str(out), json.dumps(runs)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
