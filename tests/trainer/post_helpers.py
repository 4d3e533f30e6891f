"""Shared by the post-training stage tests: the tiny configs and their sample data."""

from __future__ import annotations

from tests.trainer.conftest import ROOT

CONFIGS = ROOT / "trainer" / "configs"
DATA = CONFIGS / "data"


def config(stage: str) -> str:
    return str(CONFIGS / f"tiny-{stage}.yaml")

