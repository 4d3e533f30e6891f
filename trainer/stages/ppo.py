"""PPO (Ziegler et al. 2019; Ouyang et al. 2022) on the shared loop: a rollout from the policy,
per-token KL penalty to the frozen reference (fixed or adaptive β) plus the reward at the last
token, GAE advantages (whitened), then clipped policy and clipped value losses over `epochs`
passes of shuffled mini-batches, with an optional entropy bonus.

Actor and critic are one module (`trainer.value_head.GPTActorCritic`: the policy with a value
head on its trunk), so the loop's one optimizer, DDP and checkpoints cover both and a rollout
needs one scoring forward for log-probs and values. The critic is initialised from the policy
(its trunk) with a fresh head; the reward model is a separate frozen network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kiln.config import check_range
from tensor_parallel.vocab_parallel import vocab_parallel_entropy
from trainer.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    entropy_bonus,
    gae,
    kl_k1,
    masked_mean,
    ppo_policy_loss,
    ppo_value_loss,
)
from trainer.rollout import RolloutBatch, mask_padded_vocab, policy_logps
from trainer.stages import Batch, LossOutput
from trainer.stages.rl_common import RLStage, RolloutOptions
from trainer.value_head import VALUE_HEAD, GPTActorCritic


@dataclass
class PpoOptions(RolloutOptions):
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2  # ε of the policy ratio
    clip_range_value: float = 0.2  # ε of the value clip
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    kl_coef: float = 0.05  # β of the per-token KL penalty (initial β when adaptive)
    adaptive_kl: bool = False  # Ziegler et al.'s controller towards kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        for key in ("gamma", "lam"):
            check_range(f"{prefix}{key}", getattr(self, key), 0, 1)
        for key in ("clip_range", "clip_range_value"):
            check_range(f"{prefix}{key}", getattr(self, key), 0, open_low=True)
        for key in ("vf_coef", "kl_coef"):
            check_range(f"{prefix}{key}", getattr(self, key), 0)
        check_range(f"{prefix}entropy_coef", self.entropy_coef)
        if self.adaptive_kl:  # the controller divides by both
            check_range(f"{prefix}kl_target", self.kl_target, 0, open_low=True)
            check_range(f"{prefix}kl_horizon", self.kl_horizon, 1)


class PpoStage(RLStage):
    name = "ppo"
    options = PpoOptions
    policy_class = GPTActorCritic
    new_weights = (VALUE_HEAD,)  # absent from a language-model checkpoint: initialised

    def setup(self) -> None:
        super().setup()
        o = self.opts
        self.kl_ctl = (AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon)
                       if o.adaptive_kl else FixedKLController(o.kl_coef))

    def sharded_state_dict(self, per_rank: bool = True) -> dict[str, Any]:
        return {**super().sharded_state_dict(per_rank), "kl_coef": self.kl_ctl.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if not self.opts.adaptive_kl or "kl_coef" not in state:
            return  # a fixed β is the config's
        # β has taken the current rollout's KL. A rollout cut short that is sampled again (it
        # could not be restored) updates β once more: give it back the β it was scored with.
        again = state["steps_left"] > 0 and not self._minibatches
        self.kl_ctl.value = state["rollout_metrics"]["kl_coef"] if again else state["kl_coef"]

    def make_rollout(self, seqs: dict[str, torch.Tensor], scores: torch.Tensor,
                     policy: list[torch.Tensor], ref_logps: torch.Tensor) -> RolloutBatch:
        old_logps, old_values = policy
        mask = seqs["loss_mask"]
        rewards = token_rewards(scores, old_logps, ref_logps, mask, self.kl_ctl.value)
        advantages, returns = gae(rewards, old_values, mask, self.opts.gamma, self.opts.lam)
        if self.opts.whiten_advantages:  # rl_math.masked_whiten's maths with global moments
            mean, var, count = self.global_moments(advantages, mask)
            var *= count / max(count - 1.0, 1.0)
            advantages = (advantages - mean) * (var + 1e-8) ** -0.5 * mask
        return RolloutBatch(**seqs, scores=scores, old_logps=old_logps, ref_logps=ref_logps,
                            advantages=advantages, old_values=old_values * mask, returns=returns)

    def rollout_stats(self, r: RolloutBatch) -> dict[str, float]:
        stats = super().rollout_stats(r)
        _, var_returns, _ = self.global_moments(r.returns, r.loss_mask)
        _, var_error, _ = self.global_moments(r.returns - r.old_values, r.loss_mask)
        # rl_math.explained_variance over all DP ranks: 1 - Var[R - V] / Var[R]
        stats["explained_variance"] = 1.0 - var_error / var_returns if var_returns else math.nan
        stats["kl_coef"] = self.kl_ctl.value
        self.kl_ctl.update(stats["kl"], self.rollout_size)
        return stats

    def loss(self, output: tuple[torch.Tensor, torch.Tensor], batch: Batch) -> LossOutput:
        logits, values = output
        o = self.opts
        mask = batch["loss_mask"]
        logps = policy_logps(logits, batch["labels"], self.vocab_size(), o.temperature)
        policy_loss, metrics = ppo_policy_loss(logps, batch["old_logps"], batch["advantages"],
                                               mask, o.clip_range)
        value_loss, value_metrics = ppo_value_loss(values, batch["old_values"], batch["returns"],
                                                   mask, o.clip_range_value)
        with torch.set_grad_enabled(o.entropy_coef != 0.0 and torch.is_grad_enabled()):
            entropy = vocab_parallel_entropy(mask_padded_vocab(logits, self.vocab_size()),
                                             temperature=o.temperature)
        loss = policy_loss + o.vf_coef * value_loss + entropy_bonus(entropy, mask, o.entropy_coef)
        units = mask.sum()
        metrics.update(value_metrics, policy_loss=policy_loss, value_loss=value_loss,
                       entropy=masked_mean(entropy.detach(), mask))
        return loss * units, units.to(torch.int), self.with_rollout_metrics(metrics, units)


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor,
                  mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = -β (log π - log π_ref)_t on every generated token, plus the score on the last one."""
    rewards = -kl_coef * kl_k1(logps, ref_logps) * mask
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask > 0, positions, -1).amax(dim=1)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] += scores
    return rewards


STAGE = PpoStage
