"""Post-training data: memory-mapped `sft`, `sft_packed`, `preference`, `unpaired` and `prompts`
Arrow shards, a deterministic data-parallel sampler that resumes at the exact sample, and the
collators that turn rows into padded micro-batches (loss mask on targets, packed masks).

Conventions (one loss-masking convention for every stage): `tokens[b, t]` is the input,
`labels[b, t] = tokens[b, t + 1]`, and `loss_mask[b, t] = 1` when predicting `labels[b, t]` is
trained on. The attention mask follows megatron: boolean `[b, 1, s, s]`, True = masked out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kiln.errors import DataError
from schemas.contracts import CONTRACTS, schema_identity
from schemas.manifest import read_manifest
from schemas.shards import read_arrow_shard


class ShardSet:
    """The rows of one dataset directory, checked against the expected contract and tokenizer."""

    def __init__(self, directory: str, expected: Sequence[str], fingerprint: str | None,
                 fingerprint_key: str = "tokenizer") -> None:
        """`fingerprint_key`: the config key that sets `fingerprint` (named in the refusal)."""
        self.directory = directory
        try:
            manifest = read_manifest(directory)
        except FileNotFoundError:
            raise DataError("no manifest.json: point data.manifests at a directory written by "
                            "`kiln sft` or `kiln preference`", path=directory) from None
        except ValueError as exc:
            raise DataError(f"invalid manifest: {exc}", path=directory) from None
        name, version = manifest.schema.get("name"), manifest.schema.get("version")
        if name not in expected:
            raise DataError(f"dataset holds contract '{name}', this stage reads "
                            f"{' or '.join(expected)}", path=directory, field="schema.name")
        if version != CONTRACTS[name].version:
            raise DataError(f"contract '{name}' version {version}, this trainer reads version "
                            f"{CONTRACTS[name].version}: re-run the data job with this llmkiln "
                            "version", path=directory, field="schema.version")
        self.contract = name
        self.manifest = manifest
        tables = []
        for shard in manifest.shards:
            path = os.path.join(directory, shard.path)
            table = read_arrow_shard(path)
            shard_name, shard_version, shard_fp = schema_identity(table.schema)
            if (shard_name, shard_version) != (name, version):
                raise DataError(f"shard is '{shard_name}' v{shard_version}, manifest says "
                                f"'{name}' v{version}", path=path, field="kiln.schema")
            if fingerprint and shard_fp != fingerprint:
                raise DataError(
                    f"tokenizer fingerprint {shard_fp} does not match the model's tokenizer "
                    f"{fingerprint}: re-tokenize the data with the model's tokenizer (kiln sft/"
                    f"preference --tokenizer TOK_DIR) or set {fingerprint_key} to the "
                    "tokenizer the checkpoint was trained with", path=path,
                    field="kiln.tokenizer_fingerprint")
            tables.append(table)
        if not tables:
            raise DataError("dataset has no shards", path=directory)
        self.table = pa.concat_tables(tables)
        self._columns = {c: self.table.column(c) for c in self.table.column_names}

    def __len__(self) -> int:
        return self.table.num_rows

    def row(self, index: int) -> dict[str, object]:
        out: dict[str, object] = {}
        for name, column in self._columns.items():
            value = column[index]
            if pa.types.is_list(value.type):
                out[name] = value.values.to_numpy(zero_copy_only=False)
            else:
                out[name] = value.as_py()
        return out

    def rows(self, indices: Sequence[int]) -> list[dict[str, object]]:
        return [self.row(int(i)) for i in indices]


@dataclass
class SamplerState:
    consumed_samples: int = 0


class DistributedSampler:
    """Global batches drawn from a seeded permutation per epoch; each data-parallel rank takes a
    contiguous slice of every global batch. Resuming from `consumed_samples` replays nothing and
    skips nothing: the sample order is a pure function of (seed, epoch, position)."""

    def __init__(self, num_samples: int, global_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, shuffle: bool = True, consumed_samples: int = 0) -> None:
        if global_batch_size % dp_size:
            raise DataError(f"global batch {global_batch_size} is not divisible by the "
                            f"data-parallel size {dp_size}")
        if num_samples < global_batch_size:
            raise DataError(f"dataset has {num_samples} rows, fewer than one global batch "
                            f"({global_batch_size})")
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle = seed, shuffle
        self.state = SamplerState(consumed_samples)
        self._per_epoch = num_samples - num_samples % global_batch_size  # drop last partial batch

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(self.num_samples)

    def global_batch(self, consumed_samples: int) -> np.ndarray:
        """Indices of this rank's share of the global batch that starts after `consumed_samples`
        samples (a pure function: a stage can look ahead without consuming the iterator)."""
        epoch, offset = divmod(consumed_samples, self._per_epoch)
        batch = self._order(epoch)[offset:offset + self.global_batch_size]
        if len(batch) < self.global_batch_size:  # a resume under another global batch size:
            # the epoch's rows ran out mid-batch, so it takes the next epoch's first ones
            batch = np.concatenate([batch, self._order(epoch + 1)[
                :self.global_batch_size - len(batch)]])
        per_rank = self.global_batch_size // self.dp_size
        return batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]

    def next_global_batch(self) -> np.ndarray:
        """Indices of this rank's share of the next global batch; advances the state."""
        batch = self.global_batch(self.state.consumed_samples)
        self.state.consumed_samples += self.global_batch_size
        return batch

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            yield self.next_global_batch()


def _list_array(column: pa.ChunkedArray) -> pa.Array:
    return column.combine_chunks() if column.num_chunks else pa.array([], column.type)


def list_lengths(column: pa.ChunkedArray) -> np.ndarray:
    return np.diff(_list_array(column).offsets.to_numpy())


def trained_tokens(loss_mask: pa.ChunkedArray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of a `loss_mask` list column: (its trained tokens, those a sequence cut to
    `seq_len` inputs keeps). Targets are tokens 1…n-1 of n = min(len, seq_len + 1), as collated."""
    array = _list_array(loss_mask)
    bounds = array.offsets.to_numpy()
    ones = np.concatenate([[0], np.cumsum(array.values.to_numpy(zero_copy_only=False) != 0)])
    start, end = np.minimum(bounds[:-1] + 1, bounds[1:]), bounds[1:]
    stop = np.minimum(bounds[:-1] + seq_len + 1, end)
    return ones[end] - ones[start], ones[np.maximum(stop, start)] - ones[start]


def kept_responses(prompt_ids: pa.ChunkedArray, response_ids: pa.ChunkedArray,
                   seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: (response tokens, those a prompt + response sequence cut to `seq_len` inputs
    keeps as targets)."""
    total = list_lengths(response_ids)
    return total, np.clip(seq_len + 1 - list_lengths(prompt_ids), 0, total)


def _pad_to(length: int, multiple: int) -> int:
    return -(-length // multiple) * multiple


def _length(longest: int, seq_len: int | None, max_len: int | None, multiple: int) -> int:
    """`seq_len` when fixed (pipeline parallelism needs one shape), else the longest input
    rounded up to `multiple`, capped at `max_len` (longer rows are cut)."""
    if seq_len is not None:
        return seq_len
    s = _pad_to(max(longest, 1), multiple)
    return min(s, max_len) if max_len is not None else s


def _shifted(tokens: np.ndarray, mask: np.ndarray, seq_len: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, next-token labels and their loss mask for one sequence, padded to seq_len."""
    n = min(len(tokens), seq_len + 1)
    inp = np.full(seq_len, pad_id, dtype=np.int64)
    lab = np.full(seq_len, pad_id, dtype=np.int64)
    lm = np.zeros(seq_len, dtype=np.float32)
    inp[:n - 1] = tokens[:n - 1]
    lab[:n - 1] = tokens[1:n]
    lm[:n - 1] = mask[1:n]
    return inp, lab, lm


def causal_mask(batch: int, seq_len: int) -> np.ndarray:
    return np.broadcast_to(np.triu(np.ones((seq_len, seq_len), dtype=bool), k=1),
                           (batch, 1, seq_len, seq_len)).copy()


@dataclass
class Batch:
    """A micro-batch as numpy arrays; stages turn it into tensors on their device."""

    tokens: np.ndarray  # [b, s] int64
    labels: np.ndarray  # [b, s] int64
    loss_mask: np.ndarray  # [b, s] float32
    position_ids: np.ndarray  # [b, s] int64
    attention_mask: np.ndarray | None = None  # [b, 1, s, s] bool, True = masked
    extra: dict[str, np.ndarray] | None = None


def collate_sft(rows: Sequence[dict], seq_len: int | None, pad_id: int, multiple: int = 8,
                max_len: int | None = None) -> Batch:
    """Plain (`sft`) or packed (`sft_packed`) rows -> a batch; packed rows get a block-diagonal
    causal mask and positions restarting at each conversation, and no loss across boundaries."""
    longest = max(len(r["input_ids"]) for r in rows) - 1
    s = _length(longest, seq_len, max_len, multiple)
    b = len(rows)
    tokens, labels, loss_mask = (np.zeros((b, s), np.int64), np.zeros((b, s), np.int64),
                                 np.zeros((b, s), np.float32))
    positions = np.tile(np.arange(s, dtype=np.int64), (b, 1))
    packed = "seq_boundaries" in rows[0]
    mask = causal_mask(b, s) if packed else None
    for i, r in enumerate(rows):
        lm = np.asarray(r["loss_mask"], dtype=np.float32)
        if packed:
            bounds = np.asarray(r["seq_boundaries"], dtype=np.int64)
            lm = lm.copy()
            lm[bounds[1:-1]] = 0  # never predict the next conversation's first token
            for start, end in zip(bounds[:-1], bounds[1:], strict=True):
                lo, hi = min(start, s), min(end, s)
                positions[i, lo:hi] = np.arange(hi - lo)
                mask[i, 0, hi:, lo:hi] = True  # later conversations cannot see this one
        tokens[i], labels[i], loss_mask[i] = _shifted(np.asarray(r["input_ids"]), lm, s, pad_id)
    return Batch(tokens, labels, loss_mask, positions, mask)


def collate_completions(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray],
                        seq_len: int | None, pad_id: int, multiple: int = 8,
                        max_len: int | None = None) -> Batch:
    """prompt + completion rows, loss on completion targets only (right padding)."""
    seqs = [np.concatenate([p, c]) for p, c in zip(prompts, completions, strict=True)]
    masks = [np.concatenate([np.zeros(len(p)), np.ones(len(c))])
             for p, c in zip(prompts, completions, strict=True)]
    longest = max(len(x) for x in seqs) - 1
    s = _length(longest, seq_len, max_len, multiple)
    b = len(seqs)
    tokens, labels, loss_mask = (np.zeros((b, s), np.int64), np.zeros((b, s), np.int64),
                                 np.zeros((b, s), np.float32))
    for i, (seq, m) in enumerate(zip(seqs, masks, strict=True)):
        tokens[i], labels[i], loss_mask[i] = _shifted(seq, m, s, pad_id)
    positions = np.tile(np.arange(s, dtype=np.int64), (b, 1))
    return Batch(tokens, labels, loss_mask, positions)


def collate_preference(rows: Sequence[dict], seq_len: int | None, pad_id: int,
                       max_len: int | None = None) -> Batch:
    """Chosen rows then rejected rows in one batch (one forward for both): [2b, s]."""
    prompts = [r["prompt_ids"] for r in rows]
    batch = collate_completions(prompts + prompts, [r["chosen_ids"] for r in rows]
                                + [r["rejected_ids"] for r in rows], seq_len, pad_id,
                                max_len=max_len)
    margins = np.array([r.get("margin") or 0.0 for r in rows], dtype=np.float32)
    batch.extra = {"margin": margins}
    return batch


def kl_partners(rows: np.ndarray, block: int) -> np.ndarray:
    """KTO's KL partner of each of `rows` (one split, in dataset order), as TRL's KTOTrainer
    fixes them when it prepares a dataset: completions rotate by one within consecutive blocks of
    `block` rows, (x₁, y₁) … (x_k, y_k) -> (x₁, y_k), (x₂, y₁) … (x_k, y_{k-1}); a last, shorter
    block rotates within itself."""
    j = np.arange(len(rows))
    start = j // block * block
    size = np.minimum(block, len(rows) - start)
    return rows[start + (j - start - 1) % size]


def collate_unpaired(rows: Sequence[dict], kl_rows: Sequence[dict], seq_len: int | None,
                     pad_id: int, max_len: int | None = None) -> Batch:
    """KTO: the b examples, then b mismatched (prompt of row i, completion of `kl_rows[i]`) pairs
    whose log-probs estimate the batch KL baseline; the caller picks the partners (see
    `kl_partners`)."""
    prompts = [r["prompt_ids"] for r in rows]
    completions = [r["completion_ids"] for r in rows]
    shifted = [r["completion_ids"] for r in kl_rows]
    batch = collate_completions(prompts + prompts, completions + shifted, seq_len, pad_id,
                                max_len=max_len)
    batch.extra = {"label": np.array([bool(r["label"]) for r in rows])}
    return batch
