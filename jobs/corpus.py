"""`kiln corpus`: WARC/WET/ARC files -> cleaned, deduplicated Parquet documents with a ledger.

    kiln corpus --input 'crawl/*.warc.gz' --out data/docs [--config FILE] [--set k=v ...]
                [--dedup none|exact|minhash|exact,minhash] [--overwrite] [beam options]

Beam options pass through unchanged (`--runner`, `--direct_num_workers`, Dataflow's `--project`,
...). The launcher waits for the pipeline, then assembles `manifest.json` from the counts and shard
entries the workers wrote (so it works the same when OUT is on object storage).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.filesystems import FileSystems

from dataprep.corpus_transforms import STAGES, CleanConfig, CleanDocuments, WriteDocumentShards
from dataprep.ledger_beam import (
    WriteCounts,
    WriteDeadLetters,
    WriteJsonLines,
    WriteJsonList,
    read_json,
    read_ledger,
    read_stats,
    stage_counts,
)
from jobs.beam_options import pipeline_options
from kiln.config import from_dict, load_config, to_dict
from kiln.errors import DataError, UsageError
from kiln.log import get_logger
from kiln.paths import is_local
from schemas.contracts import contract
from schemas.deadletter import DeadLetter, dead_letter
from schemas.manifest import MANIFEST, Manifest, ShardEntry, write_manifest

log = get_logger(__name__)

WORK_DIR = "_work"  # counts and shard entries from the workers; removed once the manifest exists
DUPLICATES_DIR = "duplicates"
SHARDS_FILE = "shards.json"
# --dedup value -> (ledger stage, composite in dataprep.dedup, its config dataclass)
DECONTAM_STAGE = "decontamination"
DEDUP_METHODS = {
    "exact": ("exact_dedup", "ExactDedup", "ExactDedupConfig"),
    "minhash": ("minhash_dedup", "MinHashDedup", "MinHashConfig"),
}


@dataclass
class OutputConfig:
    num_shards: int = 8  # documents are bucketed by hash(id); a bucket must fit a worker's memory
    row_group_rows: int = 4096


@dataclass
class CorpusConfig:
    clean: CleanConfig = field(default_factory=CleanConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    # fields of dataprep.dedup.ExactDedupConfig / MinHashConfig, checked when the stage is built
    exact_dedup: dict[str, Any] = field(default_factory=dict)
    minhash_dedup: dict[str, Any] = field(default_factory=dict)
    # fields of dataprep.dedup.DecontamConfig; the stage runs when eval_paths is not empty
    decontamination: dict[str, Any] = field(default_factory=dict)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="kiln corpus", description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                        help="WARC/WET/ARC files (gzip or not), local or gs:// / s3://")
    parser.add_argument("--out", required=True, help="dataset directory to create")
    parser.add_argument("--config", help="YAML file (default: jobs/configs/corpus.yaml values)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. clean.language.min_score=0.8")
    parser.add_argument("--dedup", default="exact,minhash",
                        help="none, exact, minhash or exact,minhash (default)")
    parser.add_argument("--decontaminate", nargs="+", metavar="FILE", default=[],
                        help="evaluation sets (JSONL/text): drop (or flag) documents sharing an "
                             "n-gram with them (decontamination.ngram, default 13)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return parser.parse_known_args(list(argv))


def dedup_stages(methods: str, config: CorpusConfig,
                 eval_paths: Sequence[str] = ()) -> list[tuple[str, beam.PTransform]]:
    """(ledger stage, composite) per requested method, built from `dataprep.dedup`; eval-set
    decontamination first when evaluation files are given."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    decontam = dict(config.decontamination)
    if eval_paths:
        decontam["eval_paths"] = [*decontam.get("eval_paths", []), *eval_paths]
    stages: list[tuple[str, beam.PTransform]] = []
    if decontam.get("eval_paths"):
        import dataprep.dedup as dedup

        stages.append((DECONTAM_STAGE, dedup.Decontaminate(
            from_dict(dedup.DecontamConfig, decontam, "decontamination"))))
    if names == ["none"]:
        return stages
    unknown = [m for m in names if m not in DEDUP_METHODS]
    if unknown or not names:
        raise UsageError(f"--dedup: unknown method '{','.join(unknown) or methods}' "
                         f"(use none, exact, minhash or exact,minhash)")
    try:
        import dataprep.dedup as dedup
    except ModuleNotFoundError as exc:
        if exc.name != "dataprep.dedup":
            raise
        raise UsageError(f"--dedup {methods}: dataprep.dedup is not installed in this build; "
                         f"run with --dedup none") from None
    for name in names:
        stage, transform, config_class = DEDUP_METHODS[name]
        stage_config = from_dict(getattr(dedup, config_class), getattr(config, stage), stage)
        stages.append((stage, getattr(dedup, transform)(stage_config)))
    return stages


def _dedup_dead_letter(error: dict[str, Any]) -> DeadLetter:
    """A dedup stage's unusable record (no id, text or quality) as a dead-letter entry."""
    record = error.get("record") or {}
    source = record.get("source") if isinstance(record, dict) else None
    return dead_letter(source or "<dedup input>", None,
                       f"{error.get('stage')}: {error.get('reason')}", record,
                       stage=error.get("stage"))


def build_pipeline(pipeline: beam.Pipeline, inputs: Sequence[str], out: str,
                   config: CorpusConfig, dedup: list[tuple[str, beam.PTransform]]) -> list[str]:
    """Wire the job; returns the ledger's stage names in order."""
    work = FileSystems.join(out, WORK_DIR)
    paths = (pipeline | "Patterns" >> beam.Create(list(inputs))
             | "Match" >> fileio.MatchAll() | "Paths" >> beam.Map(lambda m: m.path))
    clean = paths | "Clean" >> CleanDocuments(config.clean)
    docs, counts, duplicates = clean.documents, list(clean.counts), []
    dead_letters = list(clean.dead_letters)
    for stage, transform in dedup:
        result = docs | stage >> transform
        errors = result["errors"] | f"{stage}DeadLetters" >> beam.Map(_dedup_dead_letter)
        dead_letters.append(errors)
        if stage == DECONTAM_STAGE:  # dropped eval overlaps are filtered, not duplicates
            counts.append(stage_counts(stage, input=docs, kept=result["kept"],
                                       dead_letters=errors,
                                       filtered={"decontaminated": result["duplicates"]}))
        else:
            counts.append(stage_counts(stage, input=docs, kept=result["kept"],
                                       duplicate=result["duplicates"], dead_letters=errors))
        duplicates.append(result["duplicates"])
        docs = result["kept"]
    (docs | "Shards" >> WriteDocumentShards(out, config.output.num_shards,
                                            config.output.row_group_rows)
     | "ShardEntries" >> WriteJsonList(FileSystems.join(work, SHARDS_FILE)))
    dead_letters | "AllDeadLetters" >> beam.Flatten() | WriteDeadLetters(out)
    if duplicates:
        (duplicates | "AllDuplicates" >> beam.Flatten()
         | "WriteDuplicates" >> WriteJsonLines(FileSystems.join(out, DUPLICATES_DIR),
                                               "duplicates"))
    counts | "AllCounts" >> beam.Flatten() | "WriteCounts" >> WriteCounts(work)
    return [*STAGES, *(stage for stage, _ in dedup)]


def main(argv: Sequence[str]) -> int:
    args, beam_args = parse_args(argv)
    config = load_config(CorpusConfig, args.config, args.set)
    if config.output.num_shards < 1:
        raise UsageError("config key 'output.num_shards': must be at least 1")
    dedup = dedup_stages(args.dedup, config, args.decontaminate)
    for pattern in args.input:
        if not FileSystems.match([pattern])[0].metadata_list:
            raise UsageError(f"--input {pattern}: matches no file")
    _prepare_out(args.out, args.overwrite)

    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    stages = build_pipeline(pipeline, args.input, args.out, config, dedup)
    pipeline.run().wait_until_finish()

    manifest = assemble_manifest(args.out, stages, config, args)
    log.info("corpus: %d documents in %d shards; ledger: %s", manifest.rows,
             len(manifest.shards), ", ".join(f"{s.name} {s.kept}/{s.input}"
                                             for s in manifest.ledger.stages))
    return 0


def assemble_manifest(out: str, stages: list[str], config: CorpusConfig,
                      args: argparse.Namespace) -> Manifest:
    """Read back counts and shard entries, check the ledger, write `manifest.json`."""
    work = FileSystems.join(out, WORK_DIR)
    ledger = read_ledger(work, stages)
    problems = ledger.check()
    if problems:
        raise DataError("ledger does not balance: " + "; ".join(problems), path=out)
    shards = sorted((ShardEntry(**row) for row in read_json(FileSystems.join(work, SHARDS_FILE))),
                    key=lambda s: s.path)
    stats = read_stats(work)
    c = contract("documents")
    manifest = Manifest(
        schema={"name": c.name, "version": c.version}, shards=shards, ledger=ledger,
        extra={"pii_redactions": {k.removeprefix("pii."): n for k, n in stats.items()
                                  if k.startswith("pii.")},
               "inputs": list(args.input), "dedup": args.dedup, "config": to_dict(config)})
    if is_local(out):  # atomically, as every other job writes its manifest
        write_manifest(out.removeprefix("file://"), manifest)
    else:  # an object store publishes the object whole when the upload completes
        with FileSystems.create(FileSystems.join(out, MANIFEST)) as f:
            f.write((json.dumps(manifest.to_json(), indent=2) + "\n").encode("utf-8"))
    FileSystems.delete([_as_dir(work)])
    return manifest


def _as_dir(path: str) -> str:
    # object stores delete "prefix/" recursively; a local directory is removed with its files
    return path.rstrip("/") + "/"


def _prepare_out(out: str, overwrite: bool) -> None:
    existing = FileSystems.match([FileSystems.join(out, "*")])[0].metadata_list
    if existing and not overwrite:
        raise UsageError(f"--out {out}: not empty (pass --overwrite to replace it)")
    if existing:
        FileSystems.delete([_as_dir(out)])
    if not FileSystems.exists(out):
        FileSystems.mkdirs(out)


if __name__ == "__main__":
    from kiln.cli import entry

    sys.exit(entry(main))
