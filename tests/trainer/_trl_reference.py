"""Run TRL's own loss code on given log-probs, as the independent reference for our losses.

TRL 1.16 (installed, pinned) computes most losses inline in trainer methods that expect a model and
a batch. We call those real methods unbound, with ``self`` a plain namespace holding only the
attributes the method reads (beta, loss_type, ...; an accelerator whose gather is the identity, as
on one process) and ``model`` a callable that returns the output fields the method reads
(``log_probs`` per token, or ``logits`` for the reward head) taken from tensors we choose. Only
the model forward is replaced; every line of loss and metric arithmetic that runs is TRL's.

Where TRL 1.16 no longer has the code, see the two notes below (cDPO and ``masked_whiten``).
"""

from __future__ import annotations

import inspect
import textwrap
import types
from collections import defaultdict
from types import SimpleNamespace

import torch
from torch import Tensor
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.reward_trainer import RewardTrainer
from trl.trainer.utils import nanstd

CPU = torch.device("cpu")


class _Accelerator:
    """One process: gathers and reductions are the identity."""

    device = CPU
    num_processes = 1
    process_index = 0
    sync_gradients = True

    def gather(self, tensor: Tensor) -> Tensor:
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor: Tensor, reduction: str = "sum") -> Tensor:
        return tensor


def _trainer_self(**attributes) -> SimpleNamespace:
    """The minimal ``self`` for an unbound TRL trainer method, in training mode."""
    return SimpleNamespace(
        accelerator=_Accelerator(),
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        aux_loss_enabled=False,
        **attributes,
    )


def _causal_lm_outputs(per_token_logps: Tensor) -> SimpleNamespace:
    """What TRL's fused LM head returns; only ``log_probs`` feeds the loss, the rest is logged."""
    return SimpleNamespace(
        log_probs=per_token_logps,
        entropy=torch.zeros_like(per_token_logps),
        mean_logits=torch.zeros_like(per_token_logps),
        is_top1=torch.zeros_like(per_token_logps, dtype=torch.bool),
    )


def _full_mask(shift_mask: Tensor) -> Tensor:
    """Completion mask over the input positions, from the mask over predicted positions [B, T-1]."""
    return torch.cat([torch.zeros_like(shift_mask[:, :1]), shift_mask], dim=1)


def trl_dpo(per_token_logps: Tensor, shift_mask: Tensor, ref_chosen_logps: Tensor,
            ref_rejected_logps: Tensor, *, beta: float, loss_type: str,
            label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``DPOTrainer._compute_loss`` on per-token policy log-probs [2B, T-1], chosen first.

    ``shift_mask`` marks the response tokens; the reference log-probs are precomputed sequences.
    """
    completion_mask = _full_mask(shift_mask)
    inputs = {
        "input_ids": torch.zeros_like(completion_mask, dtype=torch.long),
        "attention_mask": torch.ones_like(completion_mask, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_chosen_logps,
        "ref_rejected_logps": ref_rejected_logps,
    }
    trainer = _trainer_self(
        beta=beta, loss_types=[loss_type], loss_weights=[1.0], label_smoothing=label_smoothing,
        ld_alpha=None, f_divergence_type="reverse_kl", precompute_ref_logps=True,
        use_weighting=False,
    )

    def model(**kwargs) -> SimpleNamespace:
        return _causal_lm_outputs(per_token_logps * shift_mask)

    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_cdpo(per_token_logps: Tensor, shift_mask: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, *, beta: float, label_smoothing: float) -> Tensor:
    """Conservative DPO as TRL computes it, pair by pair.

    TRL 1.16 dropped ``label_smoothing`` from the ``sigmoid`` loss (its DPOConfig documents it for
    ``robust`` and ``exo_pair`` only); the cDPO expression
    ``-logσ(βh)(1-ε) - logσ(-βh)ε`` that TRL <= 0.19 used for ``sigmoid`` survives in its ``aot``
    loss, which applies it to the batch-sorted log-ratios. Called on one pair at a time the sort is
    the identity, so ``aot`` on a single pair is TRL's cDPO loss of that pair; the batch loss is
    the mean over pairs.
    """
    num_pairs = ref_chosen_logps.size(0)
    losses = []
    for i in range(num_pairs):
        rows = torch.tensor([i, num_pairs + i])
        loss, _ = trl_dpo(per_token_logps[rows], shift_mask[rows], ref_chosen_logps[i : i + 1],
                          ref_rejected_logps[i : i + 1], beta=beta, loss_type="aot",
                          label_smoothing=label_smoothing)
        losses.append(loss)
    return torch.stack(losses).mean()


def trl_orpo(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, chosen_nll: Tensor, *,
             beta: float) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``ORPOTrainer.get_batch_loss_metrics`` (with its ``odds_ratio_loss``).

    ``concatenated_forward`` (the model forward) returns the given per-token-averaged log-probs
    and chosen NLL.
    """
    trainer = _trainer_self(beta=beta)
    dummy_logits = torch.zeros(1, 1, 1)
    trainer.concatenated_forward = lambda model, batch: (
        chosen_avg_logps, rejected_avg_logps, dummy_logits, dummy_logits, chosen_nll)
    trainer.odds_ratio_loss = types.MethodType(ORPOTrainer.odds_ratio_loss, trainer)
    return ORPOTrainer.get_batch_loss_metrics(trainer, None, {})


def trl_simpo(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float, gamma: float,
              label_smoothing: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``CPOTrainer.get_batch_loss_metrics`` with ``loss_type="simpo"``, ``cpo_alpha=0``."""
    trainer = _trainer_self(beta=beta, loss_type="simpo", simpo_gamma=gamma,
                            label_smoothing=label_smoothing, alpha=0.0, cpo_alpha=0.0)
    dummy_logits = torch.zeros(1, 1, 1)
    trainer.concatenated_forward = lambda model, batch: (
        chosen_avg_logps, rejected_avg_logps, dummy_logits, dummy_logits, torch.zeros(()))
    trainer.cpo_loss = types.MethodType(CPOTrainer.cpo_loss, trainer)
    return CPOTrainer.get_batch_loss_metrics(trainer, None, {})


def trl_kto(per_token_logps: Tensor, shift_mask: Tensor, kl_per_token_logps: Tensor,
            kl_shift_mask: Tensor, ref_logps: Tensor, ref_kl_logps: Tensor, labels: Tensor, *,
            beta: float, desirable_weight: float, undesirable_weight: float
            ) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``KTOTrainer._compute_loss`` (and its ``_compute_kl_logps``).

    The model returns ``per_token_logps`` for the examples and ``kl_per_token_logps`` for the
    mismatched (prompt, other completion) sequences; reference log-probs are precomputed.
    """
    batch = {
        "label": labels,
        "input_ids": torch.zeros_like(_full_mask(shift_mask), dtype=torch.long),
        "attention_mask": torch.ones_like(_full_mask(shift_mask), dtype=torch.long),
        "completion_mask": _full_mask(shift_mask),
        "KL_input_ids": torch.zeros_like(_full_mask(kl_shift_mask), dtype=torch.long),
        "KL_attention_mask": torch.ones_like(_full_mask(kl_shift_mask), dtype=torch.long),
        "KL_completion_mask": _full_mask(kl_shift_mask),
        "ref_logps": ref_logps,
        "ref_KL_logps": ref_kl_logps,
    }
    trainer = _trainer_self(beta=beta, loss_type="kto", calculate_KL=True,
                            precompute_ref_logps=True, desirable_weight=desirable_weight,
                            undesirable_weight=undesirable_weight)
    trainer._compute_kl_logps = types.MethodType(KTOTrainer._compute_kl_logps, trainer)

    def model(**kwargs) -> SimpleNamespace:
        if kwargs["input_ids"] is batch["KL_input_ids"]:
            return _causal_lm_outputs(kl_per_token_logps * kl_shift_mask)
        return _causal_lm_outputs(per_token_logps * shift_mask)

    loss = KTOTrainer._compute_loss(trainer, model, batch, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_reward(rewards_chosen: Tensor, rewards_rejected: Tensor, *, margin: Tensor | None,
               center_rewards_coefficient: float | None) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``RewardTrainer.compute_loss``; the model's scalar head returns the given rewards."""
    trainer = _trainer_self(args=SimpleNamespace(center_rewards_coefficient=center_rewards_coefficient))
    inputs = {"attention_mask": torch.ones(2 * rewards_chosen.size(0), 3, dtype=torch.long)}
    if margin is not None:
        inputs["margin"] = margin

    def model(**kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=torch.cat([rewards_chosen, rewards_rejected]).unsqueeze(-1))

    loss = RewardTrainer.compute_loss(trainer, model, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def trl_grpo(per_token_logps: Tensor, old_per_token_logps: Tensor, advantages: Tensor,
             completion_mask: Tensor, *, loss_type: str, epsilon_low: float, epsilon_high: float,
             beta: float = 0.0, ref_per_token_logps: Tensor | None = None,
             max_completion_length: int | None = None, entropies: Tensor | None = None,
             entropy_coef: float = 0.0) -> tuple[Tensor, dict[str, float]]:
    """TRL 1.16 ``GRPOTrainer._compute_loss``; the model forward returns the given log-probs.

    ``advantages`` may be [B] (GRPO) or [B, T] (TRL accepts per-token advantages), which makes the
    ``bnpo`` loss the PPO clipped surrogate with a token mean.
    """
    batch_size, length = per_token_logps.shape
    entropy_on = entropies is not None
    entropies = torch.zeros_like(per_token_logps) if entropies is None else entropies
    trainer = _trainer_self(
        loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high, beta=beta,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        use_vllm=False, current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length, _entropy_bonus_enabled=entropy_on,
        use_adaptive_entropy=False, entropy_coef=entropy_coef,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None),
    )
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (
        per_token_logps, entropies, None)
    inputs = {
        "prompt_ids": torch.zeros(batch_size, 1, dtype=torch.long),
        "prompt_mask": torch.ones(batch_size, 1, dtype=torch.long),
        "completion_ids": torch.zeros(batch_size, length, dtype=torch.long),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "old_per_token_logps": old_per_token_logps,
    }
    if ref_per_token_logps is not None:
        inputs["ref_per_token_logps"] = ref_per_token_logps
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def _grpo_advantage_block() -> str:
    """The lines of ``GRPOTrainer._generate_and_score_completions`` that turn rewards into advantages.

    The computation is inline in a method that also generates and scores completions, so we run
    exactly those source lines (from the group mean to the division by the std) on our rewards.
    """
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions).splitlines()
    start = next(i for i, line in enumerate(source)
                 if "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations)" in line)
    end = next(i for i, line in enumerate(source)
               if i > start and "advantages = advantages / (std_rewards + 1e-4)" in line)
    return textwrap.dedent("\n".join(source[start : end + 1]))


def trl_group_advantages(rewards: Tensor, num_generations: int, scale_rewards: str) -> Tensor:
    """Advantages from TRL 1.16's own GRPO advantage lines (single objective, one process)."""
    namespace = {"torch": torch, "nanstd": nanstd, "rewards": rewards,
                 "num_generations": num_generations,
                 "self": SimpleNamespace(scale_rewards=scale_rewards)}
    exec(compile(_grpo_advantage_block(), "trl-grpo-advantages", "exec"), namespace)
    return namespace["advantages"]


# TRL removed ``masked_mean``/``masked_var``/``masked_whiten`` (its PPO utilities) after 0.19; the
# three functions below are copied verbatim from trl 0.19.1, ``trl/core.py`` (wheel
# trl-0.19.1-py3-none-any.whl on PyPI, sha256
# 8a2d4277b4ba7221eaab545a35ee89b6fbb8721fa3709ac01876a8c1bd7fd78a), Copyright 2020-2025 The
# HuggingFace Team, Apache License
# 2.0 (http://www.apache.org/licenses/LICENSE-2.0). Only the ``Optional`` annotation is modernised.


def trl019_masked_mean(values: torch.Tensor, mask: torch.Tensor, axis: bool | None = None) -> torch.Tensor:
    """Compute mean of tensor with a masked values."""
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    else:
        return (values * mask).sum() / mask.sum()


def trl019_masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Compute variance of tensor with masked values."""
    mean = trl019_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl019_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        if mask_sum == 0:
            raise ValueError(
                "The sum of the mask is zero, which can happen when `mini_batch_size=1`;"
                "try increase the `mini_batch_size` or `gradient_accumulation_steps`"
            )
        # note that if mask_sum == 1, then there is a division by zero issue
        # to avoid it you just need to use a larger minibatch_size
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl019_masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten values with masked values."""
    mean, var = trl019_masked_mean(values, mask), trl019_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened
