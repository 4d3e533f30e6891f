"""DPO and its variants (cDPO via label smoothing, IPO, hinge, robust) against the starting
model's log-probs (`dpo.reference`: precomputed once and stored, or online from a frozen copy of
it each step; trainer/reference.py); chosen and rejected in one forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.losses import dpo_loss
from trainer.stages import Batch
from trainer.stages.preference_common import ReferenceOptions, TwoSequenceStage, halves


@dataclass
class DpoOptions(ReferenceOptions):
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | robust
    label_smoothing: float = 0.0  # cDPO ε (sigmoid), label-flip rate (robust)


class DpoStage(TwoSequenceStage):
    name = "dpo"
    options = DpoOptions
    uses_reference = True

    def objective(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None,
                  batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.opts
        (chosen, rejected), (ref_chosen, ref_rejected) = halves(logps), halves(ref)
        chosen_len, rejected_len = halves(lengths)
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=o.beta,
                        loss_type=o.loss_type, label_smoothing=o.label_smoothing,
                        chosen_lengths=chosen_len, rejected_lengths=rejected_len)


STAGE = DpoStage
