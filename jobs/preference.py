"""`kiln preference`: preference pairs (HH-RLHF transcripts, TRL pairs, scored completions),
unpaired KTO examples or prompt-only data -> `preference` / `unpaired` / `prompts` Arrow shards."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import apache_beam as beam

from dataprep.chat.formats import KIND, PREFERENCE_FORMATS, PairingRule, detect_format, iter_records
from dataprep.chat.hygiene import HygieneConfig, read_eval_prompts
from dataprep.chat.lengths import LengthPolicy
from dataprep.chat.template import TemplateOptions
from dataprep.chat_transforms import (
    COUNTS_FILE,
    NOTE,
    SHARDS_FILE,
    WORK_DIR,
    ChatJob,
    build_pipeline,
)
from dataprep.outputs import output_dir, remove_tree, write_manifest_to
from jobs.beam_options import pipeline_options
from kiln.cli import entry
from kiln.config import load_config, to_dict
from kiln.errors import DataError, UsageError
from kiln.log import get_logger
from kiln.paths import expand, join, read_text
from schemas.contracts import contract
from schemas.manifest import Ledger, Manifest, ShardEntry

log = get_logger(__name__)


@dataclass
class PreferenceConfig:
    format: str = "auto"  # auto | hh | pairs | scored | unpaired | prompts
    template: TemplateOptions = field(default_factory=TemplateOptions)
    length: LengthPolicy = field(default_factory=LengthPolicy)
    hygiene: HygieneConfig = field(default_factory=HygieneConfig)
    pairing: PairingRule = field(default_factory=PairingRule)
    num_shards: int = 1


def add_common_args(parser: argparse.ArgumentParser, formats: Sequence[str]) -> None:
    parser.add_argument("--input", nargs="+", required=True, help="JSONL (.gz/.zst) or Parquet files/globs")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory (kiln tokenizer)")
    parser.add_argument("--out", required=True,
                        help="output dataset directory, local or gs:// / s3:// (any fsspec URL)")
    parser.add_argument("--format", choices=("auto", *formats), help="input format (default: auto)")
    parser.add_argument("--decontaminate", nargs="+", metavar="FILE",
                        help="evaluation prompt files to decontaminate against")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def common_overrides(args: argparse.Namespace) -> list[str]:
    out = list(args.set)
    if args.format:
        out.append(f"format={args.format}")
    if args.decontaminate:
        out.append(f"hygiene.decontaminate=[{', '.join(repr(p) for p in args.decontaminate)}]")
    return out


def resolve_inputs(patterns: Sequence[str]) -> list[str]:
    inputs = expand(list(patterns))
    if not inputs:
        raise UsageError(f"--input: no files match {' '.join(patterns)}")
    names = [os.path.basename(p) for p in inputs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"--input: file names must be unique (record ids use them): {', '.join(dupes)}")
    return inputs


def eval_prompts(cfg: HygieneConfig) -> list[str]:
    return [p for path in cfg.decontaminate for p in read_eval_prompts(path)]


def detect_kind(inputs: Sequence[str], formats: Sequence[str]) -> str:
    """The dataset kind for `--format auto`: from the first readable record."""
    for path in inputs:
        for line, rec, _ in iter_records(path):
            if isinstance(rec, dict):
                fmt = detect_format(rec)
                if fmt not in formats:
                    raise DataError(f"cannot tell the format (keys: {', '.join(sorted(rec))}); "
                                    f"pass --format", path=path, row=line)
                return KIND[fmt]
    raise DataError("no readable record in the inputs", path=inputs[0])


STAGES = ("read", "parse", "pair", "hygiene", "length", "pack")
# `pair` (scored completions, all_pairs rule) fans out: its unit is the candidate pair (each
# kept record offers n(n-1)/2), so its input is not the records `parse` kept; its ledger stage
# records `derived_from` (the records it came from), which the chain check compares instead.
FANOUT_STAGE = "pair"


def ledger_from_counts(counts: dict[str, int], stages: Iterable[str]) -> tuple[Ledger, dict[str, int]]:
    """(Ledger, notes): each stage's input is the sum of its outcomes, so the manifest check
    `input == previous kept` compares independent counts."""
    ledger, notes = Ledger(), {}
    for stage in stages:
        kept = error = duplicate = 0
        filtered: dict[str, int] = {}
        for key, n in sorted(counts.items()):
            name, _, outcome = key.partition("/")
            if name != stage:
                continue
            kind, _, reason = outcome.partition(":")
            if kind == "kept":
                kept += n
            elif kind == "error":
                error += n
            elif kind == "duplicate":
                duplicate += n
            elif kind == "filtered":
                filtered[reason] = filtered.get(reason, 0) + n
            elif kind == NOTE:
                notes[f"{stage}.{reason}"] = n
        ledger.stage(stage, kept + error + duplicate + sum(filtered.values()), kept, filtered,
                     duplicate, error)
    return ledger, notes


def run_chat_job(job: ChatJob, beam_args: list[str], tokenizer: Any, config: dict) -> Manifest:
    """Run the pipeline into the output directory (`dataprep.outputs.output_dir`: a local one is
    staged and renamed into place, a remote one written in place), then assemble `manifest.json`
    from the count files it wrote, check the ledger and write the manifest last."""
    with output_dir(job.out_dir) as staging:
        with beam.Pipeline(options=pipeline_options(beam_args)) as p:
            build_pipeline(p, replace(job, out_dir=staging), tokenizer.fingerprint)
        work = join(staging, WORK_DIR)
        counts = json.loads(read_text(join(work, COUNTS_FILE)))
        shards = sorted((ShardEntry(**s) for s in json.loads(read_text(join(work, SHARDS_FILE)))),
                        key=lambda s: s.path)
        remove_tree(work)
        fanout = job.rule.rule == "all_pairs"
        stages = [s for s in STAGES if (s != "pack" or job.pack) and (s != FANOUT_STAGE or fanout)]
        ledger, notes = ledger_from_counts(counts, stages)
        if fanout:
            by_name = {x.name: x for x in ledger.stages}
            by_name[FANOUT_STAGE].derived_from = by_name["parse"].kept
        problems = ledger.check()
        if problems:
            raise DataError("ledger does not balance: " + "; ".join(problems), path=job.out_dir)
        name = "sft_packed" if job.pack else job.kind
        extra: dict[str, Any] = {"config": config, "counts": notes,
                                 "inputs": list(job.inputs)}
        if fanout:
            extra["fanout"] = {"stage": FANOUT_STAGE, "records": by_name["parse"].kept,
                               "candidates": by_name[FANOUT_STAGE].input}
        if job.pack:
            rows, tokens = notes.get("pack.rows", 0), notes.get("pack.tokens", 0)
            extra["packing"] = {"max_seq_len": job.max_seq_len, "rows": rows, "tokens": tokens,
                                "efficiency": tokens / (rows * job.max_seq_len) if rows else 0.0}
            log.info("packed %d conversations into %d rows of %d: efficiency %.3f",
                     ledger.stages[-1].kept, rows, job.max_seq_len, extra["packing"]["efficiency"])
        manifest = Manifest(
            schema={"name": name, "version": contract(name).version}, shards=shards,
            tokenizer={"fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                       "path": job.tokenizer_path},
            ledger=ledger, extra=extra)
        write_manifest_to(staging, manifest)
    for s in ledger.stages:
        log.info("%-8s input %d kept %d filtered %s duplicate %d error %d", s.name, s.input,
                 s.kept, s.filtered or "{}", s.duplicate, s.error)
    if notes:
        log.info("counts: %s", ", ".join(f"{k} {v}" for k, v in sorted(notes.items())))
    log.info("wrote %d %s rows (%d tokens) in %d shards to %s", manifest.rows, name,
             manifest.tokens, len(shards), job.out_dir)
    return manifest


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kiln preference", description=__doc__)
    add_common_args(parser, PREFERENCE_FORMATS)
    args, beam_args = parser.parse_known_args(argv)
    cfg = load_config(PreferenceConfig, args.config, common_overrides(args))
    if cfg.format != "auto" and cfg.format not in PREFERENCE_FORMATS:
        raise UsageError(f"--format must be auto or one of {', '.join(PREFERENCE_FORMATS)}")
    from dataprep.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    inputs = resolve_inputs(args.input)
    kind = KIND[cfg.format] if cfg.format != "auto" else detect_kind(inputs, PREFERENCE_FORMATS)
    job = ChatJob(inputs=inputs, tokenizer_path=args.tokenizer, out_dir=args.out, kind=kind,
                  fmt=cfg.format, allowed=PREFERENCE_FORMATS, template=cfg.template,
                  length=cfg.length, dedup=cfg.hygiene.dedup, eval_prompts=eval_prompts(cfg.hygiene),
                  ngram=cfg.hygiene.ngram, rule=cfg.pairing, num_shards=cfg.num_shards)
    run_chat_job(job, beam_args, tok, to_dict(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(entry(main))
