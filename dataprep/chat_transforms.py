"""Beam composites for the SFT and preference jobs: read+parse files, hygiene (filters, exact dedup),
tokenize under the length policy, pack, write sorted shards; every outcome is emitted as a ledger
event and summed into count files that the launcher turns into the manifest."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam import pvalue

from dataprep.chat.formats import (
    KIND,
    Example,
    PairingRule,
    PreferencePair,
    RecordError,
    RecordFiltered,
    detect_format,
    iter_records,
    parse_record,
)
from dataprep.chat.hygiene import Decontaminator, content_key, normalise_text
from dataprep.chat.lengths import LengthPolicy, TooLong
from dataprep.chat.packing import pack_rows
from dataprep.chat.rows import example_row
from dataprep.chat.template import ChatTemplate, TemplateOptions
from dataprep.outputs import local_staging
from kiln.paths import join, write_text
from schemas.deadletter import DeadLetter, dead_letter, write_dead_letters
from schemas.shards import write_arrow_shard

LEDGER = "ledger"
DEAD = "dead"
WORK_DIR = "_work"
COUNTS_FILE = "counts.json"
SHARDS_FILE = "shards.json"
NOTE = "note"  # events that are facts, not ledger outcomes (truncations, packed rows)


def event(stage: str, outcome: str, n: int = 1) -> pvalue.TaggedOutput:
    """A ledger event: outcome is kept | error | duplicate | filtered:<reason> | note:<name>."""
    return pvalue.TaggedOutput(LEDGER, (f"{stage}/{outcome}", n))


def stable_bucket(key: str, buckets: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % buckets


@dataclass(frozen=True)
class Keyed:
    id: str
    source: str
    example: Example


def record_id(source: str, line: int, k: int | None = None) -> str:
    """`<file name>:<line, zero padded>[#k]`: ids sort in input order."""
    base = f"{os.path.basename(source)}:{line:09d}"
    return base if k is None else f"{base}#{k:03d}"


class ParseFiles(beam.DoFn):
    """Read one input file; stage `read` (line -> JSON object) and stage `parse` (object ->
    example of the run's kind)."""

    def __init__(self, fmt: str, kind: str, allowed: tuple[str, ...], rule: PairingRule) -> None:
        self.fmt, self.kind, self.allowed, self.rule = fmt, kind, allowed, rule

    def process(self, source: str) -> Iterator[Any]:
        for line, rec, raw in iter_records(source):
            if isinstance(rec, RecordError):
                yield event("read", "error")
                yield pvalue.TaggedOutput(DEAD, dead_letter(source, line, str(rec), raw, "read"))
                continue
            yield event("read", "kept")
            try:
                fmt = self.fmt if self.fmt != "auto" else detect_format(rec)
                if fmt == "prompts" and "messages" in rec and "messages" in self.allowed:
                    fmt = "messages"  # an SFT conversation missing its reply: say exactly that
                if fmt is None or fmt not in self.allowed:
                    raise RecordError(f"unrecognised record (keys: {', '.join(sorted(rec)[:8])})")
                if KIND[fmt] != self.kind:
                    raise RecordError(f"record is {fmt} data ({KIND[fmt]}); this run writes {self.kind}")
                examples = parse_record(rec, fmt, self.rule, key=record_id(source, line))
            except RecordError as exc:
                yield event("parse", "error")
                yield pvalue.TaggedOutput(DEAD, dead_letter(source, line, str(exc), raw or rec, "parse"))
                continue
            except RecordFiltered as exc:
                yield event("parse", f"filtered:{exc.reason}")
                continue
            yield event("parse", "kept")
            if self.rule.rule == "all_pairs":
                n = len(rec["completions"]) if fmt == "scored" else 2
                yield event("pair", "kept", len(examples))
                if n * (n - 1) // 2 > len(examples):
                    yield event("pair", "filtered:not_selected", n * (n - 1) // 2 - len(examples))
            many = len(examples) > 1
            for k, ex in enumerate(examples):
                yield Keyed(record_id(source, line, k if many else None), source, ex)


class HygieneFilter(beam.DoFn):
    """Stage `hygiene`, filters: pairs whose completions are equal after normalisation, and
    examples whose user turns overlap the evaluation prompts."""

    def __init__(self, eval_prompts: list[str], n: int) -> None:
        self.eval_prompts, self.n = eval_prompts, n

    def setup(self) -> None:
        self.decon = Decontaminator(self.eval_prompts, self.n) if self.eval_prompts else None

    def process(self, item: Keyed) -> Iterator[Any]:
        ex = item.example
        if isinstance(ex, PreferencePair) and normalise_text(ex.chosen) == normalise_text(ex.rejected):
            yield event("hygiene", "filtered:identical_pair")
        elif self.decon is not None and self.decon.contaminated(ex):
            yield event("hygiene", "filtered:decontaminated")
        else:
            yield item


class ExactDedup(beam.PTransform):
    """Stage `hygiene`, exact dedup on the normalised-content hash: the smallest id is kept."""

    def __init__(self, enabled: bool) -> None:
        super().__init__()
        self.enabled = enabled

    def expand(self, items):
        if not self.enabled:
            return items | "CountKept" >> beam.ParDo(_PassKept("hygiene")).with_outputs(LEDGER, main="items")
        return (items
                | "Key" >> beam.Map(lambda it: (content_key(it.example), it))
                | "Group" >> beam.GroupByKey()
                | "KeepFirst" >> beam.ParDo(_KeepFirst()).with_outputs(LEDGER, main="items"))


class _KeepFirst(beam.DoFn):
    def process(self, group: tuple[str, Iterable[Keyed]]) -> Iterator[Any]:
        items = sorted(group[1], key=lambda it: it.id)
        yield event("hygiene", "kept")
        if len(items) > 1:
            yield event("hygiene", "duplicate", len(items) - 1)
        yield items[0]


class _PassKept(beam.DoFn):
    def __init__(self, stage: str) -> None:
        self.stage = stage

    def process(self, item: Any) -> Iterator[Any]:
        yield event(self.stage, "kept")
        yield item


class TokenizeRows(beam.DoFn):
    """Stage `length`: render with the chat template under the length policy."""

    def __init__(self, tokenizer_path: str, options: TemplateOptions, policy: LengthPolicy) -> None:
        self.tokenizer_path, self.options, self.policy = tokenizer_path, options, policy

    def setup(self) -> None:
        from dataprep.tokenizer import load_tokenizer

        self.template = ChatTemplate(load_tokenizer(self.tokenizer_path), self.options)

    def process(self, item: Keyed) -> Iterator[Any]:
        try:
            row = example_row(self.template, self.policy, item.example, item.id, item.source)
        except TooLong as exc:
            yield event("length", f"filtered:{exc.reason}")
            return
        yield event("length", "kept")
        if row.prompt_truncated:
            yield event("length", f"{NOTE}:prompt_truncated")
        if row.completion_truncated:
            yield event("length", f"{NOTE}:completion_truncated")
        yield row.values


class PackRows(beam.PTransform):
    """Stage `pack`: best-fit-decreasing within `groups` buckets (by id hash, so the result does
    not depend on workers or input order)."""

    def __init__(self, max_seq_len: int, groups: int) -> None:
        super().__init__()
        self.max_seq_len, self.groups = max_seq_len, groups

    def expand(self, rows):
        return (rows
                | "Bucket" >> beam.Map(lambda r, g=self.groups: (stable_bucket(r["id"], g), r))
                | "Group" >> beam.GroupByKey()
                | "Pack" >> beam.ParDo(_Pack(self.max_seq_len)).with_outputs(LEDGER, main="rows"))


class _Pack(beam.DoFn):
    def __init__(self, max_seq_len: int) -> None:
        self.max_seq_len = max_seq_len

    def process(self, group: tuple[int, Iterable[dict]]) -> Iterator[Any]:
        rows = list(group[1])
        packed = pack_rows(rows, self.max_seq_len)
        yield event("pack", "kept", len(rows))
        yield event("pack", f"{NOTE}:rows", len(packed))
        yield event("pack", f"{NOTE}:tokens", sum(len(p["input_ids"]) for p in packed))
        yield from packed


class WriteShards(beam.PTransform):
    """Rows -> `num_shards` Arrow files (bucket by id hash, rows sorted by id inside a shard);
    the shard entries are written to `<work>/shards.json`."""

    def __init__(self, out_dir: str, contract: str, fingerprint: str, num_shards: int,
                 id_key: str = "id") -> None:
        super().__init__()
        self.out_dir, self.contract, self.fingerprint = out_dir, contract, fingerprint
        self.num_shards, self.id_key = num_shards, id_key

    def expand(self, rows):
        n, key = self.num_shards, self.id_key
        return (rows
                | "Shard" >> beam.Map(lambda r: (stable_bucket(_row_id(r, key), n), r))
                | "Group" >> beam.GroupByKey()
                | "Write" >> beam.MapTuple(self._write)
                | "All" >> beam.combiners.ToList()
                | "Index" >> beam.Map(_write_json, join(self.out_dir, WORK_DIR, SHARDS_FILE)))

    def _write(self, shard: int, rows: Iterable[dict]) -> dict:
        rows = sorted(rows, key=lambda r: _row_id(r, self.id_key))
        name = f"{self.contract}-{shard:05d}-of-{self.num_shards:05d}.arrow"
        with local_staging(self.out_dir) as out:  # built locally, uploaded whole if remote
            entry = write_arrow_shard(os.path.join(out, name), rows, self.contract,
                                      self.fingerprint, root=out)
        return entry.__dict__


def _row_id(row: dict, key: str) -> str:
    value = row[key]
    return value[0] if isinstance(value, list) else value


class WriteLedger(beam.PTransform):
    """Sum ledger events into `<work>/counts.json` ({"stage/outcome": n})."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.path = join(out_dir, WORK_DIR, COUNTS_FILE)

    def expand(self, events):
        return (events
                | "Sum" >> beam.CombinePerKey(sum)
                | "All" >> beam.combiners.ToDict()
                | "Write" >> beam.Map(_write_json, self.path))


class WriteDeadLetters(beam.PTransform):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir

    def expand(self, entries):
        return (entries
                | "All" >> beam.combiners.ToList()
                | "Write" >> beam.Map(lambda es, d=self.out_dir: _write_dead(d, es)))


def _write_dead(out_dir: str, entries: list[DeadLetter]) -> int:
    with local_staging(out_dir) as out:
        return write_dead_letters(out, entries)[1]


def _write_json(value: Any, path: str) -> str:
    write_text(path, json.dumps(value, sort_keys=True))  # atomic, local or remote
    return path


# ------------------------------------------------------------------------------------ launcher

@dataclass
class ChatJob:
    """Everything one SFT/preference run needs (built by `jobs.sft` / `jobs.preference`)."""

    inputs: list[str]
    tokenizer_path: str
    out_dir: str
    kind: str  # sft | preference | unpaired | prompts
    fmt: str  # a format name or "auto"
    allowed: tuple[str, ...]
    template: TemplateOptions
    length: LengthPolicy
    dedup: bool
    eval_prompts: list[str]
    ngram: int
    rule: PairingRule
    num_shards: int = 1
    pack: bool = False
    max_seq_len: int = 4096
    pack_groups: int = 1


def build_pipeline(p: beam.Pipeline, job: ChatJob, fingerprint: str) -> None:
    parsed = (p
              | "Inputs" >> beam.Create(job.inputs)
              | "ReadParse" >> beam.ParDo(ParseFiles(job.fmt, job.kind, job.allowed, job.rule))
              .with_outputs(LEDGER, DEAD, main="items"))
    filtered = (parsed.items
                | "Spread" >> beam.Reshuffle()
                | "Hygiene" >> beam.ParDo(HygieneFilter(job.eval_prompts, job.ngram))
                .with_outputs(LEDGER, main="items"))
    unique = filtered.items | "Dedup" >> ExactDedup(job.dedup)
    rows = unique.items | "Tokenize" >> beam.ParDo(
        TokenizeRows(job.tokenizer_path, job.template, job.length)).with_outputs(LEDGER, main="rows")
    events = [parsed[LEDGER], filtered[LEDGER], unique[LEDGER], rows[LEDGER]]
    contract, out_rows = job.kind, rows.rows
    if job.pack:
        packed = rows.rows | "Pack" >> PackRows(job.max_seq_len, job.pack_groups)
        events.append(packed[LEDGER])
        contract, out_rows = "sft_packed", packed.rows
    _ = out_rows | "Write" >> WriteShards(job.out_dir, contract, fingerprint, job.num_shards,
                                          "ids" if job.pack else "id")
    _ = tuple(events) | "Events" >> beam.Flatten() | "Ledger" >> WriteLedger(job.out_dir)
    _ = parsed[DEAD] | "DeadLetters" >> WriteDeadLetters(job.out_dir)
