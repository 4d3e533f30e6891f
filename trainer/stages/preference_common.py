"""What the preference stages (rm, dpo, orpo, simpo, kto) share: two sequences per sample in one
forward (`[2b, s]`: chosen rows then rejected rows, or examples then KL partners), per-sequence
log-probs from vocab-parallel logits, and the reference log-probs of the stages that use one.

A stage file then only states its options and its objective:
`objective(logps, lengths, ref, batch) -> (mean loss over the b samples, metrics)`, where
`logps`/`lengths` are `[2b]` summed response log-probs and response token counts, and `ref` is
the reference's `[2b]` (or None for reference-free stages).

Stages with `uses_reference` (dpo, kto) read `<stage>.reference`: `precomputed` (the starting
model scores every used row once before step 0; the values are stored beside the run) or
`online` (a frozen copy of the starting model scores each step's micro-batches just before it).
Both give the same losses; see trainer/reference.py for what each costs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import torch

from tensor_parallel import runtime
from trainer.chat_data import Batch as ArrayBatch
from trainer.chat_data import collate_preference, collate_unpaired, kl_partners
from trainer.losses import sequence_logps
from trainer.reference import (
    FILE,
    OnlineReference,
    Reference,
    RowScorer,
    StoredReference,
    frozen_reference,
    reference_identity,
)
from trainer.stages import Batch, LossOutput
from trainer.stages.chat_common import ChatOptions, ChatStage, per_sample, token_logps


@dataclass
class ReferenceOptions(ChatOptions):
    # precomputed: the starting model scores every used row before step 0 and the values are
    # stored; online: a frozen copy of it scores each step's micro-batches (nothing stored)
    reference: Literal["precomputed", "online"] = "precomputed"
    # where the precomputed reference log-probs live; None: <run_dir>/reference_logps.arrow
    reference_path: str | None = None


class TwoSequenceStage(ChatStage):
    """Samples of two sequences each (preference pairs by default); subclasses implement
    `objective`."""

    contracts = ("preference",)
    sequences_per_sample = 2
    # each CP rank sums its share of every sequence's log-probs and token counts, then
    # `runtime.cp_sum` makes them whole: the objectives see complete sequences
    context_parallel = True
    uses_reference: ClassVar[bool] = False
    reference_columns: ClassVar[tuple[str, str]] = ("chosen_logps", "rejected_logps")

    def setup(self) -> None:
        super().setup()
        self.partners = self.pairing()
        self.reference: Reference | None = None
        # the loop's data position: `train_batches` sets it (0, or where a resume starts) and
        # each `before_step` advances it by one global batch
        self._next_sample = 0
        if self.uses_reference and self.opts.reference == "precomputed":
            path = self.opts.reference_path or os.path.join(self.cfg.run_dir, FILE)
            ids = self.data.table.column("id").to_pylist()
            used = np.union1d(self.train_rows, self.valid_rows)  # only what is trained/validated
            identity = reference_identity(self.cfg, self.data.manifest.shards, used, self.partners)
            self.reference = StoredReference(self.scorer(), path, identity, ids,
                                             self.reference_columns, rows=used)

    def pairing(self) -> np.ndarray | None:
        """For each dataset row, the row whose completion is its second sequence; None when a
        row holds both of its sequences (preference pairs)."""
        return None

    def build_model(self, padded_vocab_size: int) -> list[torch.nn.Module]:
        model = super().build_model(padded_vocab_size)
        if self.uses_reference and self.opts.reference == "online":
            reference = frozen_reference(self.cfg, model, padded_vocab_size, new=self.new_weights)
            self.reference = OnlineReference(self.scorer(), len(self.data), reference)
            self.reference.score(self.valid_rows)  # the reference is frozen: once is enough
        return model

    def scorer(self) -> RowScorer:
        tr = self.cfg.train
        return RowScorer(self.batch, self.forward, self.sequence_logps, tr.micro_batch_size,
                         tr.seq_length)

    def collate(self, indices: np.ndarray) -> ArrayBatch:
        return collate_preference(self.data.rows(indices), self.seq_len(), self.pad_id,
                                  max_len=self.cfg.train.seq_length)

    def train_batches(self, start_sample: int) -> Iterator[Batch]:
        self._next_sample = start_sample
        return super().train_batches(start_sample)

    def before_step(self, step: int, model: list[torch.nn.Module]) -> None:
        position = self._next_sample
        self._next_sample += self.cfg.train.global_batch_size
        if self.reference is not None:
            self.reference.before_step(step, model, lambda: self.step_rows(position))

    def before_evaluate(self, step: int, model: list[torch.nn.Module]) -> None:
        if self.reference is not None:
            self.reference.before_evaluate(step, model)

    def sequence_logps(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Summed response log-probs of every sequence `[2b]` (over its context-parallel parts)."""
        return runtime.cp_sum(sequence_logps(token_logps(logits, batch["labels"]),
                                             batch["loss_mask"]))

    def objective(self, logps: torch.Tensor, lengths: torch.Tensor, ref: torch.Tensor | None,
                  batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        logps = self.sequence_logps(output, batch)
        lengths = runtime.cp_sum(batch["loss_mask"].sum(-1))
        ref = None
        if self.reference is not None:
            ref = self.reference.lookup(batch["index"]).T.reshape(-1).to(logps.dtype)  # [2b]
        loss, metrics = self.objective(logps, lengths, ref, batch)
        return per_sample(loss, metrics, len(batch["index"]))


class UnpairedStage(TwoSequenceStage):
    """KTO data: b examples, then each example's prompt with its KL partner's completion.

    Partners follow TRL's KTOTrainer, which fixes them per row when it prepares each split (the
    trainer then draws rows in shuffled order): within consecutive blocks of a split's rows in
    dataset order, row i takes row i-1's completion and a block's first row its last row's
    (`trainer.chat_data.kl_partners`). TRL's block is the per-device batch; here it is
    `micro_batch_size × DP size`, the examples whose KL terms one z₀ estimate averages (one
    micro-batch of every DP rank): the same as TRL's in one process, and layout-independent like
    z₀ (one rank × 2m rows pairs as two ranks × m). Fixed partners let the reference log-probs of
    the mismatched pairs be precomputed, and a split never borrows another split's completions.
    """

    contracts = ("unpaired",)
    reference_columns = ("completion_logps", "kl_logps")

    def pairing(self) -> np.ndarray:
        block = self.cfg.train.micro_batch_size * runtime.dp_size()
        partners = np.arange(len(self.data))
        for rows in (self.train_rows, self.valid_rows):
            partners[rows] = kl_partners(rows, block)
        return partners

    def collate(self, indices: np.ndarray) -> ArrayBatch:
        return collate_unpaired(self.data.rows(indices), self.data.rows(self.partners[indices]),
                                self.seq_len(), self.pad_id, max_len=self.cfg.train.seq_length)


def halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first b, last b) of a `[2b]` tensor: (chosen, rejected) or (examples, KL partners)."""
    b = x.shape[0] // 2
    return x[:b], x[b:]
