"""sft, rm and dpo under TP=2 and PP=2 train to the single-process losses and metrics; dpo and kto
under DP=2 too (reference log-probs gathered over DP, KTO's KL reference point averaged over DP);
the online reference (dpo at TP=2, PP=2 and PP=2 × VPP=2, kto at DP=2) matches its single-process
run; a reward model at PP=2 starts from an SFT checkpoint saved at TP=2, its new head initialised;
sft on plain and packed (block-masked) rows, dpo (stored and online reference), kto, orpo and
simpo, whose per-sequence sums add up over the CP ranks, and rm, whose reward comes from the CP
rank holding the last token, match under context parallelism (CP=2) too; ppo and grpo, which
decode whole sequences on one rank, refuse CP."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer.conftest import losses, metrics, run_trainings
from tests.trainer.post_helpers import DATA, config

pytestmark = pytest.mark.slow

# 3 steps, validation (held-out pairs) after the last one
STEPS = ["train.steps=3", "train.log_every=1", "train.eval_every=0", "checkpoint.save=false"]
STAGES = ("sft", "rm", "dpo")
LAYOUTS = {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": [],  # dp2: 2 ranks, no MP
           "vpp2": ["parallel.pp=2", "parallel.vpp=2"], "cp2": ["parallel.cp=2"]}
PACKED = [f"data.manifests=[{DATA / 'sample-sft-packed'}]"]  # sft on packed rows (block masks)
# `<stage>_online`: the stage with its reference model run online (a frozen copy, every step);
# `_deep`: 4 layers, one per virtual pipeline stage under PP=2 × VPP=2
ONLINE = {"dpo_online": ["dpo.reference=online"], "kto_online": ["kto.reference=online"],
          "dpo_online_deep": ["dpo.reference=online", "model.num_layers=4"]}
RUNS = ([(s, lay) for s in STAGES for lay in ("tp2", "pp2")] + [("dpo", "dp2"), ("kto", "dp2")]
        + [("dpo_online", "tp2"), ("dpo_online", "pp2"), ("dpo_online_deep", "vpp2"),
           ("kto_online", "dp2")]
        + [("sft", "cp2"), ("sft_packed", "cp2"), ("dpo", "cp2"), ("dpo_online", "cp2"),
           ("kto", "cp2"), ("orpo", "cp2"), ("simpo", "cp2"), ("rm", "cp2")])
COMPARED = {"sft": ["loss"], "rm": ["loss", "reward_accuracy", "reward_margin"],
            "dpo": ["loss", "reward_chosen", "reward_rejected", "reward_margin"],
            "kto": ["loss", "kl", "reward_margin"],
            "orpo": ["loss", "nll_loss", "log_odds_ratio"], "simpo": ["loss", "reward_margin"]}
COMPARED |= {name: COMPARED[name.split("_")[0]] for name in [*ONLINE, "sft_packed"]}
# KTO's z₀ is a mean over one micro-batch of every DP rank: one process with one micro-batch of 8
# sees what two ranks with 4 each see
KTO_ONE_MICRO_BATCH = ["train.micro_batch_size=8"]


def run(name: str, *overrides: str) -> list[str]:
    """The config and overrides of the run `name` (a stage, or one of `ONLINE`)."""
    return [config(name.split("_")[0]), *STEPS, *ONLINE.get(name, []),
            *(PACKED if name == "sft_packed" else []), *overrides]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("post_layouts")
    run_trainings(out, {s: run(s) for s in (*STAGES, "orpo", "simpo", "dpo_online",
                                            "dpo_online_deep")}
                  | {"sft_packed": run("sft_packed"),
                     "kto": run("kto", *KTO_ONE_MICRO_BATCH),
                     "kto_online": run("kto_online", *KTO_ONE_MICRO_BATCH)})
    two = {f"{s}_{lay}": run(s, *LAYOUTS[lay]) for s, lay in RUNS}
    two["sft_tp2"] += ["checkpoint.save=true"]
    two["kto_cp2"] += KTO_ONE_MICRO_BATCH  # one DP rank: its micro-batch is z₀'s whole batch
    two["rm_from_sft"] = [config("rm"), *STEPS, *LAYOUTS["pp2"],
                          f"init.checkpoint={out / 'sft_tp2' / 'checkpoints'}"]
    run_trainings(out, two, nproc=2)
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


def test_stages_that_decode_sequences_on_one_rank_refuse_context_parallelism() -> None:
    from trainer.stages import stage_class

    assert {name: stage_class(name).context_parallel for name in (
        "pretrain", "sft", "rm", "dpo", "orpo", "simpo", "kto", "ppo", "grpo")} == {
        "pretrain": True, "sft": True, "rm": True, "dpo": True, "orpo": True,
        "simpo": True, "kto": True, "ppo": False, "grpo": False}
