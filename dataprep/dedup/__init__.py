"""Exact and MinHash near-duplicate removal and eval decontamination: per-record functions and the
Beam composites that distribute them (`ExactDedup`, `MinHashDedup`, `Decontaminate`)."""

from dataprep.dedup.components import ConnectedComponents
from dataprep.dedup.decontam import (
    DecontamConfig,
    EvalIndex,
    build_eval_index,
    contamination,
    document_ngrams,
)
from dataprep.dedup.exact import ExactDedupConfig, exact_key
from dataprep.dedup.joins import AttachValue
from dataprep.dedup.minhash import (
    MinHashConfig,
    band_keys,
    candidate_probability,
    estimated_jaccard,
    jaccard,
    minhash_signature,
    permutations,
    shingles,
)
from dataprep.dedup.normalize import normalize_text, parse_normalization, words
from dataprep.dedup.records import (
    DECONTAM_STAGE,
    EXACT_STAGE,
    MINHASH_STAGE,
    invalid_reason,
    survivor_rank,
)
from dataprep.dedup.transforms import Decontaminate, ExactDedup, MinHashDedup

__all__ = [
    "DECONTAM_STAGE", "EXACT_STAGE", "MINHASH_STAGE", "AttachValue", "ConnectedComponents",
    "DecontamConfig", "Decontaminate", "EvalIndex", "ExactDedup", "ExactDedupConfig",
    "MinHashConfig", "MinHashDedup", "band_keys", "build_eval_index", "candidate_probability",
    "contamination", "document_ngrams", "estimated_jaccard", "exact_key", "invalid_reason",
    "jaccard", "minhash_signature", "normalize_text", "parse_normalization", "permutations",
    "shingles", "survivor_rank", "words",
]
