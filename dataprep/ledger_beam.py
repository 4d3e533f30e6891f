"""Beam helpers that keep the ledger of any job: run a per-record function as a counted stage
(its outcomes are tagged outputs), sum every stage's count events in one combine into a JSON
file, write dead letters, and turn the counts back into a `schemas.manifest.Ledger` in the
launcher once the pipeline has finished (works the same with the output on object storage).

How a job uses it (corpus, tokenize, sft and preference jobs alike)::

    counts = []
    read = files | "read" >> Stage("read", ReadFn(...), source=True)
    clean = read.kept | "clean" >> Stage("clean", CleanFn(config))
    counts += [read.counts, clean.counts]
    # a composite that is not a Stage (e.g. dedup with `kept`/`duplicates` outputs):
    counts.append(stage_counts("exact_dedup", input=clean.kept, kept=d.kept,
                               duplicate=d.duplicates))
    (read.dead_letters, clean.dead_letters) | beam.Flatten() | WriteDeadLetters(out)
    counts | beam.Flatten() | WriteCounts(work_dir)
    pipeline.run().wait_until_finish()
    ledger = read_ledger(work_dir, ["read", "clean", "exact_dedup"])  # then ledger.check()

A stage function is an object (pickled to workers) with `__call__(element) -> Outcome`, or, for a
source stage (`source=True`), `__call__(element) -> Iterable[Outcome]` whose outcomes are the
stage's input; with `fan_out=True` as well, the elements in are the ledger's `derived_from` (one
record -> several units, e.g. completions -> pairs). Optional `setup()`/`teardown()` run once per
DoFn instance (load models there).
Extra facts that are not stages (e.g. PII redactions per kind) go through `Outcome.stats` and are
read back with `read_stats`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.pvalue import PCollection, TaggedOutput

from schemas.deadletter import DEAD_LETTER_DIR, DeadLetter
from schemas.manifest import Ledger

KEPT, FILTERED, DUPLICATE, ERROR, INPUT = "kept", "filtered", "duplicate", "error", "input"
DERIVED_FROM = "derived_from"
_STAT = "stat"  # count key prefix for non-stage facts
_DEAD = "dead_letters"
_COUNTS = "counts"
COUNTS_FILE = "ledger-counts.json"


@dataclass(frozen=True)
class Outcome:
    """What a stage did with one record. Build with the class methods."""

    kind: str
    value: Any = None  # the kept element, or the DeadLetter for an error
    reason: str | None = None  # why it was filtered
    stats: dict[str, int] = field(default_factory=dict)  # extra counts, e.g. {"pii.email": 2}

    @classmethod
    def kept(cls, value: Any, stats: dict[str, int] | None = None) -> Outcome:
        return cls(KEPT, value, stats=dict(stats or {}))

    @classmethod
    def filtered(cls, reason: str) -> Outcome:
        return cls(FILTERED, reason=reason)

    @classmethod
    def error(cls, entry: DeadLetter) -> Outcome:
        return cls(ERROR, entry)


def count_key(stage: str, kind: str, reason: str | None = None) -> str:
    return f"{stage}\t{kind}\t{reason}" if reason else f"{stage}\t{kind}"


class _StageFn(beam.DoFn):
    def __init__(self, name: str, fn: Any, source: bool, fan_out: bool) -> None:
        self.name, self.fn, self.source, self.fan_out = name, fn, source, fan_out

    def setup(self) -> None:
        if hasattr(self.fn, "setup"):
            self.fn.setup()

    def teardown(self) -> None:
        if hasattr(self.fn, "teardown"):
            self.fn.teardown()

    def process(self, element: Any) -> Iterable[Any]:
        if self.fan_out:
            yield TaggedOutput(_COUNTS, (count_key(self.name, DERIVED_FROM), 1))
        if not self.source:
            yield TaggedOutput(_COUNTS, (count_key(self.name, INPUT), 1))
        outcomes = self.fn(element) if self.source else (self.fn(element),)
        for outcome in outcomes:
            if self.source:
                yield TaggedOutput(_COUNTS, (count_key(self.name, INPUT), 1))
            yield TaggedOutput(_COUNTS, (count_key(self.name, outcome.kind, outcome.reason), 1))
            for key, n in outcome.stats.items():
                yield TaggedOutput(_COUNTS, (count_key(_STAT, key), n))
            if outcome.kind == KEPT:
                yield outcome.value
            elif outcome.kind == ERROR:
                entry = outcome.value
                if entry.stage is None:
                    entry = DeadLetter(entry.source, entry.offset, entry.reason, entry.record,
                                       self.name)
                yield TaggedOutput(_DEAD, entry)


@dataclass
class StageOutputs:
    kept: PCollection
    dead_letters: PCollection
    counts: PCollection  # (key, n) events, summed once by WriteCounts


class Stage(beam.PTransform):
    """Apply a per-record stage function; count input and every outcome under the stage's name.

    `source=True`: the function yields several outcomes per element and those outcomes are the
    stage's input (a reader: files in, records out). `fan_out=True` additionally counts the
    elements in as the ledger's `derived_from`, checked against the previous stage's kept.
    """

    def __init__(self, name: str, fn: Any, *, source: bool = False, fan_out: bool = False) -> None:
        super().__init__(label=None)
        if fan_out and not source:
            raise ValueError(f"stage '{name}': fan_out needs source=True")
        self.name, self.fn, self.source, self.fan_out = name, fn, source, fan_out

    def expand(self, pcoll: PCollection) -> StageOutputs:
        results = pcoll | "Apply" >> beam.ParDo(
            _StageFn(self.name, self.fn, self.source, self.fan_out)
        ).with_outputs(_DEAD, _COUNTS, main=KEPT)
        return StageOutputs(results[KEPT], results[_DEAD], results[_COUNTS])


def stage_counts(name: str, *, input: PCollection, kept: PCollection,
                 duplicate: PCollection | None = None,
                 dead_letters: PCollection | None = None) -> PCollection:
    """Count events for a composite that is not a `Stage` (dedup, a sink): one per element of
    each PCollection given."""
    parts = {INPUT: input, KEPT: kept, DUPLICATE: duplicate, ERROR: dead_letters}
    events = [pcoll | f"{name}Count{kind.title()}" >> beam.Map(_event, count_key(name, kind))
              for kind, pcoll in parts.items() if pcoll is not None]
    return events | f"{name}Counts" >> beam.Flatten()


def _event(_: Any, key: str) -> tuple[str, int]:
    return key, 1


class _SumByKey(beam.CombineFn):
    """(key, n) events -> {key: total}; lifted, so each bundle pre-sums before the shuffle."""

    def create_accumulator(self) -> dict[str, int]:
        return {}

    def add_input(self, acc: dict[str, int], event: tuple[str, int]) -> dict[str, int]:
        acc[event[0]] = acc.get(event[0], 0) + event[1]
        return acc

    def merge_accumulators(self, accs: Iterable[dict[str, int]]) -> dict[str, int]:
        merged: dict[str, int] = {}
        for acc in accs:
            for key, n in acc.items():
                merged[key] = merged.get(key, 0) + n
        return merged

    def extract_output(self, acc: dict[str, int]) -> dict[str, int]:
        return dict(sorted(acc.items()))


class WriteCounts(beam.PTransform):
    """(key, n) events -> `<directory>/ledger-counts.json` ({key: total}). Apply it once to all
    events flattened: one combine for the whole job, and the file exists even when nothing ran."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.directory = directory

    def expand(self, counts: PCollection) -> Any:
        path = FileSystems.join(self.directory, COUNTS_FILE)
        return (counts | "Sum" >> beam.CombineGlobally(_SumByKey())
                | "Write" >> beam.Map(_write_json, path))


class WriteJsonList(beam.PTransform):
    """A small PCollection (shard entries, summaries) -> one JSON file holding the sorted list."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def expand(self, items: PCollection) -> Any:
        return (items | "Collect" >> beam.combiners.ToList()
                | "Write" >> beam.Map(lambda xs, path=self.path: _write_json(
                    sorted(xs, key=lambda x: json.dumps(x, sort_keys=True)), path)))


def _write_json(obj: Any, path: str) -> str:
    with FileSystems.create(path) as f:
        f.write(json.dumps(obj, ensure_ascii=False).encode("utf-8"))
    return path


def read_json(path: str) -> Any:
    """Read a file WriteCounts/WriteJsonList wrote (local or object storage)."""
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode("utf-8"))


class WriteJsonLines(beam.PTransform):
    """Objects with `to_json()` (or plain dicts) -> `<directory>/<prefix>-SSSSS-of-NNNNN.jsonl`."""

    def __init__(self, directory: str, prefix: str) -> None:
        super().__init__()
        self.directory, self.prefix = directory, prefix

    def expand(self, items: PCollection) -> Any:
        return (items
                | "ToJson" >> beam.Map(lambda x: x.to_json() if hasattr(x, "to_json")
                                       else json.dumps(x, ensure_ascii=False, sort_keys=True))
                | "Write" >> beam.io.WriteToText(FileSystems.join(self.directory, self.prefix),
                                                 file_name_suffix=".jsonl"))


class WriteDeadLetters(WriteJsonLines):
    """DeadLetter entries -> `<out>/dead-letter/dead-letter-*.jsonl` (DESIGN.md's layout)."""

    def __init__(self, out: str) -> None:
        super().__init__(FileSystems.join(out, DEAD_LETTER_DIR), "dead-letter")


def read_counts(directory: str) -> dict[str, int]:
    """The totals WriteCounts wrote into `directory`."""
    return read_json(FileSystems.join(directory, COUNTS_FILE))


def read_ledger(directory: str, stages: Sequence[str]) -> Ledger:
    """Build the ledger in stage order from the counts; a stage that saw nothing counts zeros."""
    totals = read_counts(directory)
    ledger = Ledger()
    for name in stages:
        filtered: dict[str, int] = {}
        simple = {INPUT: 0, KEPT: 0, DUPLICATE: 0, ERROR: 0}
        derived_from = None
        for key, n in totals.items():
            stage, kind, *reason = key.split("\t", 2)
            if stage != name:
                continue
            if kind == FILTERED:
                reason_key = reason[0] if reason else "unspecified"
                filtered[reason_key] = filtered.get(reason_key, 0) + n
            elif kind == DERIVED_FROM:
                derived_from = n
            elif kind in simple:
                simple[kind] += n
        stage = ledger.stage(name, simple[INPUT], simple[KEPT], dict(sorted(filtered.items())),
                             simple[DUPLICATE], simple[ERROR])
        stage.derived_from = derived_from
    return ledger


def read_stats(directory: str) -> dict[str, int]:
    """The non-stage counts (`Outcome.stats`), e.g. {"pii.email": 3}."""
    prefix = f"{_STAT}\t"
    totals = read_counts(directory)
    return {k[len(prefix):]: n for k, n in sorted(totals.items()) if k.startswith(prefix)}
