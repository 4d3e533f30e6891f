"""What every post-training stage shares: the checked Arrow shard set, its train/valid split,
data-parallel micro-batches as tensors, and per-token log-probs from vocab-parallel logits.

Data keys: `data.manifests` names one dataset directory (written by `kiln sft` or
`kiln preference`), `data.split` splits its rows in order into train/valid/test like pretraining,
and `<stage>.tokenizer` is the model's tokenizer (its directory, or the fingerprint itself):
shards made with another tokenizer are refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from kiln.errors import ConfigError
from kiln.log import get_logger
from tensor_parallel import runtime
from tensor_parallel.vocab_parallel import vocab_parallel_log_probs
from trainer.chat_data import Batch as ArrayBatch
from trainer.chat_data import DistributedSampler, ShardSet, kept_responses, trained_tokens
from trainer.stages import Batch, LossOutput, Stage

log = get_logger("trainer.stages")


@dataclass
class ChatOptions:
    # The model's tokenizer: a `kiln tokenizer` directory (its fingerprint.txt), a Hugging Face
    # tokenizer directory (e.g. CKPT/tokenizer from `kiln import-hf`: sha256 of tokenizer.json, as
    # the data jobs compute it), or the sha256 fingerprint. None: shards are not checked.
    tokenizer: str | None = None

    def check_values(self, prefix: str) -> None:
        """Each stage's bounds on its own options (kiln.config calls it when loading)."""


def expected_fingerprint(tokenizer: str | None, key: str) -> str | None:
    """The fingerprint `<stage>.tokenizer` (config key `key`) names, None when unset."""
    if tokenizer is None:
        return None
    path = os.path.join(tokenizer, "fingerprint.txt")
    hf_json = os.path.join(tokenizer, "tokenizer.json")
    if os.path.isdir(tokenizer):
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read().strip()
        if os.path.exists(hf_json):
            with open(hf_json, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
        raise ConfigError(key, f"{tokenizer} has neither fingerprint.txt (a `kiln tokenizer` "
                          "directory) nor tokenizer.json (Hugging Face); give the fingerprint")
    return tokenizer


def split_rows(n: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and validation parts of `data.split` ("95,5,0"), in order."""
    try:
        weights = [float(x) for x in split.split(",")]
    except ValueError:
        raise ConfigError("data.split", f"expected comma-separated weights, got {split!r}") from None
    weights += [0.0] * (3 - len(weights))
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError("data.split", f"expected up to three non-negative weights, got {split!r}")
    n_train = round(n * weights[0] / sum(weights))
    n_valid = round(n * weights[1] / sum(weights))
    return np.arange(n_train), np.arange(n_train, min(n_train + n_valid, n))


def to_tensors(batch: ArrayBatch, index: np.ndarray) -> Batch:
    """A collated numpy batch as tensors on this rank's device; `index` = dataset row of each
    sample (reference log-probs are looked up by it)."""
    device = runtime.device()
    out = {"tokens": batch.tokens, "labels": batch.labels, "loss_mask": batch.loss_mask,
           "position_ids": batch.position_ids, "index": index}
    if batch.attention_mask is not None:
        out["attention_mask"] = batch.attention_mask
    out.update(batch.extra or {})
    return {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in out.items()}


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log π(labels[b, t] | tokens[b, ≤t]) `[b, s]` (float32) from megatron's vocab-parallel
    logits `[b, s, V/TP]` (`GPTModel` without labels and `parallel_output=True`)."""
    return vocab_parallel_log_probs(logits, labels)


def per_sample(loss: torch.Tensor, metrics: dict[str, torch.Tensor], n: int) -> LossOutput:
    """A loss and metrics averaged over this micro-batch's `n` samples, as the loop's sums:
    the loop divides by the samples of the whole global batch (all micro-batches, DP ranks)."""
    count = torch.tensor(n, device=loss.device)
    return loss * n, count, {k: v.detach().double() * n for k, v in metrics.items()}


class ChatStage(Stage):
    """Reads one Arrow dataset directory; subclasses say which contracts and how to collate."""

    contracts: ClassVar[tuple[str, ...]]
    pad_id: ClassVar[int] = 0  # right padding: no real token attends to it, never a target

    @property
    def opts(self) -> Any:
        return getattr(self.cfg, self.name)

    def setup(self) -> None:
        cfg = self.cfg
        if len(cfg.data.manifests) != 1:
            raise ConfigError("data.manifests", f"stage {self.name} reads one dataset directory, "
                              f"got {len(cfg.data.manifests)}")
        key = f"{self.name}.tokenizer"
        fingerprint = expected_fingerprint(self.opts.tokenizer, key)
        if fingerprint is None and cfg.data.tokenizer_fingerprint:  # e.g. an import's model.yaml
            key, fingerprint = "data.tokenizer_fingerprint", cfg.data.tokenizer_fingerprint
        self.data = ShardSet(cfg.data.manifests[0], self.contracts, fingerprint,
                             fingerprint_key=key)
        self.train_rows, self.valid_rows = split_rows(len(self.data), cfg.data.split)
        self._leave_out_cut_rows()
        self.check_split_sizes()

    def check_split_sizes(self) -> None:
        """A split smaller than one global batch fails now, not when the last validation runs
        after the whole training."""
        gbs, n = self.cfg.train.global_batch_size, len(self.data)
        for name, rows in (("training", self.train_rows), ("validation", self.valid_rows)):
            if len(rows) < gbs and (len(rows) or name == "training"):
                raise ConfigError("data.split", f"{self.cfg.data.split!r} leaves {len(rows)} of "
                                  f"{n} rows for {name}, fewer than one global batch "
                                  f"(train.global_batch_size={gbs})")

    def trained_parts(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per part of a row that carries loss ("chosen responses"): each row's trained tokens,
        and those left when sequences are cut to train.seq_length. None of the prompt stages."""
        table, seq_len = self.data.table, self.cfg.train.seq_length
        names = self.data.table.column_names
        if "loss_mask" in names:
            return {"responses": trained_tokens(table.column("loss_mask"), seq_len)}
        parts = {"chosen_ids": "chosen responses", "rejected_ids": "rejected responses",
                 "completion_ids": "completions"}
        return {name: kept_responses(table.column("prompt_ids"), table.column(c), seq_len)
                for c, name in parts.items() if c in names}

    def _leave_out_cut_rows(self) -> None:
        """Say how many rows train.seq_length cuts, and leave out those with nothing left to
        train on: their loss would be a constant (DPO), undefined (ORPO's odds of an empty
        response) or a reward read off the prompt (RM)."""
        parts = self.trained_parts()
        if not parts:
            return
        seq_len, n = self.cfg.train.seq_length, len(self.data)
        cut = [f"{int(np.sum(kept < total))} of {n} {name}"
               for name, (total, kept) in parts.items() if np.any(kept < total)]
        empty = np.zeros(n, dtype=bool)
        for _, kept in parts.values():
            empty |= kept == 0
        if not cut and not empty.any():
            return
        train = self.train_rows[~empty[self.train_rows]]
        valid = self.valid_rows[~empty[self.valid_rows]]
        made = self.data.manifest.extra.get("config") or {}
        longest = (made.get("length") or {}).get("max_total_tokens") or made.get("max_seq_len")
        log.warning("train.seq_length=%d cuts %s (the data job's length limit: %s)%s", seq_len,
                    ", ".join(cut) or "no response", longest,
                    "" if not empty.any() else
                    f"; {int(empty.sum())} rows keep no trained token and are left out: "
                    f"{len(self.train_rows) - len(train)} of {len(self.train_rows)} train, "
                    f"{len(self.valid_rows) - len(valid)} of {len(self.valid_rows)} validation")
        if len(train) == 0:
            raise ConfigError("train.seq_length", f"{seq_len} leaves no training row with a "
                              "trained token: raise it, or remake the data with a shorter length policy")
        self.train_rows, self.valid_rows = train, valid

    def vocab_size(self) -> int:
        return self.cfg.model.vocab_size or int(self.data.manifest.tokenizer["vocab_size"])

    def seq_len(self) -> int | None:
        """Fixed length under pipeline parallelism (p2p buffers have one shape) and context
        parallelism (the length splits into 2·cp chunks; train.seq_length is checked for that),
        else dynamic."""
        layout = runtime.layout()
        return self.cfg.train.seq_length if layout.pp > 1 or layout.cp > 1 else None

    def collate(self, indices: np.ndarray) -> ArrayBatch:
        raise NotImplementedError

    def batch(self, indices: np.ndarray) -> Batch:
        return to_tensors(self.collate(indices), indices)

    def _sampler(self, rows: np.ndarray, start_sample: int, shuffle: bool) -> DistributedSampler:
        tr = self.cfg.train
        return DistributedSampler(len(rows), tr.global_batch_size, runtime.dp_rank(),
                                  runtime.dp_size(), tr.seed, shuffle=shuffle,
                                  consumed_samples=start_sample)

    def _micro_batches(self, rows: np.ndarray, local: np.ndarray) -> list[np.ndarray]:
        """Dataset rows of each micro-batch of this rank's share `local` of a global batch."""
        mb = self.cfg.train.micro_batch_size
        return [rows[local[k:k + mb]] for k in range(0, len(local), mb)]

    def _batches(self, rows: np.ndarray, start_sample: int, shuffle: bool) -> Iterator[Batch]:
        for local in self._sampler(rows, start_sample, shuffle):
            for indices in self._micro_batches(rows, local):
                yield self.batch(indices)

    def train_batches(self, start_sample: int) -> Iterator[Batch]:
        return self._batches(self.train_rows, start_sample, shuffle=True)

    def step_rows(self, consumed_samples: int) -> list[np.ndarray]:
        """Dataset rows of this DP rank's training micro-batches in the global batch after
        `consumed_samples` samples: what `train_batches` yields for that step, without it."""
        sampler = self._sampler(self.train_rows, 0, shuffle=True)
        return self._micro_batches(self.train_rows, sampler.global_batch(consumed_samples))

    def valid_batches(self) -> Iterator[Batch] | None:
        if len(self.valid_rows) == 0:
            return None
        return self._batches(self.valid_rows, 0, shuffle=False)

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """Logits `[b, s, V/TP]` on the last pipeline stage, hidden states elsewhere."""
        return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                     attention_mask=batch.get("attention_mask"))

    def tokens_in(self, batch: Batch) -> int:
        return int(batch["tokens"].numel())
