"""Pretraining batches: megatron `GPTDataset`s over blended `.bin/.idx` shards, read in a fixed
order from a consumed-sample count so a resumed run sees exactly the samples it would have seen."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from kiln.errors import ConfigError, DataError
from kiln.log import get_logger
from trainer.config import locate
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


def read_manifests(paths: list[str], fingerprint: str | None = None) -> list[TokenManifest]:
    """The manifests, checked to share one tokenizer (and to match `fingerprint` when given)."""
    if not paths:
        raise ConfigError("data.manifests", "no token manifests given")
    manifests = [read_token_manifest(locate(p)) for p in paths]
    for m in manifests:
        if fingerprint is not None and m.fingerprint != fingerprint:
            raise DataError(f"tokenizer fingerprint {m.fingerprint!r} does not match "
                            f"data.tokenizer_fingerprint {fingerprint!r}: re-tokenize this data "
                            "with the model's tokenizer or fix the config", path=m.path,
                            field="tokenizer.fingerprint")
    first = manifests[0]
    for m in manifests[1:]:
        if (m.fingerprint, m.vocab_size) != (first.fingerprint, first.vocab_size):
            raise DataError(f"tokenizer {m.fingerprint!r} (vocab {m.vocab_size}) differs from "
                            f"{first.path}'s {first.fingerprint!r} (vocab {first.vocab_size}); "
                            "blend only data tokenized the same way", path=m.path,
                            field="tokenizer.fingerprint")
    return manifests


def _blend(manifests: list[TokenManifest], weights: list[float] | None
           ) -> tuple[list[str], list[float], list[int]]:
    """Shard prefixes, weights (a manifest's weight spread over its shards by token count) and
    document counts."""
    if weights is not None and len(weights) != len(manifests):
        raise ConfigError("data.weights", f"{len(weights)} weights for {len(manifests)} manifests")
    if weights is not None and (not all(math.isfinite(w) and w >= 0 for w in weights)
                                or not any(w > 0 for w in weights)):
        raise ConfigError("data.weights", f"{weights}: weights must be finite, >= 0, and not all 0")
    prefixes, shard_weights, documents = [], [], []
    for i, m in enumerate(manifests):
        if weights is not None and weights[i] == 0:
            log.warning("data.weights gives %s weight 0: it is not read", m.path)
            continue
        total = sum(m.shard_tokens) or len(m.prefixes)
        for prefix, tokens, docs in zip(m.prefixes, m.shard_tokens, m.shard_documents,
                                        strict=True):
            share = (tokens or 1) / total
            prefixes.append(prefix)
            shard_weights.append(share * (weights[i] if weights is not None else total))
            documents.append(docs)
    return prefixes, shard_weights, documents


def _build_split(config: GPTDatasetConfig, split: int, samples: int, prefixes: list[str],
                 weights: list[float], documents: list[int]) -> GPTDataset | None:
    """One split (0 train, 1 validation) of the blend, from the shards that have documents in
    it. Megatron splits every shard's documents by `data.split`, so a shard of a few documents
    can have none in the validation share, and a `GPTDataset` asked for samples from no
    documents loops forever (megatron's `_get_num_epochs`): such shards sit that split out."""
    begin, end = config.split_matrix[split]
    keep = [k for k, n in enumerate(documents) if round(end * n) > round(begin * n)]
    name = ("training", "validation")[split]
    if not keep:
        if split == 0:
            raise ConfigError("data.split", f"split {config.split!r} leaves no training data")
        log.warning("data.split %r leaves no shard a validation document: no validation loss",
                    config.split)
        return None
    if len(keep) < len(prefixes):
        log.warning("data.split %r gives %d of %d shards no %s document (megatron splits each "
                    "shard): %s draws from the other %d", config.split, len(prefixes) - len(keep),
                    len(prefixes), name, name, len(keep))
    part = dataclasses.replace(config, blend=([prefixes[k] for k in keep],
                                              [weights[k] for k in keep]))
    part.split_matrix = [config.split_matrix[i] if i == split else None for i in range(3)]
    sizes = [samples if i == split else 0 for i in range(3)]
    return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, part).build()[split]


def build_token_data(manifest_paths: list[str], weights: list[float] | None, split: str, *,
                     seq_length: int, seed: int, train_samples: int, valid_samples: int,
                     cache_dir: str, eod_mask_loss: bool = False,
                     fingerprint: str | None = None) -> TokenData:
    """Build the train and validation `GPTDataset`s (every rank builds; rank 0 writes the cache)."""
    manifests = read_manifests(manifest_paths, fingerprint)
    first = manifests[0]
    if eod_mask_loss and first.eod_id is None:
        raise ConfigError("data.eod_mask_loss", f"{first.path} names no tokenizer.eod_id")
    eod = first.eod_id if first.eod_id is not None else first.vocab_size
    prefixes, shard_weights, documents = _blend(manifests, weights)
    os.makedirs(cache_dir, exist_ok=True)
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=(prefixes, shard_weights),
        split=split, path_to_cache=cache_dir, tokenizer=_DatasetTokenizer(first.vocab_size, eod),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    if config.split_matrix[0] is None:
        raise ConfigError("data.split", f"split {split!r} leaves no training data")
    train = _build_split(config, 0, train_samples, prefixes, shard_weights, documents)
    valid = (_build_split(config, 1, valid_samples, prefixes, shard_weights, documents)
             if valid_samples > 0 and config.split_matrix[1] is not None else None)
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
        if first + micro_batch_size > len(dataset):
            raise DataError(f"sample {first + micro_batch_size - 1} is past the {len(dataset)} "
                            "samples built for this run")
        samples = [dataset[first + j] for j in range(micro_batch_size)]
        index += micro_batch_size * dp_size
        yield {
            "tokens": torch.stack([s["tokens"] for s in samples]),
            "labels": torch.stack([s["labels"] for s in samples]),
            "loss_mask": torch.stack([s["loss_mask"] for s in samples]).float(),
            "position_ids": torch.stack([s["position_ids"] for s in samples]),
        }
