"""ORPO: SFT on the chosen response plus an odds-ratio penalty; no reference model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import check_range
from trainer.losses import orpo_loss
from trainer.stages import Batch
from trainer.stages.chat_common import ChatOptions
from trainer.stages.preference_common import TwoSequenceStage, halves


@dataclass
class OrpoOptions(ChatOptions):
    beta: float = 0.1  # λ of the paper: weight of the odds-ratio term

    def check_values(self, prefix: str) -> None:
        check_range(f"{prefix}beta", self.beta, 0)  # 0: the SFT term alone


class OrpoStage(TwoSequenceStage):
    name = "orpo"
    options = OrpoOptions

    def objective(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None,
                  batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (chosen, rejected), (chosen_len, rejected_len) = halves(logps), halves(lengths)
        # token-mean NLL of the chosen responses in this micro-batch, as TRL's ORPOTrainer
        chosen_nll = -chosen.sum() / chosen_len.sum().clamp(min=1)
        return orpo_loss(chosen / chosen_len.clamp(min=1), rejected / rejected_len.clamp(min=1),
                         chosen_nll, beta=self.opts.beta)


STAGE = OrpoStage
