"""DPO and its variants (cDPO via label smoothing, IPO, hinge, robust) against the starting
model's log-probs (`dpo.reference`: precomputed once and stored, or online from a frozen copy of
it each step; trainer/reference.py); chosen and rejected in one forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from kiln.config import check_range
from kiln.errors import ConfigError
from trainer.losses import dpo_loss
from trainer.stages import Batch
from trainer.stages.preference_common import ReferenceOptions, TwoSequenceStage, halves


@dataclass
class DpoOptions(ReferenceOptions):
    beta: float = 0.1
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = 0.0  # cDPO ε (sigmoid), label-flip rate (robust)

    def check_values(self, prefix: str) -> None:
        check_range(f"{prefix}beta", self.beta, 0, open_low=True)
        if self.loss_type in ("ipo", "hinge") and self.label_smoothing != 0:
            raise ConfigError(f"{prefix}label_smoothing", f"loss_type={self.loss_type} has no "
                              "label smoothing (sigmoid: cDPO, robust: the flip rate)")
        # robust DPO divides by 1 - 2ε
        check_range(f"{prefix}label_smoothing", self.label_smoothing, 0, 0.5,
                    open_high=self.loss_type == "robust")


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
