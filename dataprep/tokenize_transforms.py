"""Beam composites for the tokenizer jobs: a size-bounded deterministic sample of documents (for
tokenizer training) and documents -> Megatron token shards + manifest (`kiln tokenize`).

The per-record work is in `dataprep.token_inputs` and `dataprep.token_shards`; these transforms
only distribute it. See `token_shards` for why the output is the same on any number of workers.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from dataprep.outputs import local_staging, remove_tree, write_manifest_to
from dataprep.token_inputs import InputUnit, Source, read_unit
from dataprep.token_shards import (
    EncodeSettings,
    PartResult,
    plan_shards,
    token_manifest,
    tokenize_unit,
    write_shard,
)
from kiln.paths import join
from schemas.deadletter import write_dead_letters
from schemas.manifest import ShardEntry

PARTS_DIR = "_parts"

# A sampled document: (hash, stable key, utf-8 bytes, text); tuples order by hash, then key.
SampleItem = tuple[int, str, int, str]


def sample_items(unit: InputUnit, text_field: str = "text",
                 id_field: str = "id") -> Iterator[SampleItem]:
    """Each usable document keyed by a hash of (source, id) — or (source, file, row) when the
    input has no ids — so the sample does not depend on file order or the runner."""
    for rec in read_unit(unit, text_field, id_field):
        if rec.problem is not None or not rec.text:
            continue
        key = f"{unit.source}/{rec.doc_id}" if rec.doc_id is not None else \
            f"{unit.source}/{os.path.basename(rec.path)}/{rec.offset}"
        h = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"),
                                           digest_size=8).digest(), "big")
        text = rec.text.encode("utf-8", "replace").decode("utf-8")
        yield (h, key, len(text.encode("utf-8")), text)


class BoundedHashSample(beam.CombineFn):
    """The documents of smallest hash whose sizes first add up to `max_bytes` (bottom-k by
    hash, bounded in bytes rather than count). Each accumulator keeps at most that prefix (plus
    one batch before trimming), and trimming commutes with merging, so the result is the same
    whatever the bundling: a document in the global prefix is in every partial prefix."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes

    def _trim(self, items: list[SampleItem]) -> list[SampleItem]:
        items.sort()
        total = 0
        for i, item in enumerate(items):
            total += item[2]
            if total >= self.max_bytes:
                return items[:i + 1]
        return items

    def create_accumulator(self) -> tuple[list[SampleItem], int]:
        return [], 0

    def add_input(self, acc: tuple[list[SampleItem], int],
                  item: SampleItem) -> tuple[list[SampleItem], int]:
        items, size = acc
        items.append(item)
        size += item[2]
        if size >= 2 * self.max_bytes:  # trim lazily: amortized O(log n) per document
            items = self._trim(items)
            size = sum(i[2] for i in items)
        return items, size

    def merge_accumulators(self, accumulators) -> tuple[list[SampleItem], int]:
        items = self._trim(list(heapq.merge(*(sorted(a[0]) for a in accumulators))))
        return items, sum(i[2] for i in items)

    def extract_output(self, acc: tuple[list[SampleItem], int]) -> list[SampleItem]:
        return self._trim(list(acc[0]))


class SampleDocuments(beam.PTransform):
    """PBegin -> one list of (hash, key, bytes, text), in hash order, about `max_bytes` big."""

    def __init__(self, units: Sequence[InputUnit], max_bytes: int, text_field: str = "text",
                 id_field: str = "id") -> None:
        super().__init__()
        self.units, self.max_bytes = list(units), max_bytes
        self.text_field, self.id_field = text_field, id_field

    def expand(self, pbegin):
        return (pbegin
                | "Units" >> beam.Create(self.units)
                | "SpreadUnits" >> beam.Reshuffle()
                | "Read" >> beam.FlatMap(sample_items, self.text_field, self.id_field)
                | "Sample" >> beam.CombineGlobally(BoundedHashSample(self.max_bytes)))


class TokenizeUnitFn(beam.DoFn):
    """Pass 1: one unit -> one part; its dead letters go to `dead-letter/<source>-<unit>.jsonl`."""

    def __init__(self, tokenizer, settings: EncodeSettings, out_dir: str) -> None:
        self.tokenizer, self.settings, self.out_dir = tokenizer, settings, out_dir
        self.documents = Metrics.counter("tokenize", "documents")
        self.tokens = Metrics.counter("tokenize", "tokens")
        self.errors = Metrics.counter("tokenize", "errors")

    def process(self, unit: InputUnit) -> Iterator[PartResult]:
        res, dead = tokenize_unit(unit, self.tokenizer, self.settings,
                                  join(self.out_dir, PARTS_DIR))
        if dead:
            with local_staging(self.out_dir) as out:
                write_dead_letters(out, dead, name=f"{unit.source}-{unit.key}.jsonl")
        self.documents.inc(res.documents)
        self.tokens.inc(res.tokens)
        self.errors.inc(len(dead))
        yield res


def _write_shard(task, out_dir: str) -> Iterator[ShardEntry]:
    entry = write_shard(task, out_dir)
    if entry is not None:
        yield entry


def _finalize(shards: list[ShardEntry], parts: list[PartResult], sources: list[Source],
              tokenizer_info: dict, settings: EncodeSettings, shard_tokens: int,
              out_dir: str) -> str:
    manifest = token_manifest(sources, parts, shards, tokenizer_info, settings, shard_tokens)
    path = write_manifest_to(out_dir, manifest)
    remove_tree(join(out_dir, PARTS_DIR))
    return path


class TokenizeToShards(beam.PTransform):
    """PBegin -> the path of the written `manifest.json` (after every shard is complete)."""

    def __init__(self, sources: Sequence[Source], units: Sequence[InputUnit], tokenizer,
                 tokenizer_info: dict, settings: EncodeSettings, out_dir: str,
                 shard_tokens: int) -> None:
        super().__init__()
        self.sources, self.units = list(sources), list(units)
        self.tokenizer, self.tokenizer_info = tokenizer, tokenizer_info
        self.settings, self.out_dir, self.shard_tokens = settings, out_dir, shard_tokens

    def expand(self, pbegin):
        parts = (pbegin
                 | "Units" >> beam.Create(self.units)
                 | "SpreadUnits" >> beam.Reshuffle()
                 | "Tokenize" >> beam.ParDo(TokenizeUnitFn(self.tokenizer, self.settings,
                                                           self.out_dir))
                 | "CollectParts" >> beam.combiners.ToList())
        shards = (parts
                  | "Plan" >> beam.FlatMap(plan_shards, self.shard_tokens)
                  | "SpreadShards" >> beam.Reshuffle()
                  | "WriteShards" >> beam.FlatMap(_write_shard, self.out_dir)
                  | "CollectShards" >> beam.combiners.ToList())
        return shards | "Manifest" >> beam.Map(
            _finalize, parts=beam.pvalue.AsSingleton(parts), sources=self.sources,
            tokenizer_info=self.tokenizer_info, settings=self.settings,
            shard_tokens=self.shard_tokens, out_dir=self.out_dir)
