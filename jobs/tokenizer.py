"""`kiln tokenizer`: train a sentencepiece tokenizer on a deterministic sample of a corpus, or
adopt an existing one (sentencepiece `.model` or Hugging Face directory).

    kiln tokenizer --input CORPUS_DIR --vocab-size 32000 --out TOK_DIR \\
        [--model-type bpe|unigram] [--sample-bytes B] [Beam pipeline options...]
    kiln tokenizer --from EXISTING --out TOK_DIR

The sample is drawn by a Beam step: the documents of smallest hash of (source, id) whose sizes
add up to `--sample-bytes` (bounded memory per worker, the same sample on any runner). It is
written, one line per sentence, to `TOK_DIR/_work/sample.txt` (TOK_DIR's staging directory when
local; on object storage when TOK_DIR is remote, since a worker may share no disk with the
launcher) and streamed to sentencepiece; `_work` is removed before the tokenizer files are
written, `tokenizer_info.json` last.
TOK_DIR gets `tokenizer.model`, `tokenizer.vocab`, `fingerprint.txt` and `tokenizer_info.json`
(or, when adopting an HF tokenizer, its `tokenizer.json`/`tokenizer_config.json` instead of the
first two).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict

from dataprep.outputs import output_dir, remove_tree
from dataprep.tokenizer import (
    FINGERPRINT_FILE,
    SentencePieceTokenizer,
    TrainSpec,
    save_tokenizer_dir,
    train_sentencepiece,
    training_lines,
)
from jobs.beam_options import pipeline_options
from kiln.cli import entry
from kiln.errors import DataError, UsageError
from kiln.log import get_logger
from kiln.paths import (
    atomic_write,
    exists,
    join,
    open_path,
    read_bytes,
    read_text,
    write_bytes,
    write_text,
)

log = get_logger(__name__)
INFO_FILE = "tokenizer_info.json"
WORK_DIR = "_work"  # the training sample; removed before the tokenizer files are written


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln tokenizer", description=__doc__.splitlines()[0])
    p.add_argument("--input", action="append", default=[],
                   help="NAME=PATH or PATH: documents dataset dir, dir or glob of JSONL/Parquet")
    p.add_argument("--out", required=True,
                   help="tokenizer directory to write, local or gs:// / s3:// (any fsspec URL)")
    p.add_argument("--from", dest="adopt", help="adopt a sentencepiece .model or an HF dir")
    p.add_argument("--vocab-size", type=int, help="vocabulary size to train")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--sample-bytes", type=int, default=200_000_000,
                   help="training sample size in UTF-8 bytes")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--threads", type=int, default=1,
                   help="sentencepiece training threads (1 is deterministic)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id")
    p.add_argument("--rows-per-unit", type=int, default=16384)
    return p


def main(argv: Sequence[str]) -> int:
    args, beam_args = build_parser().parse_known_args(argv)
    if args.adopt:
        if args.input or args.vocab_size:
            raise UsageError("--from adopts a tokenizer: do not pass --input or --vocab-size")
        info = adopt(args.adopt, args.out)
    else:
        if not args.input or not args.vocab_size:
            raise UsageError("training needs --input and --vocab-size (or --from EXISTING)")
        if args.vocab_size < 16 or args.sample_bytes < 1:
            raise UsageError("--vocab-size must be at least 16 and --sample-bytes positive")
        info = train(args, beam_args)
    print(f"tokenizer {info['kind']} vocab {info['vocab_size']} fingerprint "
          f"{info['fingerprint'][:16]}... -> {args.out}")
    return 0


def train(args: argparse.Namespace, beam_args: Sequence[str]) -> dict:
    from dataprep.token_inputs import parse_sources, plan_units

    sources = parse_sources(args.input)
    units = plan_units(sources, args.rows_per_unit, args.text_field)
    spec = TrainSpec(vocab_size=args.vocab_size, model_type=args.model_type,
                     character_coverage=args.character_coverage, num_threads=args.threads)
    with output_dir(args.out) as out:
        work = join(out, WORK_DIR)
        sample_path = join(work, "sample.txt")
        stats = draw_sample(units, args.sample_bytes, sample_path, args.text_field,
                            args.id_field, beam_args, spec.max_sentence_length)
        if not stats["documents"]:
            raise DataError("no usable documents to train on", path=",".join(args.input))
        log.info("training %s, vocab %d, on %d documents (%d bytes, %d lines)", spec.model_type,
                 spec.vocab_size, stats["documents"], stats["bytes"], stats["lines"])
        tok = SentencePieceTokenizer(train_sentencepiece(_lines(sample_path), spec),
                                     name=os.path.basename(os.path.normpath(args.out)))
        remove_tree(work)
        info = {"kind": "sentencepiece", "model_type": spec.model_type,
                "vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint,
                "special_ids": tok.special_ids,
                "sample": {**stats, "max_bytes": args.sample_bytes},
                "source": {"inputs": list(args.input),
                           "files": sum(len(s.files) for s in sources)},
                "train": asdict(spec)}
        save_tokenizer_dir(out, tok)
        write_text(join(out, INFO_FILE), json.dumps(info, indent=2) + "\n")
    return info


def draw_sample(units, max_bytes: int, path: str, text_field: str, id_field: str,
                beam_args: Sequence[str], max_sentence_bytes: int) -> dict:
    """Run the sampling pipeline; the sample lands in `path` (local or remote, written by a
    worker) in hash order."""
    import apache_beam as beam

    from dataprep.tokenize_transforms import SampleDocuments

    def write(items: list) -> None:
        lines = 0
        with atomic_write(path, "wb") as f:
            for _, _, _, text in items:
                for line in training_lines(text, max_sentence_bytes):
                    f.write(f"{line}\n".encode())
                    lines += 1
        write_text(f"{path}.stats", json.dumps({"documents": len(items),
                                                "bytes": sum(i[2] for i in items),
                                                "lines": lines}))

    with beam.Pipeline(options=pipeline_options(beam_args)) as pipeline:
        _ = (pipeline
             | "Sample" >> SampleDocuments(units, max_bytes, text_field, id_field)
             | "WriteSample" >> beam.Map(write))
    return json.loads(read_text(f"{path}.stats"))


def _lines(path: str) -> Iterator[str]:
    # streamed: sentencepiece takes a sentence iterator, so a remote sample needs no local copy
    with open_path(path, "r", compression=None, encoding="utf-8") as f:
        for line in f:
            yield line.rstrip("\n")


def adopt(src: str, out_dir: str) -> dict:
    """Copy an existing tokenizer into TOK_DIR with its fingerprint and info."""
    from dataprep.hf_tokenizer import HF_FILES, TOKENIZER_JSON, HFTokenizer

    if src.endswith(".model") and exists(src):
        tok = SentencePieceTokenizer(read_bytes(src), name=os.path.basename(src))
        info = {"kind": "sentencepiece"}
        files = None
    elif exists(join(src, TOKENIZER_JSON)):
        tok = HFTokenizer.load(src)
        info = {"kind": "huggingface"}
        files = [f for f in HF_FILES if exists(join(src, f))]
    else:
        raise UsageError(f"--from {src!r}: not a sentencepiece .model file or a directory "
                         f"with {TOKENIZER_JSON}")
    info.update({"vocab_size": tok.vocab_size, "fingerprint": tok.fingerprint,
                 "special_ids": tok.special_ids, "source": {"adopted_from": src}})
    missing = [name for name, tid in tok.special_ids.items() if tid is None]
    if missing:
        log.warning("adopted tokenizer has no single id for %s: they are encoded as text",
                    ", ".join(missing))
    with output_dir(out_dir) as out:
        if files is None:
            save_tokenizer_dir(out, tok)
        else:
            for name in files:
                write_bytes(join(out, name), read_bytes(join(src, name)))
            write_text(join(out, FINGERPRINT_FILE), tok.fingerprint + "\n")
        write_text(join(out, INFO_FILE), json.dumps(info, indent=2) + "\n")
    return info


if __name__ == "__main__":
    sys.exit(entry(main))
