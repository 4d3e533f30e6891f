"""Eval-set decontamination per record: the n-gram index of the eval files and the lookup of a document.

Eval files are read with `kiln.paths` (local, gs://, s3://; compression by suffix). A `.jsonl`
file (also `.jsonl.gz`, `.jsonl.zst`, `.json` lines) gives one eval item per string value of each
line's object (the `fields` given, or every string found at any depth when `fields` is empty), so
n-grams never span two fields; any other file gives one eval item per non-empty line. Items and
documents are cut into word n-grams of the normalised text exactly as MinHash shingles are: an
item of fewer than `ngram` words is one n-gram of its whole text, so it matches only a document
whose whole normalised text equals it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from dataprep.dedup.minhash import shingles
from dataprep.dedup.normalize import parse_normalization
from kiln import paths
from kiln.errors import ConfigError, DataError

# The n-gram hash seed is fixed: the index and the documents must hash alike, whatever MinHash uses.
_SEED = 0


@dataclass
class DecontamConfig:
    """Drop or flag documents that share a word n-gram with any item of the eval files."""

    eval_paths: list[str] = field(default_factory=list)  # files or globs
    ngram: int = 13
    mode: Literal["drop", "flag"] = "drop"
    normalization: str = "nfkc,lower,punctuation,digits,whitespace"
    fields: list[str] = field(default_factory=list)  # JSONL keys to read; empty = every string

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ConfigError("ngram", f"must be >= 1, got {self.ngram}")
        if self.mode not in ("drop", "flag"):
            raise ConfigError("mode", f"must be 'drop' or 'flag', got {self.mode!r}")
        parse_normalization(self.normalization)


@dataclass(frozen=True)
class EvalIndex:
    """Sorted n-gram hashes of the eval set; `first_ref[i]` indexes `refs` for `hashes[i]`."""

    hashes: np.ndarray  # uint64, sorted, unique
    first_ref: np.ndarray  # int64: the first eval item (file order, then line) holding the n-gram
    refs: tuple[str, ...]  # "path:line" of each eval item

    def __len__(self) -> int:
        return int(self.hashes.size)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def eval_items(path: str, fields: list[str]) -> Iterator[tuple[str, str]]:
    """(ref, text) of every eval item in one file; a malformed JSONL line raises `DataError`."""
    is_jsonl = any(path.endswith(s) for s in (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json"))
    with paths.open_path(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            ref = f"{path}:{line_no}"
            if not is_jsonl:
                yield ref, line
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"eval file is not JSON lines: {e.msg}", path=path,
                                row=line_no) from None
            values = [obj.get(k) for k in fields] if fields and isinstance(obj, dict) else [obj]
            for value in values:
                for text in _strings(value):
                    yield ref, text


def build_eval_index(eval_paths: list[str], ngram: int, normalization: str,
                     fields: list[str]) -> EvalIndex:
    """Index every n-gram of every eval item; files in sorted order so the index is deterministic."""
    files = paths.expand(list(eval_paths)) if eval_paths else []
    if eval_paths and not files:
        raise DataError(f"no eval file matches {', '.join(eval_paths)}", field="eval_paths")
    refs: list[str] = []
    chunks: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    for path in files:
        for ref, text in eval_items(path, fields):
            grams = shingles(text, ngram, normalization, _SEED)
            if grams.size:
                if not refs or refs[-1] != ref:
                    refs.append(ref)
                chunks.append(grams)
                owners.append(np.full(grams.size, len(refs) - 1, dtype=np.int64))
    if not chunks:
        return EvalIndex(np.empty(0, np.uint64), np.empty(0, np.int64), tuple(refs))
    hashes = np.concatenate(chunks)
    owner = np.concatenate(owners)
    order = np.lexsort((owner, hashes))  # by hash, then earliest item first
    hashes, owner = hashes[order], owner[order]
    first = np.ones(hashes.size, dtype=bool)
    first[1:] = hashes[1:] != hashes[:-1]
    return EvalIndex(hashes[first], owner[first], tuple(refs))


def document_ngrams(text: str, config: DecontamConfig) -> np.ndarray:
    """The sorted unique n-gram hashes of a document, as the index hashes eval items."""
    return shingles(text, config.ngram, config.normalization, _SEED)


def contamination(doc_ngrams: np.ndarray, index: EvalIndex) -> tuple[float, str] | None:
    """(fraction of the document's n-grams found in the eval set, first matching eval item), or
    None when the document shares no n-gram with it."""
    if doc_ngrams.size == 0 or len(index) == 0:
        return None
    pos = np.searchsorted(index.hashes, doc_ngrams)
    pos[pos == index.hashes.size] = 0
    hit = index.hashes[pos] == doc_ngrams
    if not hit.any():
        return None
    ref = index.refs[int(index.first_ref[pos[hit]].min())]
    return float(hit.sum()) / doc_ngrams.size, ref
