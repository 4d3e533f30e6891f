"""Text normalisation shared by exact dedup, MinHash shingling and decontamination.

A normalisation is a comma-separated list of steps, always applied in this fixed order whatever
order they are listed in (so two spellings of one set of steps give one result):

- `nfkc`: Unicode NFKC (compatibility forms folded: full-width letters, ligatures, `ﬁ` -> `fi`).
- `lower`: `str.lower()` (Unicode-aware).
- `punctuation`: every Unicode punctuation or symbol character (categories P*, S*) becomes a space.
- `digits`: every run of Unicode decimal digits becomes `0` (`v18.2` and `v20.1` compare equal).
- `whitespace`: runs of whitespace collapse to one space; leading/trailing space is removed.

`""` (no steps) compares the raw text byte for byte.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache

from kiln.errors import ConfigError

STEPS = ("nfkc", "lower", "punctuation", "digits", "whitespace")

_WHITESPACE = re.compile(r"\s+")
_DIGITS = re.compile(r"\d+")


@lru_cache(maxsize=1)
def _punctuation() -> re.Pattern:
    """Every code point whose category is punctuation (P*) or symbol (S*), as ranges. Planes 0-1
    hold all of them (the last is U+1FBCA in Unicode 14; planes 2-16 are ideographs, tags and
    private use), and scanning two planes instead of seventeen saves a second per worker."""
    ranges: list[list[int]] = []
    for c in range(0x20000):
        if unicodedata.category(chr(c))[0] in "PS":
            if ranges and ranges[-1][1] == c - 1:
                ranges[-1][1] = c
            else:
                ranges.append([c, c])
    return re.compile("[" + "".join(
        re.escape(chr(a)) + ("-" + re.escape(chr(b)) if b > a else "") for a, b in ranges) + "]+")


@lru_cache(maxsize=64)
def parse_normalization(spec: str, key: str = "normalization") -> tuple[str, ...]:
    """The steps of `spec` in application order; unknown steps raise `ConfigError` naming `key`."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(names) - set(STEPS))
    if unknown:
        raise ConfigError(key, f"unknown normalisation step(s) {', '.join(unknown)}; "
                               f"choose from {', '.join(STEPS)}")
    return tuple(s for s in STEPS if s in names)


def normalize_text(text: str, spec: str = "nfkc,lower,whitespace") -> str:
    """`text` with the normalisation steps of `spec` applied (see the module docstring)."""
    steps = parse_normalization(spec)
    if "nfkc" in steps:
        text = unicodedata.normalize("NFKC", text)
    if "lower" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = _punctuation().sub(" ", text)
    if "digits" in steps:
        text = _DIGITS.sub("0", text)
    if "whitespace" in steps:
        text = _WHITESPACE.sub(" ", text).strip()
    return text


def words(text: str, spec: str) -> list[str]:
    """The whitespace-separated words of the normalised text."""
    return normalize_text(text, spec).split()
