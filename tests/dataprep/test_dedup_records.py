"""Per-record dedup maths: normalisation, shingles, signatures, band keys, Jaccard, decontam index."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pytest

from dataprep.dedup import (
    DecontamConfig,
    ExactDedupConfig,
    MinHashConfig,
    band_keys,
    build_eval_index,
    candidate_probability,
    contamination,
    document_ngrams,
    estimated_jaccard,
    exact_key,
    invalid_reason,
    jaccard,
    minhash_signature,
    normalize_text,
    shingles,
    survivor_rank,
)
from kiln.config import from_dict
from kiln.errors import ConfigError, DataError

TEXT = ("Streams are an abstract interface for working with streaming data in Node.js; the stream "
        "module provides an API for implementing the stream interface, version 18.2 onwards.")


def test_normalization_steps_apply_in_fixed_order() -> None:
    text = "Ｆｕｌｌ-width  ﬁle,\tv18.2 DONE!"
    assert normalize_text(text, "") == text
    assert normalize_text(text, "whitespace,lower,nfkc") == "full-width file, v18.2 done!"
    assert normalize_text(text, "nfkc,lower,punctuation,digits,whitespace") == \
        "full width file v0 0 done"


def test_unknown_normalization_step_names_the_key() -> None:
    with pytest.raises(ConfigError, match="normalization.*stem"):
        from_dict(ExactDedupConfig, {"normalization": "lower,stem"})


def test_exact_key_ignores_case_and_spacing_but_not_words() -> None:
    spec = ExactDedupConfig().normalization
    assert exact_key("Hello   World", spec) == exact_key("hello world\n", spec)
    assert exact_key("Hello World", spec) != exact_key("Hello World!", spec)


def test_shingles_are_word_ngrams_hashed_and_unique() -> None:
    s = shingles("a b c d e f a b c d e f", 5, "lower,whitespace", 1)
    assert s.dtype == np.uint64 and np.all(np.diff(s.astype(np.float64)) > 0)
    assert s.size == 6  # 8 windows, 2 repeated
    assert shingles("two words", 5, "whitespace", 1).size == 1
    assert shingles("  \n", 5, "whitespace", 1).size == 0
    assert not np.array_equal(shingles(TEXT, 5, "lower", 1), shingles(TEXT, 5, "lower", 2))


def test_signature_is_identical_in_a_fresh_process() -> None:
    code = ("from dataprep.dedup import shingles, minhash_signature\n"
            f"s = shingles({TEXT!r}, 5, 'lower,whitespace', 7)\n"
            "print(minhash_signature(s, 64, 7).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PYTHONHASHSEED": "123", "PYTHONPATH": "."})
    here = minhash_signature(shingles(TEXT, 5, "lower,whitespace", 7), 64, 7)
    assert out.stdout.strip() == here.tobytes().hex()


def test_signature_estimates_jaccard() -> None:
    words = TEXT.split() * 3
    a = shingles(" ".join(words), 3, "lower", 1)
    b = shingles(" ".join(words[:-6] + ["x", "y", "z", "u", "v", "w"]), 3, "lower", 1)
    sa, sb = minhash_signature(a, 2048, 1), minhash_signature(b, 2048, 1)
    expected = len(set(a.tolist()) & set(b.tolist())) / len(set(a.tolist()) | set(b.tolist()))
    assert jaccard(a, b) == pytest.approx(expected)
    assert abs(estimated_jaccard(sa, sb) - expected) < 0.05
    # the signature is the minimum over shingles of each permutation, block-size independent
    assert np.array_equal(minhash_signature(np.tile(a, 100), 2048, 1), sa)


def test_band_keys_differ_per_band_and_follow_values() -> None:
    sig = np.arange(12, dtype=np.uint64)
    keys = band_keys(sig, 3, 4)
    assert len(set(keys)) == 3 and all(0 <= k < 2**63 for k in keys)
    other = sig.copy()
    other[5] = 99
    assert [k1 == k2 for k1, k2 in zip(keys, band_keys(other, 3, 4), strict=True)] == \
        [True, False, True]
    with pytest.raises(ConfigError):
        band_keys(sig, 4, 4)


def test_default_lsh_meets_the_s_curve_targets() -> None:
    c = MinHashConfig()
    assert candidate_probability(0.8, c.num_bands, c.rows_per_band) >= 0.95
    assert candidate_probability(0.6, c.num_bands, c.rows_per_band) <= 0.05
    assert candidate_probability(0.8, 14, 8) == pytest.approx(0.924, abs=1e-3)  # datatrove's


def test_minhash_config_rejects_bad_values() -> None:
    with pytest.raises(ConfigError, match="threshold"):
        from_dict(MinHashConfig, {"threshold": 1.5})
    with pytest.raises(ConfigError, match="num_bands"):
        from_dict(MinHashConfig, {"num_bands": 0})


def test_survivor_rank_prefers_quality_then_smallest_id() -> None:
    docs = [{"id": "b", "text": ""}, {"id": "a", "text": ""}, {"id": "c", "quality": 0.2},
            {"id": "d", "quality": 0.9}, {"id": "e", "quality": 0.9}]
    assert [d["id"] for d in sorted(docs, key=survivor_rank)] == ["d", "e", "c", "a", "b"]
    assert invalid_reason({"id": "x", "text": "t", "quality": float("nan")}) is not None
    assert invalid_reason({"id": "", "text": "t"}) is not None
    assert invalid_reason({"id": "x", "text": None}) is not None
    assert invalid_reason({"id": "x", "text": "t", "quality": 3}) is None


def test_eval_index_matches_13_grams_and_names_the_first_item(tmp_path) -> None:
    passage = ("the committee reviewed every proposal submitted before the deadline and then "
               "published a short summary of its findings")
    jsonl = tmp_path / "eval.jsonl.gz"
    with gzip.open(jsonl, "wt") as f:
        f.write(json.dumps({"question": "Who reviewed it?", "context": passage}) + "\n")
        f.write(json.dumps({"question": "Short question here"}) + "\n")
    txt = tmp_path / "more.txt"
    txt.write_text("\n" + passage + "\n")
    config = DecontamConfig(eval_paths=[str(tmp_path / "*")], ngram=13)
    index = build_eval_index(config.eval_paths, config.ngram, config.normalization, [])
    assert index.refs == (f"{jsonl}:1", f"{jsonl}:2", f"{txt}:2")

    doc = "Intro words. " + passage.upper() + " And more words after it."
    fraction, ref = contamination(document_ngrams(doc, config), index)
    assert ref == f"{jsonl}:1" and 0 < fraction < 1
    assert contamination(document_ngrams("short question HERE!", config), index)[1] == \
        f"{jsonl}:2"
    assert contamination(document_ngrams("short question here and more", config), index) is None
    only_questions = build_eval_index([str(jsonl)], 13, config.normalization, ["question"])
    assert contamination(document_ngrams(doc, config), only_questions) is None


def test_bad_eval_file_names_file_and_row(tmp_path) -> None:
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError) as err:
        build_eval_index([str(bad)], 13, "lower", [])
    assert err.value.row == 2 and str(bad) in str(err.value)
    with pytest.raises(DataError, match="no eval file"):
        build_eval_index([str(tmp_path / "missing-*.jsonl")], 13, "lower", [])
