"""PPO and GRPO learn on CPU: from a random tiny model, with the verifiable reward of
`tiny-{ppo,grpo}.yaml` (the share of generated tokens with an id in [8, 72), 1/8 by chance), the
mean reward of the last rollouts beats the first ones by a clear margin while the KL to the
reference stays bounded. Both configs train in one child process (one megatron start-up)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, child_env, metrics

CONFIGS = {"ppo": ROOT / "trainer" / "configs" / "tiny-ppo.yaml",
           "grpo": ROOT / "trainer" / "configs" / "tiny-grpo.yaml"}
FIRST_LAST = 3  # rollouts averaged at each end
MARGIN = 0.05  # reward gain required (the chance level is 0.125)
KL_BOUND = 6.0  # nats per completion, KL(policy || reference) estimated on each rollout


def _child(out: str) -> None:
    import trainer.stages.grpo  # noqa: F401  (megatron is imported before the CPU backend is on)
    import trainer.stages.ppo  # noqa: F401
    from kiln.log import setup_logging
    from tensor_parallel import runtime
    from trainer.config import load_run_config
    from trainer.loop import train

    setup_logging("WARNING")
    for name, config in CONFIGS.items():
        cfg = load_run_config(str(config), [f"run_dir={out}/{name}"])
        runtime.init(tp=1, seed=cfg.train.seed)
        train(cfg)
        runtime.shutdown(keep_process_group=True)
    runtime.shutdown()


def rollout_series(run_dir: Path) -> list[dict]:
    """One record per rollout (its first optimizer step): reward_mean and kl."""
    rows, seen = [], set()
    for r in metrics(run_dir):
        key = (r["reward_mean"], r["kl"], r["completion_length"])
        if key not in seen:
            seen.add(key)
            rows.append(r)
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rl-learning")
    proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ppo", "grpo"])
def test_reward_improves_with_bounded_kl(runs, stage):
    series = rollout_series(runs / stage)
    assert len(series) >= 2 * FIRST_LAST
    rewards = [r["reward_mean"] for r in series]
    first = sum(rewards[:FIRST_LAST]) / FIRST_LAST
    last = sum(rewards[-FIRST_LAST:]) / FIRST_LAST
    print(json.dumps({"stage": stage, "first": first, "last": last,
                      "max_kl": max(r["kl"] for r in series)}))
    assert last > first + MARGIN, rewards
    assert all(abs(r["kl"]) < KL_BOUND for r in series), [r["kl"] for r in series]
    assert series[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    assert all(key in series[-1] for key in ("loss", "entropy", "clip_frac", "approx_kl"))
    if stage == "ppo":
        assert all(key in series[-1] for key in ("value_loss", "explained_variance"))


if __name__ == "__main__":
    _child(sys.argv[1])
