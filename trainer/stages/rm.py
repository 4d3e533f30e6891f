"""Reward modelling: a GPT backbone with a scalar head, Bradley–Terry loss on preference pairs
(optionally with the pairs' margin), reward accuracy and margin on train and held-out pairs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import check_range
from kiln.errors import ConfigError
from trainer.losses import reward_model_loss
from trainer.model import build_gpt_chunks
from trainer.reward_head import REWARD_HEAD, GPTRewardModel, sequence_rewards
from trainer.stages import Batch, LossOutput
from trainer.stages.chat_common import ChatOptions, per_sample
from trainer.stages.preference_common import TwoSequenceStage, halves


@dataclass
class RmOptions(ChatOptions):
    use_margin: bool = False  # subtract each pair's `margin` column (Llama 2)
    center_rewards_coefficient: float | None = None  # c · mean((r_w + r_l)²), keeps rewards near 0

    def check_values(self, prefix: str) -> None:
        if self.center_rewards_coefficient is not None:
            check_range(f"{prefix}center_rewards_coefficient", self.center_rewards_coefficient, 0)


class RewardModelStage(TwoSequenceStage):
    name = "rm"
    options = RmOptions
    new_weights = (REWARD_HEAD,)  # absent from a language-model checkpoint: initialised

    def setup(self) -> None:
        super().setup()
        if self.opts.use_margin and self.data.table.column("margin").null_count == len(self.data):
            raise ConfigError("rm.use_margin", f"{self.data.directory} has no margins (every "
                              "row's is null: pairs without scores); set it false")

    def build_model(self, padded_vocab_size: int) -> list[torch.nn.Module]:
        return build_gpt_chunks(self.cfg, padded_vocab_size, model_class=GPTRewardModel)

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        chosen, rejected = halves(sequence_rewards(output.float(), batch["loss_mask"]))
        margin = batch["margin"] if self.opts.use_margin else None
        loss, m = reward_model_loss(chosen, rejected, margin=margin,
                                    center_rewards_coefficient=self.opts.center_rewards_coefficient)
        metrics = {"reward_accuracy": m["accuracy"], "reward_margin": m["margin"],
                   "reward_mean": m["reward_mean"]}
        return per_sample(loss, metrics, chosen.shape[0])


STAGE = RewardModelStage
