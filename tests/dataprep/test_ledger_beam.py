"""Generic ledger helpers on Beam's local runner: stage counts, source stages, dead letters."""

from __future__ import annotations

import json
from pathlib import Path

import apache_beam as beam

from dataprep.ledger_beam import (
    Outcome,
    Stage,
    WriteCounts,
    WriteDeadLetters,
    read_ledger,
    read_stats,
    stage_counts,
)
from jobs.beam_options import pipeline_options
from schemas.deadletter import dead_letter


class Explode:
    """Source stage: 'n' -> n records, the last of each input a dead letter."""

    def __call__(self, n: int):
        for i in range(n - 1):
            yield Outcome.kept(n * 100 + i)
        yield Outcome.error(dead_letter(f"input-{n}", n - 1, "broken tail"))


class KeepEven:
    def setup(self) -> None:
        self.ready = True

    def __call__(self, x: int) -> Outcome:
        assert self.ready  # setup ran on the worker
        if x % 2:
            return Outcome.filtered("odd" if x % 3 else "odd_multiple_of_3")
        return Outcome.kept(x, stats={"even_seen": 1})


class Pairs:
    """Fan-out stage: each record -> two units."""

    def __call__(self, x: int):
        yield Outcome.kept((x, 0))
        yield Outcome.filtered("second")


def test_stages_count_every_outcome_and_balance(tmp_path: Path):
    work, out = str(tmp_path / "work"), str(tmp_path / "out")
    with beam.Pipeline(options=pipeline_options([])) as p:
        read = p | beam.Create([1, 4, 7]) | "read" >> Stage("read", Explode(), source=True)
        even = read.kept | "even" >> Stage("even", KeepEven())
        small = even.kept | beam.Filter(lambda x: x < 600)
        # a stage that sees nothing still appears, with zeros
        idle = (even.kept | beam.Filter(lambda x: False)) | "idle" >> Stage("idle", KeepEven())
        pairs = even.kept | "pairs" >> Stage("pairs", Pairs(), source=True, fan_out=True)
        sink = stage_counts("small", input=even.kept, kept=small,
                            duplicate=even.kept | beam.Filter(lambda x: x >= 600))
        (read.dead_letters, even.dead_letters) | "Dead" >> beam.Flatten() | WriteDeadLetters(out)
        (read.counts, even.counts, sink, idle.counts, pairs.counts) | "Counts" >> beam.Flatten() | WriteCounts(work)

    ledger = read_ledger(work, ["read", "even", "small"])
    assert ledger.check() == []
    fan_out = read_ledger(work, ["even", "pairs"])
    assert fan_out.check() == []
    assert (fan_out.stages[1].derived_from, fan_out.stages[1].input) == (5, 10)
    idle_stage = read_ledger(work, ["idle"]).stages[0]
    assert (idle_stage.input, idle_stage.kept, idle_stage.filtered) == (0, 0, {})
    read_s, even_s, small_s = ledger.stages
    # inputs 1, 4, 7 give 0 + 3 + 6 records and one dead letter each
    assert (read_s.input, read_s.kept, read_s.error) == (12, 9, 3)
    # kept records: 400..402, 700..705 -> even 400, 402, 700, 702, 704
    assert (even_s.kept, even_s.filtered) == (5, {"odd": 3, "odd_multiple_of_3": 1})
    assert (small_s.input, small_s.kept, small_s.duplicate) == (5, 2, 3)
    assert read_stats(work) == {"even_seen": 5}
    lines = [json.loads(line) for f in sorted((tmp_path / "out" / "dead-letter").iterdir())
             for line in f.read_text().splitlines()]
    assert sorted((d["source"], d["offset"], d["stage"]) for d in lines) == [
        ("input-1", 0, "read"), ("input-4", 3, "read"), ("input-7", 6, "read")]
