"""RL runs and checkpoints together: PPO scored by a reward model trained with `stage: rm`, GRPO
started from the PPO checkpoint (its reference loads the same weights, the value head is left
out), and `kiln generate` sampling from the checkpoints the stages write."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import (
    ROOT,
    child_env,
    metrics,
    run_test_module_as_child,
    train_in_this_process,
)

CONFIGS = ROOT / "trainer" / "configs"
SMALL = ["train.steps=2", "train.global_batch_size=8", "train.micro_batch_size=8",
         "checkpoint.save=true"]


def _child(out: str) -> None:
    runs = [
        ("rm", "tiny-rm.yaml", ["train.steps=2", "checkpoint.save=true", "train.eval_every=0"]),
        ("ppo", "tiny-ppo.yaml", [*SMALL, "ppo.prompts_per_rollout=8", "ppo.reward_function=null",
                                  f"ppo.reward_model={out}/rm/checkpoints"]),
        ("grpo", "tiny-grpo.yaml", [*SMALL, "grpo.prompts_per_rollout=2",
                                    f"init.checkpoint={out}/ppo/checkpoints"]),
        ("grpo-fresh", "tiny-grpo.yaml", [*SMALL, "train.steps=1", "grpo.prompts_per_rollout=2",
                                          "checkpoint.save=false"]),
    ]
    train_in_this_process([(str(CONFIGS / config), [*overrides, f"run_dir={out}/{name}"])
                           for name, config, overrides in runs])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl-checkpoints")
    run_test_module_as_child(__file__, out)
    return out


def kiln_generate(*args: str, ranks: int = 1) -> subprocess.CompletedProcess:
    launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone",
                                    f"--nproc-per-node={ranks}"]
    return subprocess.run([sys.executable, *launch, "-m", "kiln.cli", "generate", *args],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=200)


@pytest.mark.slow
def test_ppo_rewards_come_from_the_reward_model(runs):
    rows = metrics(runs / "ppo")
    samples = [json.loads(line)
               for line in (runs / "ppo" / "rollouts" / "dp0.jsonl").read_text().splitlines()]
    assert [s["rollout"] for s in samples] == [0] * 8 + [1] * 8  # one step per rollout
    scores = [s["score"] for s in samples]
    assert len(set(scores)) == 16  # a learned scalar per completion, not a rule
    for step, rollout in ((0, scores[:8]), (1, scores[8:])):
        assert rows[step]["reward_mean"] == pytest.approx(sum(rollout) / 8, rel=1e-5)


@pytest.mark.slow
def test_grpo_starts_from_the_ppo_checkpoint(runs):
    first, fresh = metrics(runs / "grpo")[0], metrics(runs / "grpo-fresh")[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # reference == loaded starting policy
    # the same prompts and seed from the random initialisation: PPO's two steps changed the model
    assert abs(first["entropy"] - fresh["entropy"]) > 1e-4


@pytest.mark.slow
def test_kiln_generate_samples_a_ppo_checkpoint(runs):
    ckpt = str(runs / "ppo" / "checkpoints")
    args = [ckpt, "--prompt", "How do I bake bread?", "--prompt", "Hi", "--chat", "--greedy",
            "--max-new-tokens", "6"]
    first = kiln_generate(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(first.stdout.splitlines()) == 2
    # the checkpoint over two pipeline stages or two tensor-parallel ranks: one copy printed,
    # the same text
    for layout in (["--pp", "2"], ["--tp", "2"]):
        split = kiln_generate(*args, *layout, ranks=2)
        assert split.returncode == 0, split.stderr[-3000:]
        assert split.stdout == first.stdout, layout
    mismatched = kiln_generate(*args, "--pp", "2", ranks=1)
    assert mismatched.returncode == 2
    assert "--pp 2 runs on 2 processes, this is 1: launch with torchrun" in mismatched.stderr


@pytest.mark.slow
def test_kiln_generate_refuses_bad_arguments_and_reward_models(runs):
    from kiln.errors import UsageError
    from trainer.generate import main

    with pytest.raises(UsageError, match="--top-p must be in"):
        main([str(runs / "ppo" / "checkpoints"), "--prompt", "x", "--top-p", "0"])
    with pytest.raises(UsageError, match="is a reward model"):
        main([str(runs / "rm" / "checkpoints"), "--prompt", "x"])


@pytest.mark.slow
def test_reward_models_that_cannot_serve_are_refused_by_name(runs):
    """Not a reward model (a PPO checkpoint), and a 2-layer reward model under a layout of four
    pipeline stages (PP=2 × VPP=2): each a clear error naming `ppo.reward_model`."""
    def ppo(ranks: int, reward_model: Path, *sets: str) -> subprocess.CompletedProcess:
        launch = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone",
                                        f"--nproc-per-node={ranks}"]
        return subprocess.run(
            [sys.executable, *launch, "trainer/main.py", "--config", str(CONFIGS / "tiny-ppo.yaml"),
             "--set", *SMALL, "checkpoint.save=false", "ppo.prompts_per_rollout=8",
             f"ppo.reward_model={reward_model}", f"run_dir={runs}/refused", *sets],
            cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=200)

    wrong_stage = ppo(1, runs / "ppo" / "checkpoints")
    assert wrong_stage.returncode != 0
    assert "'ppo.reward_model'" in wrong_stage.stderr
    assert "is a 'ppo' checkpoint, not a reward model" in wrong_stage.stderr
    too_shallow = ppo(2, runs / "rm" / "checkpoints", "parallel.pp=2", "parallel.vpp=2",
                      "model.num_layers=4", "train.micro_batch_size=4")
    assert too_shallow.returncode != 0
    assert ("'ppo.reward_model'" in too_shallow.stderr
            and "model.num_layers=2 is not divisible by pp×vpp = 2×2 = 4" in too_shallow.stderr)


if __name__ == "__main__":
    _child(sys.argv[1])
