"""sft, rm and dpo under TP=2 and PP=2 train to the single-process losses and metrics; an RM
starts from an SFT checkpoint saved at TP=2 with its new head initialised."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.conftest import losses, metrics
from tests.trainer.post_helpers import DATA, config, run_post

pytestmark = pytest.mark.slow

STEPS = ["train.steps=4", "train.log_every=1", "train.eval_every=2", "checkpoint.save=false"]
STAGES = {"sft": [], "rm": [], "dpo": [],
          "sft_packed": [f"data.manifests=[{DATA / 'sample-sft-packed'}]"]}
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"]}
# (stage, layout) pairs run at 2 ranks; packed SFT's block-diagonal mask under TP only
RUNS = [(s, lay) for s in ("sft", "rm", "dpo") for lay in LAYOUTS] + [("sft_packed", "tp2")]
COMPARED = {"sft": ["loss"], "sft_packed": ["loss"],
            "rm": ["loss", "reward_accuracy", "reward_margin"],
            "dpo": ["loss", "reward_chosen", "reward_rejected", "reward_margin"]}


def stage_config(name: str) -> str:
    return config(name.removesuffix("_packed"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("post_layouts")
    run_post(out, {name: [stage_config(name), *STEPS, *extra] for name, extra in STAGES.items()})
    two = {f"{s}_{lay}": [stage_config(s), *STEPS, *STAGES[s], *LAYOUTS[lay]] for s, lay in RUNS}
    two["sft_tp2"] += ["checkpoint.save=true"]
    run_post(out, two, nproc=2)
    sft_ckpt = out / "sft_tp2" / "checkpoints"
    run_post(out, {"rm_from_sft": [config("rm"), *STEPS, f"init.checkpoint={sft_ckpt}"]})
    return out


@pytest.mark.parametrize(("stage", "layout"), RUNS)
def test_layout_matches_single_process(runs: Path, stage: str, layout: str) -> None:
    ref, got = metrics(runs / stage), metrics(runs / f"{stage}_{layout}")
    assert len(ref) == len(got) == 4
    for key in COMPARED[stage] + [f"val_{k}" for k in COMPARED[stage]]:
        expected = [r[key] for r in ref if key in r]
        assert expected, key
        assert [r[key] for r in got if key in r] == pytest.approx(expected, abs=1e-5, rel=0), key


def test_stages_learn_something_different(runs: Path) -> None:
    """The comparison can fail: other data (packed rows) gives other losses."""
    assert losses(runs / "sft") != pytest.approx(losses(runs / "sft_packed"), abs=1e-3)


def test_reward_model_starts_from_an_sft_checkpoint(runs: Path) -> None:
    """The backbone comes from the TP=2 SFT checkpoint (so the run differs from a fresh RM)."""
    fresh, tuned = metrics(runs / "rm"), metrics(runs / "rm_from_sft")
    assert len(tuned) == 4 and "reward_accuracy" in tuned[0]
    assert tuned[0]["loss"] != pytest.approx(fresh[0]["loss"], abs=1e-4)
