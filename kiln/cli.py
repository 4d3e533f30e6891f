"""The `kiln` console script: one subcommand per job, each module imported only when used."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

from kiln.errors import KilnError
from kiln.log import get_logger, setup_logging

log = get_logger(__name__)

# name -> ("module:function", one-line help). Each function takes argv and returns an exit code.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crawl": ("jobs.crawl:main", "polite crawler writing WARC files"),
    "corpus": ("jobs.corpus:main", "WARC/WET/ARC -> cleaned, deduplicated Parquet documents (Beam)"),
    "tokenizer": ("jobs.tokenizer:main", "train or adopt a sentencepiece tokenizer"),
    "tokenize": ("jobs.tokenize:main", "documents -> Megatron .bin/.idx token shards (Beam)"),
    "sft": ("jobs.sft:main", "conversations -> SFT Arrow shards (Beam)"),
    "preference": ("jobs.preference:main", "preference / unpaired / prompt data -> Arrow shards (Beam)"),
    "validate": ("schemas.validate:main", "check dataset directories or shards against their contract"),
    "plan": ("tensor_parallel.plan:main", "rank TP/PP/DP layouts by estimated memory per GPU"),
    "generate": ("trainer.generate:main", "sample from a checkpoint"),
    "import-hf": ("trainer.hf.import_hf:main", "Hugging Face Llama/Mistral/Qwen2 -> megatron checkpoint"),
    "export-hf": ("trainer.hf.export_hf:main", "megatron checkpoint -> Hugging Face directory"),
    "demo": ("jobs.demo:main", "the whole lifecycle on the embedded sample data, on CPU"),
}


def resolve(name: str) -> Callable[[Sequence[str]], int]:
    module, func = SUBCOMMANDS[name][0].split(":")
    return getattr(importlib.import_module(module), func)


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: kiln <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def run_main(func: Callable[[Sequence[str]], int | None], argv: Sequence[str]) -> int:
    """Run a subcommand, turning expected failures into a one-line message and an exit code."""
    try:
        return int(func(list(argv)) or 0)
    except KilnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry(func: Callable[[Sequence[str]], int | None]) -> int:
    """For `python -m jobs.<name>`: `sys.exit(entry(main))`."""
    setup_logging()
    return run_main(func, sys.argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown command '{name}'\n\n{usage()}", file=sys.stderr)
        return 2
    return run_main(resolve(name), rest)


if __name__ == "__main__":
    sys.exit(main())
