"""`kiln preference`: preference pairs (HH-RLHF transcripts, TRL pairs, scored completions),
unpaired KTO examples or prompt-only data -> `preference` / `unpaired` / `prompts` Arrow shards."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from dataprep.chat.formats import KIND, PREFERENCE_FORMATS, PairingRule, detect_format, iter_records
from dataprep.chat.hygiene import HygieneConfig, read_eval_prompts
from dataprep.chat.lengths import LengthPolicy
from dataprep.chat.template import TemplateOptions
from dataprep.chat_transforms import ChatJob, run_chat_job
from kiln.cli import entry
from kiln.config import load_config, to_dict
from kiln.errors import DataError, UsageError
from kiln.paths import expand


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
    parser.add_argument("--out", required=True, help="output dataset directory (local)")
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
