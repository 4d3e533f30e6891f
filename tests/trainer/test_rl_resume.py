"""PPO (adaptive β) and GRPO runs stopped after a checkpoint in the middle of a rollout resume to
exactly the per-step metrics of an uninterrupted run: the KL controller's β, the rollout being
trained on and the position in its mini-batches come back from the checkpoint. At DP=2 each DP
rank gets its own rollout back; under another layout (TP=2) the rollout is sampled again, scored
with the β it had before.

One child process trains each stage three times (uninterrupted; stopped at a checkpoint; resumed
in the stopped run's directory) on the CPU backend; the DP=2 runs go through torchrun.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import (
    ROOT,
    metrics,
    run_layouts,
    run_test_module_as_child,
    train_in_this_process,
)

CONFIGS = ROOT / "trainer" / "configs"
# Two optimizer steps per rollout: a checkpoint after an odd step is in the middle of one.
RUNS = {
    "ppo": ("tiny-ppo.yaml", 6, 3, ["ppo.prompts_per_rollout=16", "ppo.adaptive_kl=true",
                                    "ppo.kl_target=0.1", "ppo.kl_horizon=100"]),
    "grpo": ("tiny-grpo.yaml", 4, 1, ["grpo.prompts_per_rollout=4", "grpo.samples_per_prompt=4"]),
}
COMMON = ["train.global_batch_size=8", "train.micro_batch_size=8", "train.log_every=1"]
TIMING = {"tokens_per_s", "tflops_per_rank", "peak_memory_gb", "mfu"}


def _child(out: str) -> None:
    train_in_this_process([
        (str(CONFIGS / config), [*COMMON, *overrides, f"train.steps={n}",
                                 f"checkpoint.save={save}", f"run_dir={out}/{stage}-{run}"])
        for stage, (config, steps, stop, overrides) in RUNS.items()
        for run, n, save in (("straight", steps, "false"), ("resumed", stop, "true"),
                             ("resumed", steps, "true"))])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl-resume")
    run_test_module_as_child(__file__, out)
    return out


def _rollouts(run_dir: Path) -> list[int]:
    lines = (run_dir / "rollouts" / "dp0.jsonl").read_text().splitlines()
    return [json.loads(line)["rollout"] for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(RUNS))
def test_resume_mid_rollout_continues_exactly(runs: Path, stage: str) -> None:
    straight, resumed = metrics(runs / f"{stage}-straight"), metrics(runs / f"{stage}-resumed")
    steps = RUNS[stage][1]
    assert [r["step"] for r in resumed] == [r["step"] for r in straight] == list(range(1, steps + 1))
    for a, b in zip(straight, resumed, strict=True):
        keys = set(a) - TIMING
        assert set(b) - TIMING == keys
        assert {k: b[k] for k in keys} == pytest.approx({k: a[k] for k in keys}, abs=1e-6, rel=0)
    if stage == "ppo":  # β moved, so a restart from ppo.kl_coef would show
        coefs = [r["kl_coef"] for r in straight]
        assert coefs[0] == 0.05 and abs(coefs[-1] - coefs[0]) > 1e-3
    # the interrupted rollout is trained on, not sampled (and recorded) again
    assert _rollouts(runs / f"{stage}-resumed") == _rollouts(runs / f"{stage}-straight")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl-resume-2")
    config, _, _, overrides = RUNS["ppo"]
    saved = f"checkpoint.dir={out / 'dp2-stop' / 'checkpoints'}"
    pp2 = ["parallel.pp=2"]
    run_layouts(out, {"dp2-straight": ["train.steps=4"],
                      "dp2-stop": ["train.steps=3", "checkpoint.save=true"],
                      "dp2-resumed": ["train.steps=4", saved],
                      "tp2-resumed": ["train.steps=4", "parallel.tp=2", saved],
                      "pp2-straight": ["train.steps=4", *pp2],
                      "pp2-stop": ["train.steps=3", "checkpoint.save=true", *pp2],
                      "pp2-resumed": ["train.steps=4", *pp2,
                                      f"checkpoint.dir={out / 'pp2-stop' / 'checkpoints'}"]},
                *COMMON, *overrides, "train.micro_batch_size=4", nproc=2,
                config=str(CONFIGS / config))
    return out


@pytest.mark.slow
def test_ppo_resume_at_dp2_and_under_another_layout(two_ranks: Path) -> None:
    straight = metrics(two_ranks / "dp2-straight")
    [same], [other] = metrics(two_ranks / "dp2-resumed"), metrics(two_ranks / "tp2-resumed")
    keys = set(straight[3]) - TIMING
    assert same["step"] == 4
    assert {k: same[k] for k in keys} == pytest.approx({k: straight[3][k] for k in keys},
                                                       abs=1e-6, rel=0)
    # TP=2 cannot take the DP ranks' rollouts: rollout 1 is sampled again with the policy after
    # step 3 (other samples), and scored with rollout 1's β, not the β its first KL updated
    assert abs(other["reward_mean"] - straight[3]["reward_mean"]) > 1e-6
    assert other["kl_coef"] == pytest.approx(straight[3]["kl_coef"], abs=1e-9, rel=0)
    assert straight[3]["kl_coef"] != straight[0]["kl_coef"]


@pytest.mark.slow
def test_ppo_resume_mid_rollout_at_pp2(two_ranks: Path) -> None:
    """Both pipeline stages hold the rollout; the checkpoint keeps one copy and gives it back."""
    straight = metrics(two_ranks / "pp2-straight")
    [resumed] = metrics(two_ranks / "pp2-resumed")
    keys = set(straight[3]) - TIMING
    assert resumed["step"] == 4
    assert {k: resumed[k] for k in keys} == pytest.approx({k: straight[3][k] for k in keys},
                                                          abs=1e-6, rel=0)
    # the samples of rollouts 0 and 1 (16 prompts each) written once, by the last stage
    assert _rollouts(two_ranks / "pp2-stop") == [0] * 16 + [1] * 16


if __name__ == "__main__":
    _child(sys.argv[1])
