"""Small datasets of every contract, written with the project's own writers."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from schemas.indexed import IndexedWriter
from schemas.manifest import Ledger, Manifest, write_manifest
from schemas.shards import indexed_shard_entry, write_arrow_shard, write_parquet_shard

VOCAB = 500
FINGERPRINT = "f" * 64


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def rows_for(name: str, n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        base = {"id": f"{name}-{i}", "source": "test.jsonl"}
        if name == "sft":
            ln = rng.randrange(4, 40)
            rows.append({**base, "input_ids": _ids(rng, ln),
                         "loss_mask": [rng.randrange(2) for _ in range(ln)]})
        elif name == "sft_packed":
            lens = [rng.randrange(3, 12) for _ in range(rng.randrange(1, 4))]
            total = sum(lens)
            rows.append({"input_ids": _ids(rng, total),
                         "loss_mask": [rng.randrange(2) for _ in range(total)],
                         "seq_boundaries": [0, *np.cumsum(lens).tolist()],
                         "ids": [f"c{i}-{j}" for j in range(len(lens))],
                         "sources": ["test.jsonl"] * len(lens)})
        elif name == "preference":
            rows.append({**base, "prompt_ids": _ids(rng, 8), "chosen_ids": _ids(rng, 5),
                         "rejected_ids": _ids(rng, 6), "chosen_score": None,
                         "rejected_score": None, "margin": None})
        elif name == "unpaired":
            rows.append({**base, "prompt_ids": _ids(rng, 8), "completion_ids": _ids(rng, 5),
                         "label": bool(i % 2)})
        elif name == "prompts":
            rows.append({**base, "prompt_ids": _ids(rng, 8), "reference": None})
        elif name == "documents":
            rows.append({"id": f"d{i}", "url": f"https://example.org/{i}", "date": "2026-01-01",
                         "text": f"document {i} " * rng.randrange(1, 20), "language": "en",
                         "language_score": 0.99, "filters": ["gopher_quality"],
                         "source": "x.warc.gz"})
    return rows


def make_dataset(directory: str, name: str, shards: int = 2, rows: int = 12) -> str:
    """A dataset directory of contract `name` with manifest and a balanced ledger."""
    os.makedirs(directory, exist_ok=True)
    entries = []
    total = 0
    for s in range(shards):
        if name == "megatron_indexed":
            prefix = os.path.join(directory, f"shard-{s:05d}")
            w = IndexedWriter(prefix, np.uint16)
            rng = random.Random(s)
            for _ in range(rows):
                w.add_document(_ids(rng, rng.randrange(1, 30)))
            w.finalize()
            entries.append(indexed_shard_entry(prefix, root=directory))
        elif name == "documents":
            entries.append(write_parquet_shard(os.path.join(directory, f"shard-{s:05d}.parquet"),
                                               rows_for(name, rows, s), name, root=directory))
        else:
            entries.append(write_arrow_shard(os.path.join(directory, f"shard-{s:05d}.arrow"),
                                             rows_for(name, rows, s), name, FINGERPRINT,
                                             root=directory))
        total += rows
    ledger = Ledger()
    ledger.stage("read", input=total + 3, kept=total + 1, error=2)
    ledger.stage("filter", input=total + 1, kept=total, filtered={"too_long": 1})
    tokenizer = None if name == "documents" else {"fingerprint": FINGERPRINT, "vocab_size": VOCAB}
    write_manifest(directory, Manifest(schema={"name": name, "version": 1}, shards=entries,
                                       tokenizer=tokenizer, ledger=ledger))
    return directory


CONTRACT_NAMES = ["sft", "sft_packed", "preference", "unpaired", "prompts", "documents",
                  "megatron_indexed"]


@pytest.fixture(params=CONTRACT_NAMES)
def dataset(request, tmp_path) -> tuple[str, str]:
    return request.param, make_dataset(str(tmp_path / request.param), request.param)
