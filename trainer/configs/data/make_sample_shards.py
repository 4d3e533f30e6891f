"""Remake `sample-pretrain/`: byte-level token shards of the HH-RLHF sample for `tiny-pretrain.yaml`.

Byte-level (UTF-8 bytes 0-255, end-of-document 256) keeps the sample independent of any trained
tokenizer, so the tiny config runs from a fresh clone. Written with megatron's own
`IndexedDatasetBuilder`, so the shards are exactly what `GPTDataset` reads.

    python trainer/configs/data/make_sample_shards.py /path/to/hh-rlhf-harmless-base-test.jsonl.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

EOD = 256
VOCAB_SIZE = 257
HERE = os.path.dirname(os.path.abspath(__file__))


def documents(source: str, limit: int) -> list[str]:
    with gzip.open(source, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [row["chosen"].strip() for row in rows[:limit]]


def write_shard(prefix: str, docs: list[str]) -> int:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    tokens = 0
    for doc in docs:
        ids = list(doc.encode("utf-8")) + [EOD]
        builder.add_item(torch.tensor(ids, dtype=torch.int64))
        builder.end_document()
        tokens += len(ids)
    builder.finalize(prefix + ".idx")
    return tokens


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


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
        shards.append({"path": name + ".bin", "rows": len(part), "tokens": tokens,
                       "bytes": os.path.getsize(prefix + ".bin"), "sha256": sha256(prefix + ".bin")})
    manifest = {
        "schema": {"name": "megatron_indexed", "version": 1},
        "tokenizer": {"fingerprint": "utf8-bytes-v1", "vocab_size": VOCAB_SIZE, "eod_id": EOD},
        "shards": shards,
        "source": "Anthropic HH-RLHF harmless-base test split, 'chosen' transcripts (MIT)",
    }
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    shutil.copy(os.path.join(os.path.dirname(args.source), "hh-rlhf-LICENSE"),
                os.path.join(args.out, "LICENSE-hh-rlhf"))
    print(f"{len(docs)} documents, {sum(s['tokens'] for s in shards)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
