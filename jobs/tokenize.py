"""`kiln tokenize`: documents -> Megatron `.bin/.idx` token shards with a manifest (Beam).

    kiln tokenize --input web=CORPUS_DIR --input code=more/*.jsonl --tokenizer TOK_DIR \\
        --out SHARD_DIR [--shard-tokens N] [--max-doc-tokens N --long-docs split|drop] \\
        [--source-weight web=0.7 --source-weight code=0.3] [Beam pipeline options...]

Output: `<source>-<k>.bin/.idx` pairs (one document per sequence, EOS appended; a document longer
than --max-doc-tokens becomes several EOS-terminated sequences), `dead-letter/*.jsonl`, and
`manifest.json` (schema `megatron_indexed` v1) with, for a mixture of `web` and `code`:

    "sources": {"web": {"input": "web=...", "files": 12, "documents": 9000,
                        "split_documents": 40, "sequences": 9100, "tokens": 7000000,
                        "shards": ["web-00000", "web-00001"], "weight": 0.7}, "code": {...}},
    "extra": {"blend": [0.42, "web-00000", 0.28, "web-00001", 0.3, "code-00000"], ...}

`extra.blend` is megatron's flat `[weight, prefix, weight, prefix, ...]` (`--data-path`,
`megatron.core.datasets.utils.get_blend_from_list`), one entry per shard, prefixes relative to
SHARD_DIR: join them with the directory, then `BlendedMegatronDatasetConfig(blend=...)`. A
source's weight (default: its share of the tokens; `--source-weight` to set) is split among its
shards by their tokens; weights sum to 1.

SHARD_DIR may be on object storage (`gs://`, `s3://`, any fsspec URL) for workers that share no
disk: parts and shards are built in a worker's temp dir and uploaded whole, `manifest.json` last.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from dataprep.token_inputs import parse_sources, plan_units
from dataprep.token_shards import EncodeSettings
from dataprep.tokenizer import load_tokenizer
from jobs.beam_options import pipeline_options
from kiln.cli import entry
from kiln.errors import UsageError
from kiln.log import get_logger
from kiln.paths import is_local, makedirs

log = get_logger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln tokenize", description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", required=True,
                   help="NAME=PATH or PATH: a documents dataset dir, a dir or glob of "
                        "JSONL/Parquet files (repeat for a mixture)")
    p.add_argument("--source-tag", action="append",
                   help="name of each --input, in order (instead of NAME=PATH)")
    p.add_argument("--source-weight", action="append",
                   help="NAME=W blend weight (default: proportional to tokens)")
    p.add_argument("--tokenizer", required=True, help="TOK_DIR, a .model file or an HF dir")
    p.add_argument("--out", required=True,
                   help="output directory, local or gs:// / s3:// (any fsspec URL)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--shard-tokens", type=int, default=1 << 27,
                   help="target tokens per output shard")
    p.add_argument("--max-doc-tokens", type=int,
                   help="longest sequence, BOS/EOS included (default: no limit)")
    p.add_argument("--long-docs", choices=("split", "drop"), default="split",
                   help="split long documents into EOS-terminated chunks, or drop them")
    p.add_argument("--add-bos", action="store_true", help="prepend BOS to each document")
    p.add_argument("--rows-per-unit", type=int, default=16384,
                   help="Parquet rows per work unit (JSONL files are one unit each)")
    p.add_argument("--batch-docs", type=int, default=256, help="documents per encode call")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def tokenizer_info(tok, path: str) -> dict:
    """The manifest's `tokenizer` object: what the trainer checks shards against."""
    return {"fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
            "path": os.path.abspath(path) if is_local(path) else path, "name": tok.name,
            "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id}


def main(argv: Sequence[str]) -> int:
    import apache_beam as beam

    from dataprep.outputs import clear_dir, is_empty_dir, read_manifest_from
    from dataprep.tokenize_transforms import TokenizeToShards

    args, beam_args = build_parser().parse_known_args(argv)
    for flag, value, least in (("--shard-tokens", args.shard_tokens, 1),
                               ("--max-doc-tokens", args.max_doc_tokens, 2),
                               ("--rows-per-unit", args.rows_per_unit, 1),
                               ("--batch-docs", args.batch_docs, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    # workers write parts, shards and dead letters straight into OUT (local, or object storage
    # when workers share no disk); manifest.json, written last, marks the set complete
    out = os.path.abspath(args.out.removeprefix("file://")) if is_local(args.out) else \
        args.out.rstrip("/")
    if not is_empty_dir(out):
        if not args.overwrite:
            raise UsageError(f"--out {out} exists and is not empty (pass --overwrite)")
        clear_dir(out)
    makedirs(out)

    tok = load_tokenizer(args.tokenizer)
    if args.add_bos and tok.bos_id is None:
        raise UsageError(f"--add-bos: tokenizer {args.tokenizer!r} has no BOS token")
    sources = parse_sources(args.input, args.source_tag, args.source_weight)
    units = plan_units(sources, args.rows_per_unit, args.text_field)
    settings = EncodeSettings(text_field=args.text_field, id_field=args.id_field,
                              max_doc_tokens=args.max_doc_tokens, long_docs=args.long_docs,
                              add_bos=args.add_bos, batch_docs=args.batch_docs)
    log.info("tokenizing %d files (%d units) from %d source(s) with %s (vocab %d)",
             sum(len(s.files) for s in sources), len(units), len(sources), tok.name,
             tok.vocab_size)
    with beam.Pipeline(options=pipeline_options(beam_args)) as pipeline:
        _ = pipeline | "TokenizeToShards" >> TokenizeToShards(
            sources, units, tok, tokenizer_info(tok, args.tokenizer), settings, out,
            args.shard_tokens)

    manifest = read_manifest_from(out)
    for problem in manifest.ledger.check():
        log.error("ledger: %s", problem)
    stages = {s.name: s for s in manifest.ledger.stages}
    print(f"wrote {len(manifest.shards)} shard(s), {manifest.rows:,} sequences, "
          f"{manifest.tokens:,} tokens to {out} (read errors {stages['read'].error}, "
          f"encode errors {stages['tokenize'].error}, filtered {stages['tokenize'].filtered})")
    return 0


if __name__ == "__main__":
    sys.exit(entry(main))
