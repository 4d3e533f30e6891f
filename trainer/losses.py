"""Loss functions for SFT, reward modelling and the preference family (DPO/IPO/ORPO/SimPO/KTO).

Every function is pure tensor maths on per-sequence log-probabilities that the stage has already
computed (summed, or averaged over the response tokens where the method asks for it); nothing here
knows about models, ranks or micro-batches. Each returns ``(loss, metrics)``: ``loss`` is the
scalar to backpropagate, the mean over the pairs/examples of this micro-batch (except ``masked_nll``,
which returns a sum and a count so the trainer can normalise over accumulation and data parallelism),
and ``metrics`` holds detached scalar tensors named as in ``metrics.jsonl``.

The formulas and conventions follow TRL (checked value for value and gradient for gradient against
TRL's own code in ``tests/trainer/test_losses.py``); where TRL has changed between releases the
docstring says which behaviour is used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def sequence_logps(per_token_logps: Tensor, loss_mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or average) per-token log-probs over the masked response tokens: [B, T] -> [B]."""
    mask = loss_mask.to(per_token_logps.dtype)
    total = (per_token_logps * mask).sum(-1)
    if average:
        return total / mask.sum(-1).clamp(min=1.0)
    return total


def masked_nll(per_token_logps: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Token-level negative log-likelihood: (sum over loss tokens, number of loss tokens).

    The trainer divides the sum of sums by the sum of counts over every micro-batch of the step and
    every data-parallel rank, so each token weighs the same whatever the packing or padding.
    """
    mask = loss_mask.to(per_token_logps.dtype)
    return -(per_token_logps * mask).sum(), mask.sum()


def sft_loss(per_token_logps: Tensor, loss_mask: Tensor, num_tokens: Tensor | None = None
             ) -> tuple[Tensor, Metrics]:
    """Masked cross-entropy normalised by ``num_tokens`` (the global count; local count if None)."""
    # L = -(1/N) Σ_t m_t log π(y_t | y_<t)
    nll_sum, count = masked_nll(per_token_logps, loss_mask)
    denominator = count if num_tokens is None else num_tokens.to(nll_sum.dtype)
    loss = nll_sum / denominator.clamp(min=1.0)
    return loss, {"nll_sum": nll_sum.detach(), "num_tokens": count.detach()}


def preference_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Metrics:
    """Mean implicit rewards, accuracy (chosen strictly above rejected) and margin of a batch."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "reward_accuracy": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
    }


def dpo_sigmoid_losses(logits: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023); with ``label_smoothing`` = ε, conservative DPO (cDPO)."""
    # L = -(1-ε) log σ(β h) - ε log σ(-β h),  h = log π/π_ref(y_w) - log π/π_ref(y_l)
    return (-(1 - label_smoothing) * F.logsigmoid(beta * logits)
            - label_smoothing * F.logsigmoid(-beta * logits))


def ipo_losses(avg_logits: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17) on per-token averaged log-ratios, as TRL does."""
    # L = (h̄ - 1/(2τ))²,  h̄ = log-ratio difference with each side divided by its response length
    return (avg_logits - 1 / (2 * beta)) ** 2


def dpo_hinge_losses(logits: Tensor, beta: float) -> Tensor:
    """SLiC-style hinge loss on the DPO log-ratio difference (Zhao et al. 2023)."""
    # L = max(0, 1 - β h)
    return torch.relu(1 - beta * logits)


def robust_dpo_losses(logits: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024): unbiased under labels flipped with probability ε < 1/2."""
    # L = [-(1-ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε)
    return ((-(1 - label_smoothing) * F.logsigmoid(beta * logits)
             + label_smoothing * F.logsigmoid(-beta * logits)) / (1 - 2 * label_smoothing))


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """DPO-family loss on summed response log-probs, averaged over the pairs.

    ``loss_type``: ``sigmoid`` (``label_smoothing`` > 0 gives cDPO), ``ipo`` (needs the response
    lengths: TRL divides each log-ratio by its response's token count), ``hinge`` or ``robust``
    (``label_smoothing`` is the flip probability). The implicit rewards in the metrics are
    β·(log π - log π_ref) of the summed log-probs for every loss type, as TRL logs them.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {DPO_LOSS_TYPES}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    logits = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = dpo_sigmoid_losses(logits, beta, label_smoothing)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("IPO needs chosen_lengths and rejected_lengths (response token counts)")
        avg_logits = (chosen_logratios / chosen_lengths.to(logits.dtype).clamp(min=1.0)
                      - rejected_logratios / rejected_lengths.to(logits.dtype).clamp(min=1.0))
        losses = ipo_losses(avg_logits, beta)
    elif loss_type == "hinge":
        losses = dpo_hinge_losses(logits, beta)
    else:
        losses = robust_dpo_losses(logits, beta, label_smoothing)
    metrics = preference_metrics(beta * chosen_logratios, beta * rejected_logratios)
    metrics["logps_chosen"] = policy_chosen_logps.detach().mean()
    metrics["logps_rejected"] = policy_rejected_logps.detach().mean()
    return losses.mean(), metrics


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, switching form at -log 2 to avoid cancellation (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    chosen_nll: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """ORPO (Hong et al. 2024): SFT loss on chosen plus an odds-ratio penalty, no reference model.

    Log-probs are per-token averages over each response; ``chosen_nll`` is the SFT loss on the
    chosen sequences (TRL takes the token-mean cross-entropy over prompt and response).
    """
    # L = L_SFT - β log σ(log odds(y_w) - log odds(y_l)),  odds(y) = p / (1 - p),  p = exp(avg log π)
    log_odds = ((policy_chosen_avg_logps - policy_rejected_avg_logps)
                - (log1mexp(policy_chosen_avg_logps) - log1mexp(policy_rejected_avg_logps)))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    loss = chosen_nll - beta * log_sigmoid_odds.mean()
    metrics = preference_metrics(beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps)
    metrics["nll_loss"] = chosen_nll.detach()
    metrics["log_odds_ratio"] = log_sigmoid_odds.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    return loss, metrics


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Metrics]:
    """SimPO (Meng et al. 2024): length-normalised, reference-free, with target margin γ.

    ``gamma`` is the absolute margin γ of the paper (TRL's ``simpo_gamma``); log-probs are
    per-token averages over each response.
    """
    # L = -log σ(β/|y_w| log π(y_w|x) - β/|y_l| log π(y_l|x) - γ)
    logits = policy_chosen_avg_logps - policy_rejected_avg_logps - gamma / beta
    losses = dpo_sigmoid_losses(logits, beta, label_smoothing)
    metrics = preference_metrics(beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps)
    return losses.mean(), metrics


def kto_kl_baseline(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z₀: mean log-ratio on mismatched (prompt, other completion) pairs.

    Detached and not yet clamped: the stage averages it over data-parallel ranks first, as TRL
    gathers it before clamping; ``kto_loss`` clamps it at 0.
    """
    # z₀ ≈ mean_j [log π(y_j'|x_j) - log π_ref(y_j'|x_j)]
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Metrics]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples; ``desirable`` is a bool label per example.

    The loss is the mean over all examples of the weighted per-example losses.
    """
    # L = w_D (1 - σ(β(r - z₀))) for desirable, w_U (1 - σ(β(z₀ - r))) for undesirable, r = log π/π_ref
    desirable = desirable.to(torch.bool)
    kl = kl.detach().clamp(min=0)
    logratios = policy_logps - ref_logps
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    rewards = beta * logratios.detach()
    metrics: Metrics = {"kl": kl}
    if desirable.any():
        metrics["reward_chosen"] = rewards[desirable].mean()
        metrics["logps_chosen"] = policy_logps.detach()[desirable].mean()
    if (~desirable).any():
        metrics["reward_rejected"] = rewards[~desirable].mean()
        metrics["logps_rejected"] = policy_logps.detach()[~desirable].mean()
    if desirable.any() and (~desirable).any():
        metrics["reward_margin"] = metrics["reward_chosen"] - metrics["reward_rejected"]
    return losses.mean(), metrics


def reward_model_loss(
    rewards_chosen: Tensor,
    rewards_rejected: Tensor,
    *,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[Tensor, Metrics]:
    """Bradley–Terry pairwise loss with an optional per-pair margin (Llama 2) and reward centring."""
    # L = -log σ(r_w - r_l - m) + c · mean((r_w + r_l)²)
    diff = rewards_chosen - rewards_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((rewards_chosen + rewards_rejected) ** 2).mean()
    chosen, rejected = rewards_chosen.detach(), rewards_rejected.detach()
    metrics = {
        "accuracy": (chosen > rejected).to(chosen.dtype).mean(),
        "margin": (chosen - rejected).mean(),
        "reward_mean": torch.cat([chosen, rejected]).mean(),
    }
    return loss, metrics
