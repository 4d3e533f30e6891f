"""Remake `sample-pretrain/`: byte-level token shards of the HH-RLHF sample for `tiny-pretrain.yaml`.

Byte-level (UTF-8 bytes 0-255, end-of-document 256) keeps the sample independent of any trained
tokenizer, so the tiny config runs from a fresh clone. Written with the project's contract writers
(`schemas.indexed`, `schemas.manifest`), byte-identical to megatron's `IndexedDatasetBuilder`.

    python trainer/configs/data/make_sample_shards.py /path/to/hh-rlhf-harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil

import numpy as np

from schemas.indexed import IndexedWriter
from schemas.manifest import Ledger, Manifest, ShardEntry, write_manifest
from schemas.shards import sha256_file

EOD = 256
VOCAB_SIZE = 257
HERE = os.path.dirname(os.path.abspath(__file__))


def documents(source: str, limit: int) -> list[str]:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [row["chosen"].strip() for row in rows[:limit]]


def write_shard(prefix: str, docs: list[str]) -> int:
    writer = IndexedWriter(prefix, np.uint16)
    for doc in docs:
        writer.add_document(list(doc.encode("utf-8")) + [EOD])
    writer.finalize()
    return writer.tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="hh-rlhf-harmless-base-test.jsonl.gz")
    parser.add_argument("--out", default=os.path.join(HERE, "sample-pretrain"))
    parser.add_argument("--documents", type=int, default=600)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    docs = documents(args.source, args.documents)
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(args.out)
    shards = []
    for i in range(args.shards):
        name = f"shard-{i:05d}"
        prefix = os.path.join(args.out, name)
        part = docs[i::args.shards]
        tokens = write_shard(prefix, part)
        files = (prefix + ".bin", prefix + ".idx")
        shards.append(ShardEntry(path=name + ".bin", rows=len(part), tokens=tokens,
                                 bytes=sum(os.path.getsize(f) for f in files),
                                 sha256=sha256_file(*files), source="hh-rlhf"))
    ledger = Ledger()
    ledger.stage("tokenize", input=len(docs), kept=len(docs))
    write_manifest(args.out, Manifest(
        schema={"name": "megatron_indexed", "version": 1}, shards=shards,
        tokenizer={"fingerprint": "utf8-bytes-v1", "vocab_size": VOCAB_SIZE, "eod_id": EOD},
        ledger=ledger,
        extra={"source": "Anthropic HH-RLHF harmless-base test split, 'chosen' transcripts (MIT)",
               "made_by": "trainer/configs/data/make_sample_shards.py"}))
    shutil.copy(os.path.join(os.path.dirname(args.source), "hh-rlhf-LICENSE"),
                os.path.join(args.out, "LICENSE-hh-rlhf"))
    print(f"{len(docs)} documents, {sum(s.tokens for s in shards)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
