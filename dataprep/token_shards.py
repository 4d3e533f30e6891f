"""Documents -> token sequences -> Megatron `.bin/.idx` shards, as plain functions on plain data
(the Beam transforms in `dataprep.tokenize_transforms` and the benchmark call these).

Two passes, deterministic whatever the number of workers:

1. `tokenize_unit`: one input unit (fixed row range of one file) is read, batch-encoded, EOS
   appended, long documents split or dropped, and written as a *part* (an MMIDIDX pair named by
   the unit). Units run in parallel; each part's content depends only on its unit.
2. `plan_shards` + `write_shard`: within a source, parts in (file, row) order form one token
   stream. Sequence s, starting at token offset o_s of that stream, goes to shard
   `floor(o_s / shard_tokens)`. The plan needs only each part's token count; each shard writer
   copies contiguous byte ranges out of the parts it overlaps, so shards are written in
   parallel, in stable document order, and each holds at most `shard_tokens` + (one sequence - 1)
   tokens.

Long documents (`max_doc_tokens` N, `long_docs="split"`): the document (BOS if asked, text ids,
EOS) is cut into chunks of N-1 text tokens and **every chunk ends with EOS**. Megatron's
GPTDataset shuffles sequences, so a chunk without EOS would run straight into an unrelated text;
with EOS each sequence is a well-formed sample for the EOD-based masks and position resets.
"""

from __future__ import annotations

import itertools
import os
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dataprep.outputs import local_staging, read_index_from
from dataprep.token_inputs import InputUnit, Record, Source, read_unit
from kiln.paths import join, open_path
from schemas.deadletter import DeadLetter, dead_letter
from schemas.indexed import index_bytes, token_dtype
from schemas.manifest import Ledger, Manifest, ShardEntry
from schemas.shards import indexed_shard_entry

_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class EncodeSettings:
    text_field: str = "text"
    id_field: str = "id"
    max_doc_tokens: int | None = None  # sequence length cap, BOS/EOS included
    long_docs: str = "split"  # "split" or "drop"
    add_bos: bool = False
    batch_docs: int = 256  # documents per sentencepiece batch call


@dataclass
class PartResult:
    """What pass 1 wrote for one unit, with its ledger counts."""

    source: str
    key: str
    file_index: int
    row_start: int
    prefix: str  # part files `<prefix>.bin/.idx`
    records: int = 0
    read_errors: int = 0
    empty: int = 0
    too_long: int = 0
    encode_errors: int = 0
    documents: int = 0  # documents written (whole or split)
    split_documents: int = 0
    sequences: int = 0
    tokens: int = 0


@dataclass(frozen=True)
class ShardTask:
    """Output shard `name`: the source's sequences starting at token offsets in [lo, hi)."""

    source: str
    index: int
    name: str
    lo: int
    hi: int
    parts: tuple[tuple[str, int], ...]  # (part prefix, stream offset of its first token)


class SequenceWriter:
    """Appends sequences to `<prefix>.bin` and writes the matching `.idx` at the end; the two
    files appear under their final names only when complete."""

    def __init__(self, prefix: str, dtype: type[np.number] | np.dtype) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(f"{prefix}.bin.tmp", "wb")
        self._lengths: list[np.ndarray] = []
        self.sequences = 0
        self.tokens = 0

    def add(self, sequences: Sequence[Sequence[int]]) -> None:
        if not sequences:
            return
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=len(sequences))
        total = int(lengths.sum())
        flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=self.dtype, count=total)
        self._bin.write(flat.tobytes())
        self._record(lengths)

    def add_raw(self, data: bytes | memoryview, lengths: np.ndarray) -> None:
        self._bin.write(data)
        self._record(lengths)

    def _record(self, lengths: np.ndarray) -> None:
        self._lengths.append(np.asarray(lengths, dtype=np.int64))
        self.sequences += len(lengths)
        self.tokens += int(lengths.sum())

    def finalize(self) -> None:
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        with open(f"{self.prefix}.idx.tmp", "wb") as f:
            f.write(index_bytes(lengths, self.dtype))
        os.replace(f"{self.prefix}.bin.tmp", f"{self.prefix}.bin")
        os.replace(f"{self.prefix}.idx.tmp", f"{self.prefix}.idx")

    def discard(self) -> None:
        self._bin.close()
        os.unlink(f"{self.prefix}.bin.tmp")


def document_sequences(ids: list[int], eos_id: int, bos_id: int | None,
                       settings: EncodeSettings) -> list[list[int]] | None:
    """The sequences one document becomes; None when it is too long and long docs are dropped.
    `ids` (fresh from the encoder) is extended in place: no copy on the common path."""
    body = ids if bos_id is None else [bos_id, *ids]
    n = settings.max_doc_tokens
    if n is None or len(body) < n:
        body.append(eos_id)
        return [body]
    if settings.long_docs == "drop":
        return None
    return [body[i:i + n - 1] + [eos_id] for i in range(0, len(body), n - 1)]


def encode_texts(tok, texts: list[str]) -> list[list[int] | str]:
    """Batch-encode; if the batch fails, encode one by one so only the bad texts fail (their
    entry is the error message)."""
    try:
        return tok.encode_batch(texts)
    except Exception:  # noqa: BLE001 - any tokenizer error: isolate the offending text below
        out: list[list[int] | str] = []
        for text in texts:
            try:
                out.append(tok.encode(text))
            except Exception as exc:  # noqa: BLE001 - the reason goes to the dead-letter entry
                out.append(f"{type(exc).__name__}: {exc}")
        return out


def _printable(text: str | None) -> str | None:
    """Dead-letter text that survives UTF-8 (lone surrogates become escapes)."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def part_prefix(parts_dir: str, unit: InputUnit) -> str:
    return join(parts_dir, unit.source, unit.key)


def tokenize_unit(unit: InputUnit, tok, settings: EncodeSettings,
                  parts_dir: str) -> tuple[PartResult, list[DeadLetter]]:
    """Pass 1 for one unit: write its part and return counts and dead-letter entries. The part
    is written locally and, when `parts_dir` is remote, uploaded once complete: pass 2 may run
    on another worker."""
    res = PartResult(unit.source, unit.key, unit.file_index, unit.row_start,
                     part_prefix(parts_dir, unit))
    with local_staging(parts_dir) as local_parts:
        dead = _write_part(unit, tok, settings, part_prefix(local_parts, unit), res)
    return res, dead


def _write_part(unit: InputUnit, tok, settings: EncodeSettings, prefix: str,
                res: PartResult) -> list[DeadLetter]:
    dead: list[DeadLetter] = []
    writer = SequenceWriter(prefix, token_dtype(tok.vocab_size))
    bos = tok.bos_id if settings.add_bos else None
    pending: list[Record] = []

    def flush() -> None:
        sequences: list[list[int]] = []
        for rec, ids in zip(pending, encode_texts(tok, [r.text for r in pending]), strict=True):
            if isinstance(ids, str):
                res.encode_errors += 1
                dead.append(dead_letter(rec.path, rec.offset, f"encode failed: {ids}",
                                        _printable(rec.raw or rec.text), stage="tokenize"))
                continue
            if not ids:
                res.empty += 1
                continue
            seqs = document_sequences(ids, tok.eos_id, bos, settings)
            if seqs is None:
                res.too_long += 1
                continue
            res.documents += 1
            res.split_documents += len(seqs) > 1
            sequences.extend(seqs)
        writer.add(sequences)
        pending.clear()

    for rec in read_unit(unit, settings.text_field, settings.id_field):
        res.records += 1
        if rec.problem is not None:
            res.read_errors += 1
            dead.append(dead_letter(rec.path, rec.offset, rec.problem, _printable(rec.raw),
                                    stage="read"))
        elif not rec.text:
            res.empty += 1
        else:
            pending.append(rec)
            if len(pending) >= settings.batch_docs:
                flush()
    flush()
    writer.finalize()
    res.sequences, res.tokens = writer.sequences, writer.tokens
    return dead


def plan_shards(parts: Sequence[PartResult], shard_tokens: int) -> list[ShardTask]:
    """Shard boundaries from part token counts alone (no document-level data on the launcher)."""
    tasks: list[ShardTask] = []
    for source in sorted({p.source for p in parts}):
        mine = sorted((p for p in parts if p.source == source and p.tokens),
                      key=lambda p: (p.file_index, p.row_start))
        starts = list(itertools.accumulate((p.tokens for p in mine), initial=0))
        total = starts.pop()
        for k in range(-(-total // shard_tokens)):
            lo, hi = k * shard_tokens, (k + 1) * shard_tokens
            first = bisect_right(starts, lo) - 1  # the part holding token `lo`
            last = bisect_left(starts, hi)  # parts starting before `hi`
            tasks.append(ShardTask(source, k, f"{source}-{k:05d}", lo, hi,
                                   tuple((mine[j].prefix, starts[j]) for j in range(first, last))))
    return tasks


def write_shard(task: ShardTask, out_dir: str) -> ShardEntry | None:
    """Pass 2 for one shard: copy its sequences out of the parts (local or remote, read by byte
    range); None when it has none (only when one sequence is longer than `shard_tokens`). The
    shard is built locally (its entry hashes the finished files), then uploaded if `out_dir` is
    remote."""
    with local_staging(out_dir) as local_out:
        prefix = os.path.join(local_out, task.name)
        writer: SequenceWriter | None = None
        for part, offset in task.parts:
            index = read_index_from(f"{part}.idx")
            lengths = index.lengths.astype(np.int64)
            starts = offset + np.concatenate([[0], np.cumsum(lengths)[:-1]])
            a, b = np.searchsorted(starts, [task.lo, task.hi], side="left")
            if a == b:
                continue
            if writer is None:
                writer = SequenceWriter(prefix, index.dtype)
            begin = int(index.pointers[a])
            end = int(index.pointers[b - 1]) + int(lengths[b - 1]) * index.dtype.itemsize
            with open_path(f"{part}.bin", "rb", compression=None) as f:
                f.seek(begin)
                while begin < end:
                    chunk = f.read(min(_COPY_CHUNK, end - begin))
                    writer.add_raw(chunk,
                                   lengths[a:b] if begin + len(chunk) >= end else lengths[:0])
                    begin += len(chunk)
        if writer is None:
            return None
        writer.finalize()
        return indexed_shard_entry(prefix, root=local_out, source=task.source)


def token_manifest(sources: Sequence[Source], parts: Sequence[PartResult], shards: Sequence[ShardEntry],
                   tokenizer: dict, settings: EncodeSettings, shard_tokens: int) -> Manifest:
    """The `megatron_indexed` manifest: shards in (source, index) order, the ledger, per-source
    totals and weights, and `extra.blend` (see `blend_list`)."""
    ledger = Ledger()
    records = sum(p.records for p in parts)
    read_errors = sum(p.read_errors for p in parts)
    read = ledger.stage("read", input=records, kept=records - read_errors, error=read_errors)
    ledger.stage("tokenize", input=read.kept, kept=sum(p.documents for p in parts),
                 filtered={"empty": sum(p.empty for p in parts),
                           "too_long": sum(p.too_long for p in parts)},
                 error=sum(p.encode_errors for p in parts))
    order = {src.name: i for i, src in enumerate(sources)}
    shards = sorted(shards, key=lambda s: (order[s.source],
                                           int(s.path.removesuffix(".bin").rsplit("-", 1)[1])))
    total = sum(s.tokens for s in shards)
    explicit = all(s.weight is not None for s in sources)  # parse_sources: all or none
    per_source: dict[str, dict] = {}
    for src in sources:
        mine_parts = [p for p in parts if p.source == src.name]
        mine = [s for s in shards if s.source == src.name]
        tokens = sum(s.tokens for s in mine)
        per_source[src.name] = {
            "input": src.spec, "files": len(src.files),
            "documents": sum(p.documents for p in mine_parts),
            "split_documents": sum(p.split_documents for p in mine_parts),
            "sequences": sum(s.rows for s in mine), "tokens": tokens,
            "shards": [s.path.removesuffix(".bin") for s in mine],
            "weight": src.weight if explicit else (tokens / total if total else 0.0),
        }
    weight_sum = sum(s["weight"] for s in per_source.values())
    for s in per_source.values():
        s["weight"] = s["weight"] / weight_sum if weight_sum else 0.0
    extra = {
        "blend": blend_list(per_source, {s.path.removesuffix(".bin"): s.tokens for s in shards}),
        "settings": {"shard_tokens": shard_tokens, "max_doc_tokens": settings.max_doc_tokens,
                     "long_docs": settings.long_docs, "add_bos": settings.add_bos,
                     "append_eos": True, "text_field": settings.text_field},
        "dtype": str(np.dtype(token_dtype(tokenizer["vocab_size"]))),
    }
    return Manifest(schema={"name": "megatron_indexed", "version": 1}, shards=list(shards),
                    tokenizer=tokenizer, ledger=ledger, sources=per_source, extra=extra)


def blend_list(per_source: dict[str, dict], shard_tokens: dict[str, int]) -> list:
    """Megatron's flat `[weight, prefix, weight, prefix, ...]` (what `--data-path` and
    `megatron.core.datasets.utils.get_blend_from_list` take), one entry per shard, prefixes
    relative to the dataset directory: a source's weight is shared among its shards by tokens."""
    blend: list = []
    for info in per_source.values():
        for prefix in info["shards"]:
            share = shard_tokens[prefix] / info["tokens"] if info["tokens"] else 0.0
            blend += [info["weight"] * share, prefix]
    return blend
