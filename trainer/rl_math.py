"""RL maths for PPO and GRPO: GAE, whitening, clipped objectives, KL estimators and controllers.

Pure tensor functions on per-token tensors of shape [B, T] with a response mask (1 on response
tokens, right padding). Log-probs are those of the sampled tokens; the KL estimators follow
Schulman's note "Approximating KL Divergence" with log r = log π_ref(y) - log π(y), y ~ π, so each
estimates KL(π ‖ π_ref) and is >= 0 in expectation. Conventions match TRL (checked against TRL's
code, or against a plain loop where TRL has no such function, in ``tests/trainer/test_rl_math.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is 1 (over ``dim``, or everything)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over the masked positions; Bessel-corrected by default, as TRL's ``masked_var``."""
    centered = values - masked_mean(values, mask)
    variance = masked_mean(centered**2, mask)
    if unbiased:
        count = mask.to(values.dtype).sum()
        if count < 2:
            raise ValueError(f"unbiased variance needs at least 2 unmasked values, got {int(count)}")
        variance = variance * count / (count - 1)
    return variance


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + 1e-8) with masked statistics; keeps the mean if not ``shift_mean``.

    Positions outside the mask are transformed too; callers zero them where it matters.
    """
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded sequences.

    ``rewards`` [B, T] are per-token (KL penalty plus the score on the last response token),
    ``values`` [B, T] are V(s_t). The episode ends after the last masked token, so V = 0 beyond
    it. Returns ``(advantages, returns)``, both zero outside the mask; returns = A + V.
    """
    # δ_t = r_t + γ V_{t+1} - V_t,   A_t = δ_t + γ λ A_{t+1}
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.size(1))):
        running = (deltas[:, t] + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                    clip_range: float = 0.2) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate (Schulman et al. 2017), token-mean over the masked tokens.

    Metrics: ``clip_frac`` (share of tokens where the clipped term is the active one),
    ``approx_kl`` (0.5·mean (log r)², over masked tokens only) and ``ratio_mean``.
    """
    # L = mean_t max(-A_t ρ_t, -A_t clip(ρ_t, 1-ε, 1+ε)),  ρ_t = π(y_t)/π_old(y_t)
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped > unclipped).to(logps.dtype), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return loss, metrics


def ppo_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                   clip_range_value: float = 0.2) -> tuple[Tensor, Metrics]:
    """Clipped value loss, 0.5 · token-mean of the larger squared error (TRL's ``cliprange_value``).

    The stage multiplies it by ``vf_coef``. Metric ``value_clip_frac``: share of tokens where the
    clipped error is the larger.
    """
    # L_V = ½ mean_t max((V_t - R_t)², (clip(V_t, V_old ± ε_v) - R_t)²)
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, {"value_clip_frac": clip_frac}


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Shannon entropy in nats of the softmax over the last axis: [..., V] -> [...]."""
    # H = -Σ_v p_v log p_v
    logps = F.log_softmax(logits, dim=-1)
    return -(logps.exp() * logps).sum(-1)


def entropy_bonus(per_token_entropy: Tensor, mask: Tensor, coef: float) -> Tensor:
    """Term to add to the loss for an entropy bonus: -coef · token-mean entropy."""
    # L_H = -c · mean_t H_t
    return -coef * masked_mean(per_token_entropy, mask)


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = -log r = log π - log π_ref: unbiased, high variance, can be negative per token."""
    return logps - ref_logps


def kl_k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = ½ (log r)²: biased, low variance, always >= 0."""
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = (r - 1) - log r: unbiased, low variance, always >= 0 (GRPO's per-token KL)."""
    log_ratio = ref_logps - logps
    return torch.exp(log_ratio) - 1 - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


class FixedKLController:
    """A constant KL coefficient β."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """Keep β unchanged."""


class AdaptiveKLController:
    """Adaptive β (Ziegler et al. 2019, §2.2): steer the observed KL towards ``target``."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """β ← β · (1 + K_β · e · n_steps), e = clip(KL/target - 1, ±0.2), K_β = 1/horizon."""
        proportional_error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value *= 1 + proportional_error * n_steps / self.horizon


def group_advantages(rewards: Tensor, group_size: int, scale_rewards: str = "group",
                     eps: float = 1e-4) -> Tensor:
    """GRPO advantages (Shao et al. 2024): reward minus its prompt group's mean, over a std.

    ``rewards`` [N] hold each prompt's ``group_size`` completions contiguously. ``scale_rewards``:
    ``group`` divides by the group's std, ``batch`` by the whole batch's std (PPO-Lite), ``none``
    does not scale (Dr. GRPO). Std is unbiased and ``eps`` is added to it, as in TRL.
    """
    # Â_i = (r_i - mean(r_group)) / (std(r_group) + ε)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; expected one of {SCALE_REWARDS}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1)
    elif scale_rewards == "batch":
        std = rewards.std()
    else:
        return advantages
    return advantages / (std + eps)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    loss_type: str = "bnpo",
    max_completion_length: int | None = None,
    num_tokens: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """GRPO clipped objective with optional k3 KL penalty (β) to the reference policy.

    ``advantages`` are per sequence [B] (or per token [B, T]). Aggregation (``loss_type``):
    ``bnpo`` (default) sums token losses and divides by the number of response tokens — the local
    count, or ``num_tokens`` when the stage passes the global count of the step (DAPO's
    normalisation), so every token weighs the same and there is no length bias; ``grpo`` averages
    within each sequence then over sequences (the paper; biased towards short correct answers);
    ``dr_grpo`` divides by B · ``max_completion_length`` (Dr. GRPO).
    """
    # L = agg_t [ -min(ρ_t Â, clip(ρ_t, 1-ε_low, 1+ε_high) Â) + β k3_t ]
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {GRPO_LOSS_TYPES}")
    if epsilon_high is None:
        epsilon_high = epsilon_low
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    metrics: Metrics = {}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo_loss with beta != 0 needs ref_logps")
        per_token_kl = kl_k3(logps, ref_logps)
        per_token_loss = per_token_loss + beta * per_token_kl
        metrics["kl"] = masked_mean(per_token_kl.detach(), mask)
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        count = mask.sum() if num_tokens is None else num_tokens.to(mask.dtype)
        loss = (per_token_loss * mask).sum() / count.clamp(min=1.0)
    else:
        if max_completion_length is None:
            raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    with torch.no_grad():
        low = ((ratio < 1 - epsilon_low) & (advantages < 0)).to(mask.dtype)
        high = ((ratio > 1 + epsilon_high) & (advantages > 0)).to(mask.dtype)
        metrics["clip_ratio_low"] = masked_mean(low, mask)
        metrics["clip_ratio_high"] = masked_mean(high, mask)
        metrics["clip_ratio_region"] = masked_mean(torch.maximum(low, high), mask)
    return loss, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[R - V] / Var[R] over masked tokens: 1 is a perfect critic, <= 0 a useless one."""
    var_returns = masked_var(returns, mask, unbiased=False)
    ratio = masked_var(returns - values, mask, unbiased=False) / var_returns
    # NaN rather than ±inf when the returns are constant (no variance to explain); no host sync.
    return torch.where(var_returns == 0, torch.full_like(ratio, math.nan), 1 - ratio)
