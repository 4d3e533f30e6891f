"""Exact deduplication per record: the content key of a document's normalised text."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

from dataprep.dedup.normalize import normalize_text, parse_normalization
from kiln.errors import ConfigError


@dataclass
class ExactDedupConfig:
    """Documents whose normalised texts are equal are duplicates; one per group survives.

    `normalization` is a list of steps (see `dataprep.dedup.normalize`); the default folds Unicode
    compatibility forms, case and whitespace but keeps punctuation and digits, so only texts that
    read the same are merged. Add `punctuation,digits` for a looser match.
    """

    normalization: str = "nfkc,lower,whitespace"
    hot_key_threshold: int = 1000  # a text repeated more often than this joins via a side input

    def __post_init__(self) -> None:
        parse_normalization(self.normalization)
        if self.hot_key_threshold < 1:
            raise ConfigError("hot_key_threshold", f"must be >= 1, got {self.hot_key_threshold}")


def exact_key(text: str, normalization: str) -> bytes:
    """The 128-bit xxh3 digest of the UTF-8 normalised text (collision odds ~2^-64 at 2^32 docs)."""
    return xxhash.xxh3_128_digest(normalize_text(text, normalization).encode("utf-8"))
