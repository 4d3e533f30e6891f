"""sft, rm and dpo under TP=2 and PP=2 train to the single-process losses and metrics; dpo and kto
under DP=2 too (reference log-probs gathered over DP, KTO's KL reference point averaged over DP);
a reward model at PP=2 starts from an SFT checkpoint saved at TP=2, its new head initialised."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.conftest import losses, metrics
from tests.trainer.post_helpers import DATA, config, run_post

pytestmark = pytest.mark.slow

# 3 steps, validation (held-out pairs) after the last one
STEPS = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "checkpoint.save=false"]
STAGES = ("sft", "rm", "dpo")
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": []}  # dp2: 2 ranks, no MP
RUNS = [(s, lay) for s in STAGES for lay in ("tp2", "pp2")] + [("dpo", "dp2"), ("kto", "dp2")]
COMPARED = {"sft": ["loss"], "rm": ["loss", "reward_accuracy", "reward_margin"],
            "dpo": ["loss", "reward_chosen", "reward_rejected", "reward_margin"],
            "kto": ["loss", "kl", "reward_margin"]}
# KTO's z₀ is a mean over one micro-batch of every DP rank: one process with one micro-batch of 8
# sees what two ranks with 4 each see
KTO_ONE_MICRO_BATCH = ["train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("post_layouts")
    run_post(out, {s: [config(s), *STEPS] for s in STAGES}
             | {"sft_packed": [config("sft"), *STEPS,
                               f"data.manifests=[{DATA / 'sample-sft-packed'}]"],
                "kto": [config("kto"), *STEPS, *KTO_ONE_MICRO_BATCH]})
    two = {f"{s}_{lay}": [config(s), *STEPS, *LAYOUTS[lay]] for s, lay in RUNS}
    two["sft_tp2"] += ["checkpoint.save=true"]
    two["rm_from_sft"] = [config("rm"), *STEPS, *LAYOUTS["pp2"],
                          f"init.checkpoint={out / 'sft_tp2' / 'checkpoints'}"]
    run_post(out, two, nproc=2)
    return out


@pytest.mark.parametrize(("stage", "layout"), RUNS)
def test_layout_matches_single_process(runs: Path, stage: str, layout: str) -> None:
    ref, got = metrics(runs / stage), metrics(runs / f"{stage}_{layout}")
    assert len(ref) == len(got) == 3
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
    assert len(tuned) == 3 and "val_reward_accuracy" in tuned[-1]
    assert tuned[0]["loss"] != pytest.approx(fresh[0]["loss"], abs=1e-4)
