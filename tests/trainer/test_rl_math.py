"""trainer.rl_math against TRL's own code where TRL has it, else against plain loop references.

TRL 1.16 (installed): ``GRPOTrainer._compute_loss`` called unbound (see ``_trl_reference``) for the
GRPO objective, its KL term (k3) and entropy bonus, and, fed per-token advantages with ``bnpo``
aggregation, for the PPO clipped surrogate; the advantage lines of
``GRPOTrainer._generate_and_score_completions`` for group advantages; ``trl.trainer.utils.
entropy_from_logits``. TRL 0.19.1's ``masked_mean``/``masked_var``/``masked_whiten`` (removed from
TRL since; copied verbatim into ``_trl_reference``). GAE, the value loss, KL estimators, KL
controllers and explained variance have no standalone TRL function (PPO's GAE is a loop inside
``PPOTrainer.train`` and was removed with it): they are checked against references written below
element by element with Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from trl.trainer.utils import entropy_from_logits as trl_entropy_from_logits

from tests.trainer._trl_reference import (
    trl019_masked_mean,
    trl019_masked_var,
    trl019_masked_whiten,
    trl_group_advantages,
    trl_grpo,
)
from trainer import rl_math

DT = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}
SEEDS = [0, 1, 2]


def _close(ours, theirs) -> None:
    torch.testing.assert_close(torch.as_tensor(ours, dtype=DT), torch.as_tensor(theirs, dtype=DT), **TOL)


def _grad(loss: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, leaves, retain_graph=True)


def _right_padded_mask(seed: int, batch: int, length: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (batch,), generator=g)
    lengths[0] = length  # at least one full row
    return (torch.arange(length)[None, :] < lengths[:, None]).to(DT)


def _rollout(seed: int, batch: int = 4, length: int = 6):
    """Per-token new/old/ref log-probs (new is the leaf), advantages and a right-padded mask."""
    g = torch.Generator().manual_seed(seed)
    old = -2 * torch.rand(batch, length, generator=g, dtype=DT)
    # Ratios spread over roughly [0.6, 1.6] so both clip edges are hit.
    logps = (old + 0.5 * torch.randn(batch, length, generator=g, dtype=DT)).requires_grad_()
    ref = old + 0.3 * torch.randn(batch, length, generator=g, dtype=DT)
    advantages = torch.randn(batch, generator=g, dtype=DT)
    return logps, old, ref, advantages, _right_padded_mask(seed, batch, length)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whitening_matches_trl_0_19(seed, shift_mean):
    g = torch.Generator().manual_seed(seed)
    values = (3 * torch.randn(4, 7, generator=g, dtype=DT) + 1).requires_grad_()
    mask = _right_padded_mask(seed, 4, 7)
    _close(rl_math.masked_mean(values, mask), trl019_masked_mean(values, mask))
    _close(rl_math.masked_mean(values, mask, dim=1), trl019_masked_mean(values, mask, axis=1))
    _close(rl_math.masked_var(values, mask), trl019_masked_var(values, mask))
    _close(rl_math.masked_var(values, mask, unbiased=False),
           trl019_masked_var(values, mask, unbiased=False))
    ours = rl_math.masked_whiten(values, mask, shift_mean=shift_mean)
    theirs = trl019_masked_whiten(values, mask, shift_mean=shift_mean)
    _close(ours, theirs)
    weights = torch.randn(4, 7, generator=g, dtype=DT)
    _close(_grad((ours * weights).sum(), values)[0], _grad((theirs * weights).sum(), values)[0])


def test_masked_var_needs_two_values():
    with pytest.raises(ValueError, match="at least 2"):
        rl_math.masked_var(torch.ones(1, 3, dtype=DT), torch.tensor([[1.0, 0.0, 0.0]], dtype=DT))


def _reference_gae(rewards, values, mask, gamma, lam):
    """GAE written out per sequence: walk back from the last response token, V = 0 after it."""
    batch, length = rewards.shape
    advantages = [[torch.zeros((), dtype=DT) for _ in range(length)] for _ in range(batch)]
    for b in range(batch):
        last = int(mask[b].sum()) - 1
        running = torch.zeros((), dtype=DT)
        for t in range(last, -1, -1):
            next_value = values[b, t + 1] if t < last else torch.zeros((), dtype=DT)
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b][t] = running
    advantages = torch.stack([torch.stack(row) for row in advantages])
    return advantages, (advantages + values) * mask


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)])
def test_gae_matches_loop_reference(seed, gamma, lam):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(4, 6, generator=g, dtype=DT).requires_grad_()
    values = torch.randn(4, 6, generator=g, dtype=DT).requires_grad_()
    mask = _right_padded_mask(seed, 4, 6)
    # Garbage beyond the mask must not leak into the result.
    padded_rewards = torch.where(mask.bool(), rewards, torch.full_like(rewards, 99.0))
    advantages, returns = rl_math.gae(padded_rewards, values, mask, gamma, lam)
    ref_advantages, ref_returns = _reference_gae(rewards, values, mask, gamma, lam)
    _close(advantages, ref_advantages)
    _close(returns, ref_returns)
    weights = torch.randn(4, 6, generator=g, dtype=DT)
    objective = (advantages * weights).sum() + (returns * weights).sum()
    ref_objective = (ref_advantages * weights).sum() + (ref_returns * weights).sum()
    for a, b in zip(_grad(objective, rewards, values), _grad(ref_objective, rewards, values),
                    strict=True):
        _close(a, b)


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]], dtype=DT)
    values = torch.tensor([[0.5, 0.25, 0.125]], dtype=DT)
    advantages, returns = rl_math.gae(rewards, values, torch.ones(1, 3, dtype=DT), gamma=0.5, lam=1.0)
    discounted = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0]], dtype=DT)
    _close(returns, discounted)
    _close(advantages, discounted - values)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("clip_range", [0.1, 0.2])
def test_ppo_policy_loss_matches_trl_token_level_clipped_objective(seed, clip_range):
    logps, old, _, _, mask = _rollout(seed)
    g = torch.Generator().manual_seed(seed + 3)
    advantages = torch.randn(*logps.shape, generator=g, dtype=DT)
    ours, metrics = rl_math.ppo_policy_loss(logps, old, advantages, mask, clip_range)
    theirs, their_metrics = trl_grpo(logps, old, advantages, mask, loss_type="bnpo",
                                     epsilon_low=clip_range, epsilon_high=clip_range)
    _close(ours, theirs)
    _close(_grad(ours, logps)[0], _grad(theirs, logps)[0])
    _close(metrics["clip_frac"], their_metrics["clip_ratio/region_mean"])
    assert 0 < metrics["clip_frac"] < 1
    log_ratio = [(logps[b, t] - old[b, t]).item() for b in range(4) for t in range(6) if mask[b, t]]
    _close(metrics["approx_kl"], 0.5 * sum(x * x for x in log_ratio) / len(log_ratio))
    _close(metrics["ratio_mean"], sum(math.exp(x) for x in log_ratio) / len(log_ratio))


@pytest.mark.parametrize("seed", SEEDS)
def test_ppo_value_loss_matches_loop_reference(seed):
    g = torch.Generator().manual_seed(seed)
    old_values = torch.randn(4, 6, generator=g, dtype=DT)
    values = (old_values + 0.4 * torch.randn(4, 6, generator=g, dtype=DT)).requires_grad_()
    returns = torch.randn(4, 6, generator=g, dtype=DT)
    mask = _right_padded_mask(seed, 4, 6)
    ours, metrics = rl_math.ppo_value_loss(values, old_values, returns, mask, 0.2)
    terms, clipped_count = [], 0
    for b in range(4):
        for t in range(6):
            if mask[b, t]:
                v, v_old, ret = values[b, t], old_values[b, t], returns[b, t]
                v_clipped = torch.clamp(v, v_old - 0.2, v_old + 0.2)
                terms.append(torch.maximum((v - ret) ** 2, (v_clipped - ret) ** 2))
                clipped_count += int((v_clipped - ret) ** 2 > (v - ret) ** 2)
    reference = 0.5 * torch.stack(terms).mean()
    _close(ours, reference)
    _close(_grad(ours, values)[0], _grad(reference, values)[0])
    _close(metrics["value_clip_frac"], clipped_count / len(terms))


def test_entropy_from_logits_matches_trl():
    logits = torch.randn(3, 5, 17, dtype=DT, generator=torch.Generator().manual_seed(0))
    _close(rl_math.entropy_from_logits(logits), trl_entropy_from_logits(logits))
    uniform = rl_math.entropy_from_logits(torch.zeros(2, 8, dtype=DT))
    _close(uniform, torch.full((2,), math.log(8), dtype=DT))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize(("beta", "epsilon_high"), [(0.0, 0.2), (0.04, 0.28)])
def test_grpo_loss_matches_trl_grpo_trainer(seed, loss_type, beta, epsilon_high):
    logps, old, ref, advantages, mask = _rollout(seed)
    kwargs = {"epsilon_low": 0.2, "epsilon_high": epsilon_high, "beta": beta, "loss_type": loss_type,
              "max_completion_length": 8}
    theirs, their_metrics = trl_grpo(logps, old, advantages, mask,
                                     ref_per_token_logps=ref if beta else None, **kwargs)
    ours, metrics = rl_math.grpo_loss(logps, old, advantages, mask, ref_logps=ref, **kwargs)
    _close(ours, theirs)
    _close(_grad(ours, logps)[0], _grad(theirs, logps)[0])
    for key in ["low", "high", "region"]:
        _close(metrics[f"clip_ratio_{key}"], their_metrics[f"clip_ratio/{key}_mean"])
    if beta:
        _close(metrics["kl"], their_metrics["kl"])


def test_grpo_bnpo_with_global_token_count():
    logps, old, _, advantages, mask = _rollout(0)
    local, _ = rl_math.grpo_loss(logps, old, advantages, mask)
    global_count = 3 * mask.sum()
    scaled, _ = rl_math.grpo_loss(logps, old, advantages, mask, num_tokens=global_count)
    _close(scaled, local / 3)


@pytest.mark.parametrize("seed", SEEDS)
def test_entropy_bonus_matches_trl_grpo_trainer(seed):
    logps, old, _, advantages, mask = _rollout(seed)
    g = torch.Generator().manual_seed(seed + 11)
    entropies = (2 * torch.rand(*logps.shape, generator=g, dtype=DT)).requires_grad_()
    theirs, _ = trl_grpo(logps, old, advantages, mask, loss_type="bnpo", epsilon_low=0.2,
                         epsilon_high=0.2, entropies=entropies, entropy_coef=0.01)
    policy, _ = rl_math.grpo_loss(logps, old, advantages, mask)
    ours = policy + rl_math.entropy_bonus(entropies, mask, 0.01)
    _close(ours, theirs)
    for a, b in zip(_grad(ours, logps, entropies), _grad(theirs, logps, entropies), strict=True):
        _close(a, b)


def test_kl_estimators_match_loop_reference_and_signs():
    logps, _, ref, _, _ = _rollout(1)
    logps = logps.detach()
    k1, k2, k3 = (rl_math.KL_ESTIMATORS[k](logps, ref) for k in ["k1", "k2", "k3"])
    for b in range(logps.size(0)):
        for t in range(logps.size(1)):
            log_r = ref[b, t].item() - logps[b, t].item()
            assert k1[b, t].item() == pytest.approx(-log_r, abs=1e-12)
            assert k2[b, t].item() == pytest.approx(0.5 * log_r**2, abs=1e-12)
            assert k3[b, t].item() == pytest.approx(math.exp(log_r) - 1 - log_r, abs=1e-12)
    assert (k2 >= 0).all() and (k3 >= 0).all() and (k1 < 0).any()


def test_k1_and_k3_estimate_the_exact_kl_on_samples_from_the_policy():
    g = torch.Generator().manual_seed(0)
    policy = torch.log_softmax(torch.randn(6, generator=g, dtype=DT), 0)
    reference = torch.log_softmax(torch.randn(6, generator=g, dtype=DT), 0)
    exact = (policy.exp() * (policy - reference)).sum()
    samples = torch.multinomial(policy.exp(), 200_000, replacement=True, generator=g)
    for name in ["k1", "k3"]:
        estimate = rl_math.KL_ESTIMATORS[name](policy[samples], reference[samples]).mean()
        assert estimate.item() == pytest.approx(exact.item(), rel=0.03), name


def test_adaptive_kl_controller_matches_ziegler_update():
    controller = rl_math.AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10_000)
    coef = 0.2
    for kl, n_steps in [(12.0, 256), (6.5, 256), (1.0, 512), (6.0, 256), (0.0, 128)]:
        error = kl / 6.0 - 1
        error = 0.2 if error > 0.2 else (-0.2 if error < -0.2 else error)
        coef = coef * (1 + error * n_steps / 10_000)
        controller.update(kl, n_steps)
        assert controller.value == pytest.approx(coef, rel=1e-15)
    assert controller.value != 0.2
    fixed = rl_math.FixedKLController(0.05)
    fixed.update(100.0, 256)
    assert fixed.value == 0.05


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl_grpo_trainer(seed, scale_rewards):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(12, generator=g, dtype=DT)
    rewards[4:8] = 1.0  # a group whose completions all scored the same: advantage 0
    ours = rl_math.group_advantages(rewards, 4, scale_rewards)
    _close(ours, trl_group_advantages(rewards, 4, scale_rewards))
    for start in range(0, 12, 4):
        group = rewards[start : start + 4].tolist()
        mean = sum(group) / 4
        group_std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        batch_std = float(np.std(rewards.numpy(), ddof=1))
        scale = {"group": group_std + 1e-4, "batch": batch_std + 1e-4, "none": 1.0}[scale_rewards]
        for i, r in enumerate(group):
            assert ours[start + i].item() == pytest.approx((r - mean) / scale, abs=1e-12)


def test_group_advantages_reject_uneven_groups():
    with pytest.raises(ValueError, match="groups of 4"):
        rl_math.group_advantages(torch.zeros(6, dtype=DT), 4)


@settings(max_examples=15, deadline=None)
@given(groups=st.integers(1, 4), group_size=st.integers(2, 6), length=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_grpo_pipeline_matches_trl_for_any_shape(groups, group_size, length, seed):
    batch = groups * group_size
    logps, old, _, _, mask = _rollout(seed, batch, length)
    rewards = torch.randn(batch, generator=torch.Generator().manual_seed(seed), dtype=DT)
    advantages = rl_math.group_advantages(rewards, group_size)
    _close(advantages, trl_group_advantages(rewards, group_size, "group"))
    ours, _ = rl_math.grpo_loss(logps, old, advantages, mask, loss_type="grpo")
    theirs, _ = trl_grpo(logps, old, advantages, mask, loss_type="grpo", epsilon_low=0.2,
                         epsilon_high=0.2)
    _close(ours, theirs)
    _close(_grad(ours, logps)[0], _grad(theirs, logps)[0])


def test_explained_variance_matches_numpy_reference():
    g = torch.Generator().manual_seed(0)
    returns = torch.randn(3, 5, generator=g, dtype=DT)
    values = returns + 0.5 * torch.randn(3, 5, generator=g, dtype=DT)
    mask = _right_padded_mask(0, 3, 5)
    kept = mask.bool().numpy()
    y, y_hat = returns.numpy()[kept], values.numpy()[kept]
    expected = 1 - np.var(y - y_hat) / np.var(y)
    _close(rl_math.explained_variance(values, returns, mask), expected)
    _close(rl_math.explained_variance(returns, returns, mask), 1.0)
    assert math.isnan(rl_math.explained_variance(values, torch.ones(3, 5, dtype=DT), mask))
