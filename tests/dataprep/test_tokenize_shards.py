"""Plain-function core of `kiln tokenize`: long-document policy, part writing with dead letters,
shard planning and copying, and byte-identity with megatron's IndexedDatasetBuilder."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import random

import numpy as np
import pytest

from dataprep.token_inputs import InputUnit, parse_sources, plan_units
from dataprep.token_shards import (
    EncodeSettings,
    PartResult,
    SequenceWriter,
    document_sequences,
    plan_shards,
    token_manifest,
    tokenize_unit,
    write_shard,
)
from dataprep.tokenizer import SentencePieceTokenizer, TrainSpec, train_sentencepiece
from kiln.errors import DataError, UsageError
from schemas.indexed import IndexedReader, check_pair
from schemas.manifest import ShardEntry

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs", "sample_data", "hh-rlhf-harmless-base-test.jsonl.gz")
EOS, BOS = 3, 2


def test_long_documents_split_into_eos_terminated_chunks_or_drop():
    ids = list(range(10, 23))  # 13 ids -> 14 tokens with EOS
    split = EncodeSettings(max_doc_tokens=5)
    chunks = document_sequences(list(ids), EOS, None, split)
    assert all(len(c) <= 5 and c[-1] == EOS for c in chunks)
    assert [t for c in chunks for t in c[:-1]] == ids  # nothing lost, nothing repeated
    assert len(chunks) == 4
    with_bos = document_sequences(list(ids), EOS, BOS, split)
    assert with_bos[0][0] == BOS and [t for c in with_bos for t in c[:-1]] == [BOS, *ids]
    drop = EncodeSettings(max_doc_tokens=5, long_docs="drop")
    assert document_sequences(list(ids), EOS, None, drop) is None
    fits = EncodeSettings(max_doc_tokens=14)
    assert document_sequences(list(ids), EOS, None, fits) == [ids + [EOS]]
    assert len(document_sequences(list(ids), EOS, None, EncodeSettings(max_doc_tokens=13))) == 2
    assert document_sequences(list(ids), EOS, None, EncodeSettings()) == [ids + [EOS]]


def test_sequence_writer_is_byte_identical_to_megatron_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = random.Random(3)
    docs = [[rng.randrange(60000) for _ in range(rng.randint(1, 50))] for _ in range(40)]
    for dtype in (np.uint16, np.int32):
        ours = SequenceWriter(str(tmp_path / f"ours-{dtype.__name__}"), dtype)
        ours.add(docs[:25])
        ours.add(docs[25:])
        ours.finalize()
        ref = IndexedDatasetBuilder(str(tmp_path / f"ref-{dtype.__name__}.bin"), dtype=dtype)
        for d in docs:
            ref.add_document(torch.tensor(d), [len(d)])
        ref.finalize(str(tmp_path / f"ref-{dtype.__name__}.idx"))
        for ext in ("bin", "idx"):
            assert (tmp_path / f"ours-{dtype.__name__}.{ext}").read_bytes() == \
                (tmp_path / f"ref-{dtype.__name__}.{ext}").read_bytes()


def _write_part(path: str, seqs: list[list[int]]) -> None:
    w = SequenceWriter(path, np.uint16)
    w.add(seqs)
    w.finalize()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shards_hold_each_sequence_once_in_order_by_start_offset(tmp_path, seed):
    rng = random.Random(seed)
    parts, stream = [], []
    for i in range(rng.randint(1, 8)):
        seqs = [[rng.randrange(1000) for _ in range(rng.randint(1, 40))]
                for _ in range(rng.randint(0, 12))]
        prefix = str(tmp_path / "parts" / f"p{i}")
        _write_part(prefix, seqs)
        parts.append(PartResult("src", f"{i}", i, 0, prefix, sequences=len(seqs),
                                tokens=sum(map(len, seqs))))
        stream += seqs
    shard_tokens = rng.randint(5, 120)
    rng.shuffle(parts)  # the plan must not depend on the order results arrive in
    entries = [e for t in plan_shards(parts, shard_tokens)
               if (e := write_shard(t, str(tmp_path / "out")))]
    starts = list(itertools.accumulate(map(len, stream), initial=0))[:-1]
    expected: dict[int, list[list[int]]] = {}
    for s, seq in zip(starts, stream, strict=True):
        expected.setdefault(s // shard_tokens, []).append(seq)
    assert [e.path for e in entries] == [f"src-{k:05d}.bin" for k in sorted(expected)]
    for e in entries:
        prefix = str(tmp_path / "out" / e.path.removesuffix(".bin"))
        check_pair(prefix, 1000)
        reader = IndexedReader(prefix)
        got = [reader[i].tolist() for i in range(len(reader))]
        assert got == expected[int(e.path[4:9])]
        assert e.rows == len(got) and e.tokens == sum(map(len, got))
        assert e.tokens <= shard_tokens + max(map(len, got)) - 1


@pytest.fixture(scope="module")
def small_tok() -> SentencePieceTokenizer:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["chosen"] for _, line in zip(range(200), f, strict=False)]
    lines = [ln for t in texts for ln in t.split("\n") if ln.strip()]
    return SentencePieceTokenizer(train_sentencepiece(lines, TrainSpec(vocab_size=400)))


def test_tokenize_unit_counts_every_record_and_dead_letters_bad_ones(tmp_path, small_tok):
    lines = [
        json.dumps({"id": "a", "text": "Hello there, how are you?"}),
        "{not json",
        json.dumps({"id": "b", "body": "no text field"}),
        json.dumps({"id": "c", "text": ""}),
        "  ",  # a blank line holds no record
        '{"id": "d", "text": "bad \\ud800 surrogate"}',
        json.dumps({"id": "e", "text": "word " * 300}),  # too long for max 64
        json.dumps({"id": "f", "text": "The end."}),
    ]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    unit = InputUnit("web", str(path), 0)
    for policy, docs, too_long in (("drop", 2, 1), ("split", 3, 0)):
        settings = EncodeSettings(max_doc_tokens=64, long_docs=policy, batch_docs=3)
        res, dead = tokenize_unit(unit, small_tok, settings, str(tmp_path / policy))
        assert (res.records, res.read_errors, res.empty, res.encode_errors) == (7, 2, 1, 1)
        assert (res.documents, res.too_long) == (docs, too_long)
        assert res.records == res.read_errors + res.empty + res.encode_errors + res.documents \
            + res.too_long
        assert [(d.offset, d.stage) for d in dead] == [(2, "read"), (3, "read"), (6, "tokenize")]
        assert "encode failed" in dead[-1].reason and "ud800" in dead[-1].record
        reader = IndexedReader(res.prefix)
        seqs = [reader[i].tolist() for i in range(len(reader))]
        assert seqs[0] == small_tok.encode("Hello there, how are you?") + [small_tok.eos_id]
        assert seqs[-1] == small_tok.encode("The end.") + [small_tok.eos_id]
        assert all(len(s) <= 64 and s[-1] == small_tok.eos_id for s in seqs)
        if policy == "split":
            long_ids = small_tok.encode("word " * 300)
            assert [t for s in seqs[1:-1] for t in s[:-1]] == long_ids
        assert os.path.exists(f"{res.prefix}.idx")


def test_sources_parse_tags_and_weights_into_a_megatron_blend(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jsonl").write_text('{"text": "t"}\n')
    sources = parse_sources([f"web={tmp_path / 'a'}", str(tmp_path / "b")],
                            weights=["web=3", "b=1"])
    assert [(s.name, s.weight, len(s.files)) for s in sources] == [("web", 3.0, 1), ("b", 1.0, 1)]
    tagged = parse_sources([str(tmp_path / "a"), str(tmp_path / "b")], tags=["x", "y"])
    assert [s.name for s in tagged] == ["x", "y"]
    with pytest.raises(UsageError):
        parse_sources([str(tmp_path / "a"), str(tmp_path / "a")])  # same default tag twice
    with pytest.raises(UsageError):
        parse_sources([str(tmp_path / "a")], weights=["nope=1"])
    parts = [PartResult("web", "0", 0, 0, "p0", records=3, documents=3, tokens=300),
             PartResult("b", "0", 0, 0, "p1", records=2, read_errors=1, documents=1, tokens=100)]
    shards = [ShardEntry("web-00000.bin", 2, 10, "h", tokens=200, source="web"),
              ShardEntry("web-00001.bin", 1, 10, "h", tokens=100, source="web"),
              ShardEntry("b-00000.bin", 1, 10, "h", tokens=100, source="b")]
    tok = {"fingerprint": "f", "vocab_size": 1000, "eos_id": 3}
    m = token_manifest(sources, parts, shards, tok, EncodeSettings(), 1000)
    assert m.extra["blend"] == [0.75 * 2 / 3, "web-00000", 0.75 / 3, "web-00001", 0.25, "b-00000"]
    assert m.sources["web"]["weight"] == 0.75 and m.sources["b"]["shards"] == ["b-00000"]
    assert m.ledger.check() == [] and m.ledger.stages[0].error == 1
    default = token_manifest(tagged[:1] + parse_sources([str(tmp_path / "b")]), [], [], tok,
                             EncodeSettings(), 1000)
    assert default.extra["blend"] == [] and default.tokens == 0
    with pytest.raises(UsageError, match="every source or for none"):
        parse_sources([f"web={tmp_path / 'a'}", str(tmp_path / "b")], weights=["web=3"])


def test_damaged_inputs_are_dead_lettered_or_refused_before_the_pipeline(tmp_path, small_tok):
    import gzip as gz

    data = gz.compress("".join(json.dumps({"text": f"line {i} " * 20}) + "\n"
                               for i in range(400)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[:len(data) // 2])  # truncated stream
    res, dead = tokenize_unit(InputUnit("s", str(tmp_path / "cut.jsonl.gz"), 0), small_tok,
                              EncodeSettings(), str(tmp_path / "parts"))
    assert res.read_errors == 1 and res.documents == res.records - 1 > 0
    assert dead[-1].reason.startswith(f"unreadable from line {res.records}")
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="fake.parquet: unreadable Parquet"):
        plan_units(parse_sources([str(tmp_path / "fake.parquet")]), 100)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nobody.parquet")
    with pytest.raises(DataError, match="field 'text'"):
        plan_units(parse_sources([str(tmp_path / "nobody.parquet")]), 100)
