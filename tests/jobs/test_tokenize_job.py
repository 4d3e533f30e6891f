"""`kiln tokenizer` + `kiln tokenize` end to end on real text (HH-RLHF dialogues, Node.js docs):
megatron-core reads back exactly sentencepiece's tokens, the output bytes do not depend on the
number of workers, the ledger balances and broken shards are reported with their position."""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from bench.sample_docs import node_doc_texts
from dataprep.tokenizer import load_tokenizer
from jobs import tokenize as tokenize_job
from jobs import tokenizer as tokenizer_job
from kiln.cli import run_main
from schemas.indexed import IndexFormatError, check_pair
from schemas.manifest import Manifest, read_manifest, write_manifest
from schemas.shards import write_parquet_shard

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs", "sample_data")
MAX_DOC = 512
DIRECT: list[str] = []
TWO_WORKERS = DIRECT + ["--direct_running_mode=multi_processing", "--direct_num_workers=2"]


def _documents_dir(path, texts: list[str], per_shard: int) -> None:
    rows = [{"id": f"doc-{i:05d}", "url": None, "date": None, "text": t, "language": "en",
             "language_score": 1.0, "filters": [], "source": "test"} for i, t in enumerate(texts)]
    entries = [write_parquet_shard(str(path / f"part-{k:05d}.parquet"),
                                   rows[k * per_shard:(k + 1) * per_shard], "documents",
                                   root=str(path), row_group_rows=40)
               for k in range(-(-len(rows) // per_shard))]
    write_manifest(str(path), Manifest(schema={"name": "documents", "version": 1},
                                       shards=entries))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    with gzip.open(f"{DATA}/hh-rlhf-harmless-base-test.jsonl.gz", "rt", encoding="utf-8") as f:
        hh = [json.loads(line)["chosen"] for _, line in zip(range(240), f, strict=False)]
    _documents_dir(root / "hh", hh, 100)
    _documents_dir(root / "node", node_doc_texts(6), 3)
    (root / "chat").mkdir()
    (root / "chat" / "a.jsonl").write_text("\n".join([
        json.dumps({"id": "c1", "text": "User: hi\nAssistant: hello!"}),
        "{broken json",
        json.dumps({"id": "c2", "content": "wrong field"}),
        '{"id": "c3", "text": "lone \\udc80 surrogate"}',
        json.dumps({"id": "c4", "text": "Last one. " * 5}),
    ]) + "\n")
    return root


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tok"
    argv = ["--input", f"hh={corpus / 'hh'}", "--input", f"node={corpus / 'node'}",
            "--vocab-size", "1200", "--sample-bytes", "400000", "--out", str(out), *DIRECT]
    assert tokenizer_job.main(argv) == 0
    return out


def _tokenize(corpus, tok_dir, out, beam_args) -> None:
    argv = ["--input", f"hh={corpus / 'hh'}", "--input", f"node={corpus / 'node'}",
            "--input", f"chat={corpus / 'chat'}", "--tokenizer", str(tok_dir), "--out", str(out),
            "--shard-tokens", "20000", "--max-doc-tokens", str(MAX_DOC), "--rows-per-unit", "40",
            *beam_args]
    assert tokenize_job.main(argv) == 0


@pytest.fixture(scope="module")
def shards(corpus, tok_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "one"
    _tokenize(corpus, tok_dir, out, DIRECT)
    return out


def _expected_sequences(corpus, tok) -> dict[str, list[list[int]]]:
    """What the shards must hold, computed straight from the inputs with sentencepiece."""
    texts = {}
    for name in ("hh", "node"):
        m = read_manifest(str(corpus / name))
        texts[name] = [t for s in m.shards
                       for t in pq.read_table(corpus / name / s.path).column("text").to_pylist()]
    texts["chat"] = ["User: hi\nAssistant: hello!", "Last one. " * 5]
    out = {}
    for name, docs in texts.items():
        seqs = []
        for ids in tok.sp.encode(docs):
            body = ids  # every chunk: at most MAX_DOC - 1 text tokens, then EOS
            seqs += [body[i:i + MAX_DOC - 1] + [tok.eos_id]
                     for i in range(0, len(body), MAX_DOC - 1)]
        out[name] = seqs
    return out


@pytest.mark.slow
def test_tokenizer_sample_and_training_do_not_depend_on_workers_or_units(corpus, tok_dir,
                                                                         tmp_path):
    out = tmp_path / "tok2"
    argv = ["--input", f"hh={corpus / 'hh'}", "--input", f"node={corpus / 'node'}",
            "--vocab-size", "1200", "--sample-bytes", "400000", "--out", str(out),
            "--rows-per-unit", "7", *TWO_WORKERS]
    assert tokenizer_job.main(argv) == 0
    assert (out / "tokenizer.model").read_bytes() == (tok_dir / "tokenizer.model").read_bytes()
    info = json.loads((tok_dir / "tokenizer_info.json").read_text())
    assert info["sample"]["bytes"] >= 400000 and info["vocab_size"] == 1200
    assert info["special_ids"]["eos"] == 3 and info["special_ids"]["<|user|>"] == 5


@pytest.mark.slow
def test_same_output_bytes_on_one_and_two_workers(corpus, tok_dir, shards, tmp_path):
    two = tmp_path / "two"
    _tokenize(corpus, tok_dir, two, TWO_WORKERS)
    cmp = filecmp.dircmp(shards, two)
    names = sorted(os.listdir(shards))
    assert names == sorted(os.listdir(two)) and not cmp.left_only and not cmp.right_only
    assert "_parts" not in names and "manifest.json" in names
    _, mismatch, errors = filecmp.cmpfiles(shards, two, [n for n in names if "." in n],
                                           shallow=False)
    assert not mismatch and not errors
    _, mismatch, errors = filecmp.cmpfiles(shards / "dead-letter", two / "dead-letter",
                                           os.listdir(shards / "dead-letter"), shallow=False)
    assert not mismatch and not errors


def test_megatron_indexed_dataset_returns_sentencepiece_tokens(corpus, tok_dir, shards):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = load_tokenizer(str(tok_dir))
    manifest = read_manifest(str(shards))
    expected = _expected_sequences(corpus, tok)
    for name, seqs in expected.items():
        got = []
        for prefix in manifest.sources[name]["shards"]:
            ds = IndexedDataset(str(shards / prefix))
            assert ds.index.dtype == np.uint16
            got += [ds[i].tolist() for i in range(len(ds))]
        assert got == seqs, name
        assert manifest.sources[name]["tokens"] == sum(map(len, seqs))
    assert manifest.sources["node"]["split_documents"] > 0  # the docs pages exceed MAX_DOC
    assert manifest.tokenizer["fingerprint"] == tok.fingerprint
    assert manifest.tokenizer["eos_id"] == 3 and manifest.tokenizer["vocab_size"] == 1200
    assert max(s.tokens for s in manifest.shards) <= 20000 + MAX_DOC - 1


def test_gpt_dataset_through_the_manifest_blend(corpus, tok_dir, shards):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list
    from megatron.core.tokenizers import MegatronTokenizer

    manifest = read_manifest(str(shards))
    blend = manifest.extra["blend"]
    weights = blend[0::2]
    assert abs(sum(weights) - 1) < 1e-9 and len(blend) == 2 * len(manifest.shards)
    for name, info in manifest.sources.items():
        assert info["weight"] == pytest.approx(info["tokens"] / manifest.tokens)
        share = sum(w for w, p in zip(blend[0::2], blend[1::2], strict=True) if p.startswith(name))
        assert share == pytest.approx(info["weight"])
    blend = [x if i % 2 == 0 else str(shards / x) for i, x in enumerate(blend)]
    mtok = MegatronTokenizer.from_pretrained(str(tok_dir / "tokenizer.model"),
                                             metadata_path={"library": "sentencepiece"})
    assert mtok.eod == manifest.tokenizer["eos_id"]
    config = GPTDatasetConfig(random_seed=1234, sequence_length=64,
                              blend=get_blend_from_list(blend), split="1,0,0", tokenizer=mtok,
                              reset_position_ids=False, reset_attention_mask=False,
                              eod_mask_loss=False, path_to_cache=None)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [200, 0, 0], lambda: True,
                                                config).build()
    assert len(train) >= 200
    sequences = {}
    for ds in train.datasets:
        name = os.path.basename(ds.dataset.path_prefix).rsplit("-", 1)[0]
        seqs = sequences.setdefault(os.path.basename(ds.dataset.path_prefix),
                                    [ds.dataset[i].tolist() for i in range(len(ds.dataset))])
        for idx in range(0, len(ds), max(1, len(ds) // 10)):
            text, doc_ids = ds._query_document_sample_shuffle_indices(idx)
            stream = [t for d in doc_ids for t in seqs[d]]
            first = len(seqs[doc_ids[0]])
            assert any(stream[o:o + len(text)] == text.tolist() for o in range(first)), name
    sample = train[0]
    assert sample["tokens"].shape[0] == 64 and int(sample["tokens"].max()) < 1200


def test_ledger_balances_and_bad_records_are_dead_lettered(shards):
    manifest = read_manifest(str(shards))
    assert manifest.ledger.check() == []
    read, tok = manifest.ledger.stages
    assert (read.input, read.error) == (240 + 6 + 5, 2)
    assert (tok.input, tok.kept, tok.error) == (249, 248, 1)
    entries = [json.loads(line) for f in sorted(os.listdir(shards / "dead-letter"))
               for line in (shards / "dead-letter" / f).read_text().splitlines()]
    assert [(os.path.basename(e["source"]), e["offset"], e["stage"]) for e in entries] == \
        [("a.jsonl", 2, "read"), ("a.jsonl", 3, "read"), ("a.jsonl", 4, "tokenize")]
    assert "invalid JSON" in entries[0]["reason"] and "text" in entries[1]["reason"]


def test_kiln_validate_passes_on_the_output(shards):
    from schemas.validate import main as validate_main
    from schemas.validate import validate_path

    report = validate_path(str(shards))
    assert report.ok, [str(i) for i in report.issues]
    manifest = read_manifest(str(shards))
    assert (report.rows, report.tokens) == (manifest.rows, manifest.tokens)
    assert validate_main([str(shards)]) == 0


def test_broken_shards_are_reported_with_their_position(shards, tmp_path):
    from schemas.validate import validate_path

    manifest = read_manifest(str(shards))
    prefix = manifest.sources["hh"]["shards"][0]
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    tokens = np.memmap(broken / f"{prefix}.bin", dtype=np.uint16, mode="r+")
    tokens[777] = 1200
    tokens.flush()
    with pytest.raises(IndexFormatError, match=r"token 777 \(sequence \d+\): id 1200"):
        check_pair(str(broken / prefix), 1200)
    issues = [str(i) for i in validate_path(str(broken)).issues]
    assert any(f"{prefix}.bin" in i and "sha256" in i for i in issues)
    assert any("token 777 (sequence" in i and "id 1200" in i for i in issues), issues
    tokens[777] = 5
    tokens.flush()
    del tokens
    idx = bytearray((broken / f"{prefix}.idx").read_bytes())
    idx[34:38] = (int.from_bytes(idx[34:38], "little") + 1).to_bytes(4, "little")  # length[0]
    (broken / f"{prefix}.idx").write_bytes(bytes(idx))
    with pytest.raises(IndexFormatError, match="sequence 1: pointer"):
        check_pair(str(broken / prefix), 1200)
    issues = [str(i) for i in validate_path(str(broken)).issues]
    assert any("sequence 1: pointer" in i for i in issues), issues


def test_cli_rejects_unusable_arguments(corpus, tok_dir, shards, tmp_path):
    base = ["--input", str(corpus / "hh"), "--tokenizer", str(tok_dir)]
    assert run_main(tokenize_job.main, [*base, "--out", str(shards)]) == 2  # not empty
    assert run_main(tokenize_job.main, [*base, "--out", str(tmp_path / "o"),
                                        "--max-doc-tokens", "1"]) == 2
    assert run_main(tokenize_job.main, ["--input", str(tmp_path / "none"), "--tokenizer",
                                        str(tok_dir), "--out", str(tmp_path / "o2")]) == 2
    assert run_main(tokenize_job.main, [*base[:2], "--tokenizer", str(tmp_path),
                                        "--out", str(tmp_path / "o3")]) == 2
    assert run_main(tokenizer_job.main, ["--out", str(tmp_path / "t")]) == 2
