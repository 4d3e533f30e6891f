"""Shared fixtures for the chat-data tests: a small sentencepiece tokenizer trained on HH-RLHF."""

from __future__ import annotations

import gzip
import json
import os

from dataprep.chat.formats import HH_TURN
from dataprep.tokenizer import (
    SentencePieceTokenizer,
    TrainSpec,
    save_tokenizer_dir,
    train_sentencepiece,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HH = os.path.join(ROOT, "jobs", "sample_data", "hh-rlhf-harmless-base-test.jsonl.gz")
SFT_SAMPLE = os.path.join(ROOT, "jobs", "sample_data", "hh-rlhf-chosen-messages.jsonl")


def hh_rows(limit: int | None = None) -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:limit] if limit else rows


def train_tokenizer(tok_dir: str, vocab_size: int = 1000) -> SentencePieceTokenizer:
    texts = [t.strip() for r in hh_rows(600) for t in HH_TURN.split(r["chosen"])
             if t.strip() and t not in ("Human", "Assistant")]
    tok = SentencePieceTokenizer(train_sentencepiece(texts, TrainSpec(vocab_size=vocab_size)))
    save_tokenizer_dir(tok_dir, tok)
    return tok
