"""GRPO (Shao et al. 2024) on the shared loop: `samples_per_prompt` completions per prompt,
advantages normalised within each prompt's group, the clipped objective, and an optional k3 KL
penalty (β) to the frozen reference. No critic: the policy is a plain `GPTModel`.

Rewards from a reward model or a rule (`reward_function`), for verifiable tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from megatron.core.models.gpt import GPTModel

from kiln.config import check_range
from kiln.errors import ConfigError
from tensor_parallel.vocab_parallel import vocab_parallel_entropy
from trainer.rl_math import group_advantages, grpo_loss, masked_mean
from trainer.rollout import RolloutBatch, mask_padded_vocab, policy_logps
from trainer.stages import Batch, LossOutput
from trainer.stages.rl_common import RLStage, RolloutOptions


@dataclass
class GrpoOptions(RolloutOptions):
    samples_per_prompt: int = 4  # the group size
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low (DAPO's clip-higher when larger)
    beta: float = 0.04  # k3 KL penalty coefficient; 0: no KL term in the loss
    loss_type: Literal["bnpo", "grpo", "dr_grpo"] = "bnpo"  # token mean | sequence mean | Dr. GRPO
    # divide by the group's std | the DP rank's rollout std | nothing (Dr. GRPO)
    scale_rewards: Literal["group", "batch", "none"] = "group"

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_range(f"{prefix}epsilon_low", self.epsilon_low, 0, 1, open_low=True, open_high=True)
        if self.epsilon_high is not None:
            check_range(f"{prefix}epsilon_high", self.epsilon_high, 0, open_low=True)
        check_range(f"{prefix}beta", self.beta, 0)


class GrpoStage(RLStage):
    name = "grpo"
    options = GrpoOptions
    policy_class = GPTModel

    def setup(self) -> None:
        if self.opts.samples_per_prompt < 2:
            raise ConfigError("grpo.samples_per_prompt", "a group needs at least 2 completions")
        super().setup()

    def make_rollout(self, seqs: dict[str, torch.Tensor], scores: torch.Tensor,
                     policy: list[torch.Tensor], ref_logps: torch.Tensor) -> RolloutBatch:
        [old_logps] = policy
        advantages = group_advantages(scores, self.opts.samples_per_prompt,
                                      self.opts.scale_rewards)
        return RolloutBatch(**seqs, scores=scores, old_logps=old_logps, ref_logps=ref_logps,
                            advantages=advantages)

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        o = self.opts
        mask = batch["loss_mask"]
        logps = policy_logps(output, batch["labels"], self.vocab_size(), o.temperature)
        loss, metrics = grpo_loss(logps, batch["old_logps"], batch["advantages"], mask,
                                  epsilon_low=o.epsilon_low, epsilon_high=o.epsilon_high,
                                  beta=o.beta, ref_logps=batch["ref_logps"],
                                  loss_type=o.loss_type, max_completion_length=o.max_new_tokens)
        # bnpo averages over tokens; grpo and dr_grpo over sequences
        units = mask.sum() if o.loss_type == "bnpo" else torch.tensor(
            float(mask.shape[0]), device=mask.device)
        with torch.no_grad():
            entropy = vocab_parallel_entropy(mask_padded_vocab(output, self.vocab_size()),
                                             temperature=o.temperature)
            metrics["entropy"] = masked_mean(entropy, mask)
            metrics["approx_kl"] = 0.5 * masked_mean((logps - batch["old_logps"]) ** 2, mask)
        metrics["clip_frac"] = metrics.pop("clip_ratio_region")
        if "kl" in metrics:  # `kl` is the rollout's (as in PPO); this is the penalty's k3 mean
            metrics["kl_k3"] = metrics.pop("kl")
        return loss * units, units.to(torch.int), self.with_rollout_metrics(metrics, units)


STAGE = GrpoStage
