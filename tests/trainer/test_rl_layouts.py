"""PPO and GRPO under TP=2 (also with sequence parallelism, which sampling switches off), PP=2,
PP=2 × VPP=2 and DP=2 match one rank: the same first rollout (greedy for PPO; sampled with
identically seeded generators for GRPO, so every TP rank draws the same tokens) and the same
first-update loss within 1e-5, and the second update on that rollout within 1e-4 (DP=2 only with
greedy PPO: each DP rank samples from its own seed). Later rollouts are not compared: a random
tiny model's near-uniform logits let float rounding of the updated weights flip a greedy argmax.
Runs under torchrun in child processes (gloo, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, child_env, metrics

CONFIGS = {"ppo": ROOT / "trainer" / "configs" / "tiny-ppo.yaml",
           "grpo": ROOT / "trainer" / "configs" / "tiny-grpo.yaml"}
# one optimizer step uses a whole rollout, so the update does not depend on how DP splits it;
# two epochs: the second step trains the updated model on the same rollout
COMMON = {"ppo": ["ppo.greedy=true", "ppo.prompts_per_rollout=8", "ppo.epochs=2",
                  "train.global_batch_size=8", "train.micro_batch_size=4", "train.steps=2"],
          "grpo": ["grpo.prompts_per_rollout=4", "grpo.epochs=2", "train.global_batch_size=16",
                   "train.micro_batch_size=8", "train.steps=2"]}
# `_deep`: 4 layers, one per virtual pipeline stage under PP=2 × VPP=2 (generation passes each
# token through the chunks in turn; scoring and training take the interleaved schedule)
DEEP = ["model.num_layers=4"]
LAYOUTS = {1: {"tp1": [], "tp1_deep": DEEP},
           2: {"tp2": ["parallel.tp=2"], "pp2": ["parallel.pp=2"], "dp2": [],
               "tp2_sp": ["parallel.tp=2", "parallel.sequence_parallel=true"],
               "vpp2": ["parallel.pp=2", "parallel.vpp=2", *DEEP]}}
REFERENCE = {"vpp2": "tp1_deep"}
SKIP = {("grpo", "dp2")}


def _child(out: str, world: int) -> None:
    import trainer.stages.grpo  # noqa: F401  (megatron is imported before the CPU backend is on)
    import trainer.stages.ppo  # noqa: F401
    from kiln.log import setup_logging
    from tensor_parallel import runtime
    from trainer.config import load_run_config
    from trainer.loop import train

    setup_logging("WARNING")
    for stage, config in CONFIGS.items():
        for name, overrides in LAYOUTS[world].items():
            if (stage, name) in SKIP:
                continue
            cfg = load_run_config(str(config), [*COMMON[stage], *overrides,
                                                f"run_dir={out}/{stage}-{name}"])
            p = cfg.parallel
            runtime.init(tp=p.tp, pp=p.pp, vpp=p.vpp, seed=cfg.train.seed)
            train(cfg)
            runtime.shutdown(keep_process_group=True)
    runtime.shutdown()


def first_rollout(run_dir: Path) -> list[tuple]:
    """The first rollout's (prompt, completion, score) samples, over all DP ranks' files."""
    rows = []
    for path in sorted((run_dir / "rollouts").glob("dp*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            if r["rollout"] == 0:
                rows.append((tuple(r["prompt_ids"]), tuple(r["completion_ids"]),
                             round(r["score"], 6)))
    return sorted(rows)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl-layouts")
    for world in (1, 2):
        cmd = [sys.executable, __file__, str(out), "1"] if world == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            __file__, str(out), "2"]
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "layout"), [("ppo", "tp2"), ("grpo", "tp2"), ("ppo", "pp2"),
                                               ("grpo", "pp2"), ("ppo", "dp2"), ("ppo", "vpp2"),
                                               ("grpo", "vpp2"), ("ppo", "tp2_sp"),
                                               ("grpo", "tp2_sp")])
def test_rollouts_and_first_update_match_one_rank(runs, stage, layout):
    one = runs / f"{stage}-{REFERENCE.get(layout, 'tp1')}"
    other = runs / f"{stage}-{layout}"
    samples = first_rollout(one)
    assert len(samples) == {"ppo": 8, "grpo": 16}[stage]
    assert first_rollout(other) == samples
    steps, steps_other = metrics(one), metrics(other)
    assert len(steps_other) == len(steps)
    assert steps_other[0]["loss"] == pytest.approx(steps[0]["loss"], abs=1e-5)
    assert steps_other[0]["reward_mean"] == pytest.approx(steps[0]["reward_mean"], abs=1e-6)
    assert steps_other[1]["loss"] == pytest.approx(steps[1]["loss"], abs=1e-4)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]))
