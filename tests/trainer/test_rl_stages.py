"""The PPO and GRPO stages wire the checked maths of `trainer.rl_math` correctly: on a fixed
rollout, each stage's loss (sum and units for the loop), its gradient and its metrics equal the
rl_math functions applied directly to plain-torch log-probs; rollout rewards/advantages too.

The stages need megatron's parallel state (vocab-parallel ops), so the checks run in a child
process on the CPU backend and report their numbers as JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.trainer.conftest import ROOT, child_env

PPO = str(ROOT / "trainer" / "configs" / "tiny-ppo.yaml")
GRPO = str(ROOT / "trainer" / "configs" / "tiny-grpo.yaml")


def _reference_logps(logits, labels, vocab, temperature):
    import torch

    # the output layer's padding ids (>= vocab) are never sampled: softmax over the real ones
    logp_all = torch.log_softmax(logits[..., :vocab] / temperature, -1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1), entropy


def _fixed_batch(b: int, s: int, vocab: int, padded: int, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, s, generator=g) < 0.7).float()
    mask[:, -1] = 1.0
    logits = torch.randn(b, s, padded, generator=g) * 2
    labels = torch.randint(0, vocab, (b, s), generator=g)
    return {"logits": logits, "labels": labels, "loss_mask": mask,
            "old_logps": torch.randn(b, s, generator=g) * 0.3 - 6.0,
            "ref_logps": torch.randn(b, s, generator=g) * 0.3 - 6.0,
            "advantages": torch.randn(b, s, generator=g), "values": torch.randn(b, s, generator=g),
            "old_values": torch.randn(b, s, generator=g), "returns": torch.randn(b, s, generator=g)}


def _ppo_checks() -> dict:
    import torch

    from trainer.config import load_run_config
    from trainer.rl_math import (
        explained_variance,
        gae,
        masked_mean,
        masked_whiten,
        ppo_policy_loss,
        ppo_value_loss,
    )
    from trainer.stages.ppo import PpoStage, token_rewards

    cfg = load_run_config(PPO, ["model.vocab_size=500", "ppo.temperature=0.7",
                                "ppo.entropy_coef=0.01", "ppo.vf_coef=0.3"])
    stage = PpoStage(cfg)
    stage.setup()
    o, vocab = cfg.ppo, stage.vocab_size()
    d = _fixed_batch(3, 9, vocab, 512)
    logits = d["logits"].clone().requires_grad_()
    values = d["values"].clone().requires_grad_()
    stage.rollout_metrics = {"reward_mean": 0.25, "kl": 0.5}
    batch = {k: d[k] for k in ("labels", "loss_mask", "old_logps", "advantages", "old_values",
                               "returns")}
    loss_sum, units, metrics = stage.loss((logits, values), batch)
    loss_sum.backward()

    ref_logits = d["logits"].clone().requires_grad_()
    ref_values = d["values"].clone().requires_grad_()
    mask = d["loss_mask"]
    logps, entropy = _reference_logps(ref_logits, d["labels"], vocab, o.temperature)
    pg, m = ppo_policy_loss(logps, d["old_logps"], d["advantages"], mask, o.clip_range)
    vf, _ = ppo_value_loss(ref_values, d["old_values"], d["returns"], mask, o.clip_range_value)
    expected = (pg + o.vf_coef * vf - o.entropy_coef * masked_mean(entropy, mask)) * mask.sum()
    expected.backward()
    n = float(units)

    # rollout: per-token rewards, GAE, whitening
    scores = torch.tensor([1.0, -0.5, 0.25])
    seqs = {"tokens": d["labels"], "labels": d["labels"], "loss_mask": mask,
            "valid": torch.ones_like(mask, dtype=torch.bool)}
    rollout = stage.make_rollout(seqs, scores, [d["old_logps"], d["old_values"]], d["ref_logps"])
    rewards = torch.zeros_like(mask)
    for i in range(3):
        last = int(mask[i].nonzero().max())
        for t in range(mask.shape[1]):
            if mask[i, t]:
                rewards[i, t] = -o.kl_coef * (d["old_logps"][i, t] - d["ref_logps"][i, t])
        rewards[i, last] += scores[i]
    adv, ret = gae(rewards, d["old_values"], mask, o.gamma, o.lam)
    return {
        "loss": [float(loss_sum), float(expected)], "units": [n, float(mask.sum())],
        "logits_grad": float((logits.grad - ref_logits.grad).abs().max()),
        "values_grad": float((values.grad - ref_values.grad).abs().max()),
        "clip_frac": [float(metrics["clip_frac"]) / n, float(m["clip_frac"])],
        "approx_kl": [float(metrics["approx_kl"]) / n, float(m["approx_kl"])],
        "value_loss": [float(metrics["value_loss"]) / n, float(vf)],
        "entropy": [float(metrics["entropy"]) / n, float(masked_mean(entropy, mask))],
        "reward_mean": float(metrics["reward_mean"]) / n,
        "token_rewards": float((token_rewards(scores, d["old_logps"], d["ref_logps"], mask,
                                              o.kl_coef) - rewards).abs().max()),
        "advantages": float((rollout.advantages - masked_whiten(adv, mask) * mask).abs().max()),
        "returns": float((rollout.returns - ret).abs().max()),
        "explained_variance": [stage.rollout_stats(rollout)["explained_variance"],
                               float(explained_variance(rollout.old_values, ret, mask))],
    }


def _grpo_checks() -> dict:
    import torch

    from trainer.config import load_run_config
    from trainer.rl_math import group_advantages, grpo_loss
    from trainer.stages.grpo import GrpoStage

    cfg = load_run_config(GRPO, ["model.vocab_size=500", "grpo.epsilon_high=0.28",
                                 "grpo.beta=0.1", "grpo.samples_per_prompt=2"])
    stage = GrpoStage(cfg)
    stage.setup()
    o, vocab = cfg.grpo, stage.vocab_size()
    d = _fixed_batch(4, 9, vocab, 512, seed=1)
    mask = d["loss_mask"]
    seq_adv = torch.tensor([0.7, -0.7, 1.1, -0.2])
    stage.rollout_metrics = {"reward_mean": 0.5, "kl": 0.1}
    out = {}
    for loss_type in ("bnpo", "grpo", "dr_grpo"):
        o.loss_type = loss_type
        logits = d["logits"].clone().requires_grad_()
        batch = {"labels": d["labels"], "loss_mask": mask, "old_logps": d["old_logps"],
                 "ref_logps": d["ref_logps"], "advantages": seq_adv}
        loss_sum, units, metrics = stage.loss(logits, batch)
        loss_sum.backward()
        ref_logits = d["logits"].clone().requires_grad_()
        logps, _ = _reference_logps(ref_logits, d["labels"], vocab, o.temperature)
        loss, m = grpo_loss(logps, d["old_logps"], seq_adv, mask, epsilon_low=o.epsilon_low,
                            epsilon_high=o.epsilon_high, beta=o.beta, ref_logps=d["ref_logps"],
                            loss_type=loss_type, max_completion_length=o.max_new_tokens)
        n_units = float(mask.sum()) if loss_type == "bnpo" else 4.0
        (loss * n_units).backward()
        out[loss_type] = {"loss": [float(loss_sum), float(loss * n_units)],
                          "units": [float(units), n_units],
                          "grad": float((logits.grad - ref_logits.grad).abs().max()),
                          "kl_k3": [float(metrics["kl_k3"]) / n_units, float(m["kl"])],
                          "clip_frac": [float(metrics["clip_frac"]) / n_units,
                                        float(m["clip_ratio_region"])]}
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5])
    seqs = {"tokens": d["labels"], "labels": d["labels"], "loss_mask": mask,
            "valid": torch.ones_like(mask, dtype=torch.bool)}
    rollout = stage.make_rollout(seqs, scores, [d["old_logps"]], d["ref_logps"])
    out["advantages"] = [rollout.advantages.tolist(), group_advantages(scores, 2).tolist()]
    return out


def _child() -> None:
    import trainer.stages.grpo  # noqa: F401  (megatron is imported before the CPU backend is on)
    import trainer.stages.ppo  # noqa: F401
    from tensor_parallel import runtime

    runtime.init()
    result = {"ppo": _ppo_checks(), "grpo": _grpo_checks()}
    runtime.shutdown()
    print("RESULT " + json.dumps(result))


@pytest.fixture(scope="module")
def checks() -> dict:
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _close(pair, rel=1e-5, abs_=1e-6):
    return pair[0] == pytest.approx(pair[1], rel=rel, abs=abs_)


def test_ppo_loss_equals_rl_math_on_a_fixed_rollout(checks):
    c = checks["ppo"]
    assert c["units"][0] == c["units"][1]
    assert _close(c["loss"])
    assert c["logits_grad"] < 1e-5 and c["values_grad"] < 1e-5
    for key in ("clip_frac", "approx_kl", "value_loss", "entropy"):
        assert _close(c[key]), key
    assert c["reward_mean"] == pytest.approx(0.25)  # rollout-wide metrics come back exactly


def test_ppo_rollout_rewards_gae_and_whitening(checks):
    c = checks["ppo"]
    assert c["token_rewards"] < 1e-6
    assert c["advantages"] < 1e-5 and c["returns"] < 1e-6
    assert _close(c["explained_variance"])


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo"])
def test_grpo_loss_equals_rl_math_on_a_fixed_rollout(checks, loss_type):
    c = checks["grpo"][loss_type]
    assert c["units"][0] == c["units"][1]
    assert _close(c["loss"])
    assert c["grad"] < 1e-5  # float32, summed over the tokens
    assert _close(c["kl_k3"]) and _close(c["clip_frac"])


def test_grpo_rollout_group_advantages(checks):
    got, expected = checks["grpo"]["advantages"]
    assert got == pytest.approx(expected)


if __name__ == "__main__":
    _child()
