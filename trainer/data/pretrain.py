"""Pretraining batches: megatron `GPTDataset`s over blended `.bin/.idx` shards, read in a fixed
order from a consumed-sample count so a resumed run sees exactly the samples it would have seen."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from kiln.errors import ConfigError, DataError
from kiln.log import get_logger
from trainer.data.manifest import TokenManifest, read_token_manifest

log = get_logger(__name__)


class _DatasetTokenizer:
    """The two facts `GPTDataset` needs from a tokenizer, taken from the manifest."""

    def __init__(self, vocab_size: int, eod: int) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        # part of megatron's dataset cache key
        self.unique_identifiers = {"class": "manifest", "vocab_size": vocab_size, "eod": eod}


@dataclass
class TokenData:
    train: GPTDataset
    valid: GPTDataset | None
    vocab_size: int
    fingerprint: str


def read_manifests(paths: list[str]) -> list[TokenManifest]:
    if not paths:
        raise ConfigError("data.manifests", "no token manifests given")
    manifests = [read_token_manifest(p) for p in paths]
    first = manifests[0]
    for m in manifests[1:]:
        if (m.fingerprint, m.vocab_size) != (first.fingerprint, first.vocab_size):
            raise DataError(f"tokenizer {m.fingerprint!r} (vocab {m.vocab_size}) differs from "
                            f"{first.path}'s {first.fingerprint!r} (vocab {first.vocab_size}); "
                            "blend only data tokenized the same way", path=m.path,
                            field="tokenizer.fingerprint")
    return manifests


def _blend(manifests: list[TokenManifest], weights: list[float] | None) -> tuple[list[str], list[float]]:
    """Shard prefixes and weights: a manifest's weight spread over its shards by token count."""
    if weights is not None and len(weights) != len(manifests):
        raise ConfigError("data.weights", f"{len(weights)} weights for {len(manifests)} manifests")
    prefixes, shard_weights = [], []
    for i, m in enumerate(manifests):
        total = sum(m.shard_tokens) or len(m.prefixes)
        for prefix, tokens in zip(m.prefixes, m.shard_tokens, strict=True):
            share = (tokens or 1) / total
            prefixes.append(prefix)
            shard_weights.append(share * (weights[i] if weights is not None else total))
    return prefixes, shard_weights


def build_token_data(manifest_paths: list[str], weights: list[float] | None, split: str, *,
                     seq_length: int, seed: int, train_samples: int, valid_samples: int,
                     cache_dir: str, eod_mask_loss: bool = False) -> TokenData:
    """Build the train and validation `GPTDataset`s (every rank builds; rank 0 writes the cache)."""
    manifests = read_manifests(manifest_paths)
    first = manifests[0]
    if eod_mask_loss and first.eod_id is None:
        raise ConfigError("data.eod_mask_loss", f"{first.path} names no tokenizer.eod_id")
    eod = first.eod_id if first.eod_id is not None else first.vocab_size
    prefixes, shard_weights = _blend(manifests, weights)
    os.makedirs(cache_dir, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, shard_weights),
        split=split, path_to_cache=cache_dir, tokenizer=_DatasetTokenizer(first.vocab_size, eod),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [train_samples, valid_samples, 0], lambda: True, config).build()
    if train is None:
        raise ConfigError("data.split", f"split {split!r} leaves no training data")
    log.info("data: %d shards from %d manifests; %d train / %s valid samples of %d tokens",
             len(prefixes), len(manifests), len(train), len(valid) if valid else 0, seq_length)
    return TokenData(train=train, valid=valid, vocab_size=first.vocab_size,
                     fingerprint=first.fingerprint)


def micro_batches(dataset: GPTDataset, *, start_sample: int, micro_batch_size: int, dp_rank: int,
                  dp_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches from global sample `start_sample` on.

    Global sample order is fixed; each group of `micro_batch_size × dp_size` consecutive samples
    is one micro-batch per DP rank (Megatron's pretraining sampler), so DP=2 reads exactly the
    samples that DP=1 with twice the accumulation reads.
    """
    index = start_sample
    while True:
        first = index + dp_rank * micro_batch_size
        samples = [dataset[(first + j) % len(dataset)] for j in range(micro_batch_size)]
        index += micro_batch_size * dp_size
        yield {
            "tokens": torch.stack([s["tokens"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
            "position_ids": torch.stack([s["position_ids"] for s in samples]),
        }
