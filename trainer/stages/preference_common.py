"""What the preference stages (rm, dpo, orpo, simpo, kto) share: two sequences per sample in one
forward (`[2b, s]`: chosen rows then rejected rows, or examples then KL partners), per-sequence
log-probs from vocab-parallel logits, and the precomputed reference log-probs.

A stage file then only states its options and its objective:
`objective(logps, lengths, ref, batch) -> (mean loss over the b samples, metrics)`, where
`logps`/`lengths` are `[2b]` summed response log-probs and response token counts, and `ref` is
the reference's `[2b]` (or None for reference-free stages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from trainer.chat_data import Batch as ArrayBatch
from trainer.chat_data import collate_preference, collate_unpaired
from trainer.losses import sequence_logps
from trainer.reference import FILE, ReferenceLogps, reference_identity
from trainer.stages import Batch, LossOutput
from trainer.stages.chat_common import ChatOptions, ChatStage, per_sample, token_logps


@dataclass
class ReferenceOptions(ChatOptions):
    # where the precomputed reference log-probs live; None: <run_dir>/reference_logps.arrow
    reference_path: str | None = None


class TwoSequenceStage(ChatStage):
    """Samples of two sequences each (preference pairs by default); subclasses implement
    `objective`."""

    contracts = ("preference",)
    sequences_per_sample = 2
    uses_reference: ClassVar[bool] = False
    reference_columns: ClassVar[tuple[str, str]] = ("chosen_logps", "rejected_logps")

    def setup(self) -> None:
        super().setup()
        self.reference: ReferenceLogps | None = None
        if self.uses_reference:
            path = self.opts.reference_path or os.path.join(self.cfg.run_dir, FILE)
            ids = self.data.table.column("id").to_pylist()
            used = np.union1d(self.train_rows, self.valid_rows)  # only what is trained/validated
            self.reference = ReferenceLogps(
                path, reference_identity(self.cfg, self.data.manifest.shards, used), ids,
                self.reference_columns, rows=used)

    def collate(self, indices: np.ndarray) -> ArrayBatch:
        return collate_preference(self.data.rows(indices), self.seq_len(), self.pad_id,
                                  max_len=self.cfg.train.seq_length)

    def before_step(self, step: int, model: list[torch.nn.Module]) -> None:
        if self.reference is not None:
            self.reference.ensure(step, model, self.batch, self.forward, self.sequence_logps,
                                  self.cfg.train.micro_batch_size, self.cfg.train.seq_length)

    def sequence_logps(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed response log-probs of every sequence `[2b]`."""
        return sequence_logps(token_logps(logits, batch["labels"]), batch["loss_mask"])

    def objective(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None,
                  batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        logps = self.sequence_logps(output, batch)
        lengths = batch["loss_mask"].sum(-1)
        ref = None
        if self.reference is not None:
            ref = self.reference.lookup(batch["index"]).T.reshape(-1).to(logps.dtype)  # [2b]
        loss, metrics = self.objective(logps, lengths, ref, batch)
        return per_sample(loss, metrics, len(batch["index"]))


class UnpairedStage(TwoSequenceStage):
    """KTO data: b examples, then each example's prompt with its KL partner's completion (the
    next row of the dataset, fixed so that reference log-probs can be precomputed)."""

    contracts = ("unpaired",)
    reference_columns = ("completion_logps", "kl_logps")

    def collate(self, indices: np.ndarray) -> ArrayBatch:
        partners = (indices + 1) % len(self.data)
        return collate_unpaired(self.data.rows(indices), self.data.rows(partners), self.seq_len(),
                                self.pad_id, max_len=self.cfg.train.seq_length)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first b, last b) of a `[2b]` tensor: (chosen, rejected) or (examples, KL partners)."""
    b = x.shape[0] // 2
    return x[:b], x[b:]
