"""Shared by the post-training stage tests: the tiny configs and the trainings launcher."""

from __future__ import annotations

from tests.trainer.conftest import ROOT, run_trainings

CONFIGS = ROOT / "trainer" / "configs"
DATA = CONFIGS / "data"


def config(stage: str) -> str:
    return str(CONFIGS / f"tiny-{stage}.yaml")


run_post = run_trainings  # each run: [config path, override, ...]
