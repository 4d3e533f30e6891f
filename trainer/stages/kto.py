"""KTO on unpaired examples: each example's log-ratio against the batch KL reference point z₀,
estimated on mismatched (prompt, other completion) pairs and averaged over data-parallel ranks
before clamping, as TRL gathers it. KL partners are fixed per row as TRL fixes them (see
`UnpairedStage`); reference log-probs come from the starting model (`kto.reference`: precomputed
once and stored, or online from a frozen copy of it each step; trainer/reference.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.config import check_range
from kiln.errors import ConfigError
from tensor_parallel import runtime
from trainer.losses import kto_kl_baseline, kto_loss
from trainer.stages import Batch
from trainer.stages.preference_common import ReferenceOptions, UnpairedStage, halves


@dataclass
class KtoOptions(ReferenceOptions):
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def check_values(self, prefix: str) -> None:
        check_range(f"{prefix}beta", self.beta, 0, open_low=True)
        for key in ("desirable_weight", "undesirable_weight"):
            check_range(f"{prefix}{key}", getattr(self, key), 0)
        if self.desirable_weight == self.undesirable_weight == 0:
            raise ConfigError(f"{prefix}desirable_weight", "and undesirable_weight are both 0: "
                              "nothing would be learned")


class KtoStage(UnpairedStage):
    name = "kto"
    options = KtoOptions
    uses_reference = True

    def objective(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None,
                  batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        (policy, policy_kl), (ref_logps, ref_kl) = halves(logps), halves(ref)
        b = policy.shape[0]
        # z₀ over the micro-batch of every DP rank (they run their micro-batches in lock step)
        total = torch.stack([kto_kl_baseline(policy_kl, ref_kl) * b,
                             torch.tensor(float(b), dtype=policy.dtype, device=policy.device)])
        runtime.dp_all_reduce(total)
        kl = total[0] / total[1]
        o = self.opts
        desirable = batch["label"]
        loss, m = kto_loss(policy, ref_logps, desirable, kl, beta=o.beta,
                           desirable_weight=o.desirable_weight,
                           undesirable_weight=o.undesirable_weight)
        # Per-example metrics with the same keys in every micro-batch: the signed reward relative
        # to z₀ (+ for desirable, - for undesirable), and whether it has the labelled sign.
        sign = desirable.to(policy.dtype) * 2 - 1
        signed = sign * o.beta * ((policy - ref_logps).detach() - m["kl"])
        return loss, {"kl": m["kl"], "reward_accuracy": (signed > 0).to(policy.dtype).mean(),
                      "reward_margin": signed.mean(), "logps": policy.detach().mean()}


STAGE = KtoStage
