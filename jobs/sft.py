"""`kiln sft`: conversations (OpenAI messages, ShareGPT, Alpaca, prompt/completion) -> `sft` Arrow
shards with assistant-only loss masks, or `sft_packed` rows with `--pack`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from dataprep.chat.formats import SFT_FORMATS, PairingRule
from dataprep.chat.hygiene import HygieneConfig
from dataprep.chat.lengths import LengthPolicy
from dataprep.chat.template import TemplateOptions
from dataprep.chat_transforms import ChatJob
from jobs.preference import (
    add_common_args,
    common_overrides,
    eval_prompts,
    resolve_inputs,
    run_chat_job,
)
from kiln.cli import entry
from kiln.config import load_config, to_dict
from kiln.errors import UsageError


@dataclass
class SftConfig:
    format: str = "auto"  # auto | messages | sharegpt | alpaca | prompt-completion
    template: TemplateOptions = field(default_factory=TemplateOptions)
    # the total cap is max_seq_len; length.max_total_tokens, when set, may only lower it
    length: LengthPolicy = field(default_factory=lambda: LengthPolicy(max_total_tokens=None))
    hygiene: HygieneConfig = field(default_factory=HygieneConfig)
    pack: bool = False
    max_seq_len: int = 4096
    pack_groups: int = 1  # packing buckets (by id hash); more buckets, more parallel packing
    num_shards: int = 1


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kiln sft", description=__doc__)
    add_common_args(parser, SFT_FORMATS)
    parser.add_argument("--pack", action="store_true", help="pack conversations into max-seq-len rows")
    parser.add_argument("--max-seq-len", type=int, help="total tokens per conversation / packed row")
    args, beam_args = parser.parse_known_args(argv)
    overrides = common_overrides(args)
    if args.pack:
        overrides.append("pack=true")
    if args.max_seq_len is not None:
        overrides.append(f"max_seq_len={args.max_seq_len}")
    cfg = load_config(SftConfig, args.config, overrides)
    if cfg.format != "auto" and cfg.format not in SFT_FORMATS:
        raise UsageError(f"--format must be auto or one of {', '.join(SFT_FORMATS)}")
    if cfg.max_seq_len < 8 or cfg.pack_groups < 1 or cfg.num_shards < 1:
        raise UsageError("max_seq_len must be >= 8, pack_groups and num_shards >= 1")
    total = min(cfg.max_seq_len, cfg.length.max_total_tokens or cfg.max_seq_len)
    from dataprep.tokenizer import load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    job = ChatJob(inputs=resolve_inputs(args.input), tokenizer_path=args.tokenizer, out_dir=args.out,
                  kind="sft", fmt=cfg.format, allowed=SFT_FORMATS, template=cfg.template,
                  length=replace(cfg.length, max_total_tokens=total), dedup=cfg.hygiene.dedup,
                  eval_prompts=eval_prompts(cfg.hygiene), ngram=cfg.hygiene.ngram,
                  rule=PairingRule(), num_shards=cfg.num_shards, pack=cfg.pack,
                  max_seq_len=cfg.max_seq_len, pack_groups=cfg.pack_groups)
    run_chat_job(job, beam_args, tok, to_dict(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(entry(main))
