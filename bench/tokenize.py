"""Tokenization throughput, side by side on the same documents and tokenizer:

- raw: sentencepiece batch encoding of in-memory texts in one process (the practical limit);
- megatron: what Megatron-LM's tools/preprocess_data.py does — `multiprocessing.Pool.imap` over
  JSON lines (chunksize 32), an Encoder that json-parses and tokenizes one document per call with
  megatron's own sentencepiece tokenizer and appends EOD, and `IndexedDatasetBuilder.add_document`
  in the parent;
- ours: `kiln tokenize`'s core (read JSONL units, batch encode, write parts, plan, write shards)
  timed in one process without pipeline start-up, and the whole job on Beam's FnApiRunner with
  the same number of workers as the megatron job (start-up included).

Each of raw, megatron and our core runs `--rounds` times, interleaved, and keeps its best time
(the machines this runs on are shared). Per core: tokens / (wall seconds x cores a run uses: 1 for
raw and our core, `--workers` for the megatron job and our pipeline), and, less distorted by
other load, tokens per CPU-second (this process plus the children it reaped; idle waits of the
megatron parent are not counted, which favours megatron). Last line: JSON with the figures,
`ratio` (ours / megatron), `ratio_vs_raw` (ours / raw) and their CPU-second counterparts.

    python bench/tokenize.py [--workers 2] [--vocab-size 8000] [--rounds 3] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import resource
import sys
import tempfile
import time

# Run as `python bench/tokenize.py`, this file's folder is sys.path[0] and its name would shadow
# the standard `tokenize` module (linecache imports it): put the repository root there instead.
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench.sample_docs import node_doc_texts  # noqa: E402 - needs the root on sys.path

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "sample_data")


def load_documents() -> list[str]:
    """HH-RLHF dialogues (chosen and rejected) and the Node.js API pages stripped to text."""
    docs = []
    with gzip.open(f"{DATA}/hh-rlhf-harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            pair = json.loads(line)
            docs += [pair["chosen"], pair["rejected"]]
    return docs + node_doc_texts()


class MegatronEncoder:
    """tools/preprocess_data.py's Encoder (json_keys=["text"], no sentence splitting,
    --append-eod), with megatron-core's sentencepiece tokenizer."""

    def __init__(self, model_path: str) -> None:
        self.model_path = model_path

    def initializer(self) -> None:
        from megatron.core.tokenizers import MegatronTokenizer

        MegatronEncoder.tokenizer = MegatronTokenizer.from_pretrained(
            self.model_path, metadata_path={"library": "sentencepiece"})

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in ["text"]:
            doc_ids, sentence_lens = [], []
            for sentence in [data[key]]:
                sentence_ids = MegatronEncoder.tokenizer.tokenize(sentence)
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0:
                doc_ids.append(MegatronEncoder.tokenizer.eod)
                sentence_lens[-1] += 1
            ids[key], lens[key] = doc_ids, sentence_lens
        return ids, lens, len(json_line)


def run_megatron(jsonl: str, model_path: str, out_prefix: str, workers: int) -> int:
    from megatron.core.datasets import indexed_dataset

    encoder = MegatronEncoder(model_path)
    encoder.initializer()
    vocab = MegatronEncoder.tokenizer.vocab_size
    with open(jsonl, encoding="utf-8") as fin:
        pool = multiprocessing.Pool(workers, initializer=encoder.initializer)
        encoded = pool.imap(encoder.encode, fin, 32)
        builder = indexed_dataset.IndexedDatasetBuilder(
            f"{out_prefix}.bin", dtype=indexed_dataset.DType.optimal_dtype(vocab))
        tokens = 0
        for doc, sentence_lens, _ in encoded:
            for key in doc:
                builder.add_document(doc[key], sentence_lens[key])
                tokens += len(doc[key])
        builder.finalize(f"{out_prefix}.idx")
        pool.close()
        pool.join()
    return tokens


def run_raw(texts: list[str], tok) -> int:
    ids = tok.sp.encode(texts, num_threads=1)
    return sum(map(len, ids)) + len(ids)  # + one EOS per doc


def run_ours_core(files: list[str], tok, out: str) -> int:
    from dataprep.token_inputs import parse_sources, plan_units
    from dataprep.token_shards import EncodeSettings, plan_shards, tokenize_unit, write_shard

    units = plan_units(parse_sources([f"bench={os.path.dirname(files[0])}"]), 16384)
    parts = [tokenize_unit(u, tok, EncodeSettings(), os.path.join(out, "_parts"))[0]
             for u in units]
    shards = [write_shard(t, out) for t in plan_shards(parts, 1 << 27)]
    return sum(s.tokens for s in shards if s)


def run_ours_pipeline(in_dir: str, tok_dir: str, out: str, workers: int) -> int:
    from jobs import tokenize as tokenize_job
    from schemas.manifest import read_manifest

    tokenize_job.main(["--input", f"bench={in_dir}", "--tokenizer", tok_dir, "--out", out,
                       "--direct_running_mode=multi_processing",
                       f"--direct_num_workers={workers}"])
    return read_manifest(out).tokens


def timed(run) -> tuple[int, float, float]:
    """(tokens, wall seconds, CPU seconds of this process and of the children it reaped)."""
    def cpu() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
            resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    wall, used = time.perf_counter(), cpu()
    tokens = run()
    return tokens, time.perf_counter() - wall, cpu() - used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=1, help="repeat the documents N times")
    parser.add_argument("--files", type=int, default=8, help="JSONL files for our job")
    parser.add_argument("--tokenizer", help="existing TOK_DIR (default: train one)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds of raw/megatron/core (best kept)")
    args = parser.parse_args()

    from dataprep.tokenizer import (
        SentencePieceTokenizer,
        TrainSpec,
        load_tokenizer,
        save_tokenizer_dir,
        train_sentencepiece,
        training_lines,
    )

    docs = [d for d in load_documents() if d] * args.repeat
    with tempfile.TemporaryDirectory(prefix="kiln-bench-tok-") as tmp:
        tok_dir = args.tokenizer or os.path.join(tmp, "tok")
        if not args.tokenizer:
            lines = [ln for d in docs[::7] for ln in training_lines(d, 16384)]
            proto = train_sentencepiece(lines, TrainSpec(vocab_size=args.vocab_size))
            save_tokenizer_dir(tok_dir, SentencePieceTokenizer(proto))
        tok = load_tokenizer(tok_dir)
        in_dir = os.path.join(tmp, "in")
        os.makedirs(in_dir)
        lines = [json.dumps({"id": str(i), "text": d}) + "\n" for i, d in enumerate(docs)]
        with open(os.path.join(tmp, "all.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(lines)
        for k in range(args.files):
            with open(os.path.join(in_dir, f"part-{k:03d}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(lines[k::args.files])
        files = sorted(os.path.join(in_dir, n) for n in os.listdir(in_dir))
        model = os.path.join(tok_dir, "tokenizer.model")

        # The machine is shared: interleave the rounds and keep each contender's best.
        runs = {
            "raw": lambda r: run_raw(docs, tok),
            "megatron": lambda r: run_megatron(os.path.join(tmp, "all.jsonl"), model,
                                               os.path.join(tmp, f"megatron{r}"), args.workers),
            "core": lambda r: run_ours_core(files, tok, os.path.join(tmp, f"core{r}")),
        }
        best: dict[str, tuple[int, float, float]] = {}
        for r in range(args.rounds):
            for name, run in runs.items():
                result = timed(lambda run=run, r=r: run(r))
                if name not in best or result[1] < best[name][1]:
                    best[name] = result
        best["pipeline"] = timed(lambda: run_ours_pipeline(
            in_dir, tok_dir, os.path.join(tmp, "pipe"), args.workers))
    tokens = {name: b[0] for name, b in best.items()}
    assert len(set(tokens.values())) == 1, tokens
    cores = {"raw": 1, "megatron": args.workers, "core": 1, "pipeline": args.workers}
    # per core, by wall time x cores used, and by CPU seconds (less distorted by other load)
    wall = {n: b[0] / b[1] / cores[n] for n, b in best.items()}
    cpu = {n: b[0] / b[2] for n, b in best.items() if n != "pipeline"}
    labels = {"raw": "raw sentencepiece batch, 1 process",
              "megatron": f"megatron preprocess_data, {args.workers} workers",
              "core": "kiln tokenize core, 1 process",
              "pipeline": f"kiln tokenize FnApiRunner, {args.workers} workers, with start-up"}
    print(f"{len(docs):,} documents, {tokens['raw']:,} tokens, vocab {tok.vocab_size}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for n, b in best.items():
        per_cpu = f"{cpu[n]:12,.0f} tok/CPU-s" if n in cpu else ""
        print(f"{labels[n]:<58} {b[1]:7.2f} s  {wall[n]:12,.0f} tok/s/core  {per_cpu}")
    print(json.dumps({
        "documents": len(docs), "tokens": tokens["raw"], "workers": args.workers,
        "raw_tokens_per_s_per_core": round(wall["raw"]),
        "megatron_tokens_per_s_per_core": round(wall["megatron"]),
        "ours_tokens_per_s_per_core": round(wall["core"]),
        "ours_pipeline_tokens_per_s_per_core": round(wall["pipeline"]),
        "raw_tokens_per_cpu_s": round(cpu["raw"]),
        "megatron_tokens_per_cpu_s": round(cpu["megatron"]),
        "ours_tokens_per_cpu_s": round(cpu["core"]),
        "ratio": round(wall["core"] / wall["megatron"], 3),
        "ratio_vs_raw": round(wall["core"] / wall["raw"], 3),
        "cpu_ratio": round(cpu["core"] / cpu["megatron"], 3),
        "cpu_ratio_vs_raw": round(cpu["core"] / cpu["raw"], 3),
        "pipeline_ratio": round(wall["pipeline"] / wall["megatron"], 3),
        "goal": 1.5, "goal_vs_raw": 0.8,
    }))

if __name__ == "__main__":
    main()
