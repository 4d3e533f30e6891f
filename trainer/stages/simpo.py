"""SimPO: length-normalised log-probs with a target margin γ; no reference model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import check_range
from trainer.losses import simpo_loss
from trainer.stages import Batch
from trainer.stages.chat_common import ChatOptions
from trainer.stages.preference_common import TwoSequenceStage, halves


@dataclass
class SimpoOptions(ChatOptions):
    beta: float = 2.0
    gamma: float = 0.5  # absolute target margin γ (TRL's simpo_gamma)
    label_smoothing: float = 0.0

    def check_values(self, prefix: str) -> None:
        check_range(f"{prefix}beta", self.beta, 0, open_low=True)
        check_range(f"{prefix}gamma", self.gamma)
        check_range(f"{prefix}label_smoothing", self.label_smoothing, 0, 0.5)


class SimpoStage(TwoSequenceStage):
    name = "simpo"
    options = SimpoOptions

    def objective(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None,
                  batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        avg = logps / lengths.clamp(min=1)
        chosen, rejected = halves(avg)
        o = self.opts
        return simpo_loss(chosen, rejected, beta=o.beta, gamma=o.gamma,
                          label_smoothing=o.label_smoothing)


STAGE = SimpoStage
