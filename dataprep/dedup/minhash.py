"""MinHash per-record maths: word n-gram shingles, seeded 64-bit signatures, LSH band keys, Jaccard.

Choosing bands x rows. Two documents with Jaccard similarity s agree on one MinHash value with
probability s, on one band of r values with probability s^r, and become a candidate pair when at
least one of b bands agrees:

    P(candidate | s) = 1 - (1 - s^r)^b

The default b = 84 bands x r = 15 rows (1,260 hashes) is the smallest b x r for which the curve
passes both targets, catching >= 95% at s = 0.8 and flagging <= 5% at s = 0.6:

    s      0.5     0.6     0.7     0.75    0.8     0.85    0.9
    P      0.0026  0.0387  0.3295  0.6770  0.9506  0.9995  1.0000

(threshold (1/b)^(1/r) = 0.744). For comparison datatrove's default 14 x 8 (112 hashes) catches
92.4% at s = 0.8 and flags 21.1% at s = 0.6; every candidate it flags is a pair to verify.

Hashes. A shingle is the xxh3-64 digest (seeded) of its space-joined words; the k-th MinHash value
is min over shingles x of (a_k * x + b_k) mod 2^64 with a_k odd, a bijection of 64-bit words, with
(a_k, b_k) drawn from numpy's PCG64 generator seeded by `seed`, so every worker and every rerun
computes the same signature (Python's `hash()` is salted per process and never used).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import xxhash

from dataprep.dedup.normalize import parse_normalization, words
from kiln.errors import ConfigError

# Signatures are computed in row blocks so the (block x hashes) scratch stays in cache.
_BLOCK_ROWS = 256
_U64_MAX = np.iinfo(np.uint64).max


@dataclass
class MinHashConfig:
    """Near-duplicate removal by MinHash LSH, exact-Jaccard verification and connected components."""

    ngram: int = 5  # words per shingle
    num_bands: int = 84  # b: see the module docstring for the S-curve of 84 x 15
    rows_per_band: int = 15  # r
    seed: int = 1  # seeds the shingle hash and the permutations; change it and signatures change
    verify: bool = True  # exact Jaccard on the shingle sets of every candidate pair
    threshold: float = 0.8  # an edge needs (verified or, without verify, estimated) Jaccard >= this
    normalization: str = "nfkc,lower,punctuation,digits,whitespace"
    # A key (band bucket, star centre, component) with more members than this is joined through a
    # side input instead of a GroupByKey, so no worker ever holds a group larger than this.
    hot_key_threshold: int = 1000
    # Large-star + small-star rounds unrolled. A path of n near-duplicates (the worst case) needs
    # about log2(n) rounds, a random tree of 10^5 nodes 8; unconverged after this -> the job fails.
    max_cc_rounds: int = 10

    def __post_init__(self) -> None:
        for name in ("ngram", "num_bands", "rows_per_band", "hot_key_threshold", "max_cc_rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError("threshold", f"must be in (0, 1], got {self.threshold}")
        parse_normalization(self.normalization)

    @property
    def num_perm(self) -> int:
        return self.num_bands * self.rows_per_band


def candidate_probability(s: float, num_bands: int, rows_per_band: int) -> float:
    """P(candidate) = 1 - (1 - s^r)^b: the chance LSH pairs two documents of Jaccard `s`."""
    return 1.0 - (1.0 - s ** rows_per_band) ** num_bands


def shingles(text: str, ngram: int, normalization: str, seed: int) -> np.ndarray:
    """Sorted unique uint64 hashes of the word `ngram`-grams of the normalised text.

    A text of fewer than `ngram` words (but at least one) is one shingle, so short documents can
    still match their exact copies; a text without words has no shingles.
    """
    ws = words(text, normalization)
    if not ws:
        return np.empty(0, dtype=np.uint64)
    if len(ws) < ngram:
        grams = [" ".join(ws)]
    else:
        grams = [" ".join(ws[i:i + ngram]) for i in range(len(ws) - ngram + 1)]
    h = xxhash.xxh3_64_intdigest
    return np.unique(np.fromiter((h(g, seed) for g in grams), dtype=np.uint64, count=len(grams)))


@lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (a, b) coefficients of the `num_perm` permutations x -> a*x + b mod 2^64 (a odd)."""
    gen = np.random.Generator(np.random.PCG64(seed))
    a = gen.integers(0, 1 << 63, size=num_perm, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    b = gen.integers(0, np.iinfo(np.uint64).max, size=num_perm, dtype=np.uint64, endpoint=True)
    a.setflags(write=False)
    b.setflags(write=False)
    return a, b


def minhash_signature(shingle_hashes: np.ndarray, num_perm: int, seed: int) -> np.ndarray:
    """The uint64 MinHash signature (length `num_perm`) of a non-empty shingle-hash array."""
    if shingle_hashes.size == 0:
        raise ValueError("a signature needs at least one shingle")
    a, b = permutations(num_perm, seed)
    sig = np.full(num_perm, _U64_MAX, dtype=np.uint64)
    scratch = np.empty((min(_BLOCK_ROWS, shingle_hashes.size), num_perm), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, shingle_hashes.size, _BLOCK_ROWS):
            block = shingle_hashes[start:start + _BLOCK_ROWS]
            view = scratch[:block.size]
            np.multiply(block[:, None], a, out=view)
            view += b
            np.minimum(sig, view.min(axis=0), out=sig)
    return sig


def band_keys(signature: np.ndarray, num_bands: int, rows_per_band: int) -> list[int]:
    """One non-negative 63-bit key per band: the xxh3-64 of the band's values, seeded by band index.

    Seeding by band index keeps equal values in different bands from sharing a bucket.
    """
    if signature.size != num_bands * rows_per_band:
        raise ConfigError("num_bands", f"signature has {signature.size} values, not "
                                       f"{num_bands} x {rows_per_band}")
    data = np.ascontiguousarray(signature, dtype="<u8").tobytes()
    width = rows_per_band * 8
    h = xxhash.xxh3_64_intdigest
    return [h(data[i * width:(i + 1) * width], i) >> 1 for i in range(num_bands)]


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard similarity of two sorted unique shingle-hash arrays (0.0 if both are empty)."""
    union = a.size + b.size
    if union == 0:
        return 0.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (union - inter)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The MinHash estimate of Jaccard: the fraction of signature positions that agree."""
    return float(np.count_nonzero(sig_a == sig_b)) / sig_a.size
