"""`--out` on object storage: tokenizer, tokenize, sft and preference run for real (DirectRunner,
in-process) into fsspec's in-memory filesystem — not a local path, so every write goes through
`kiln.paths` — and what they leave there, read back through fsspec, is byte for byte what a local
run writes (shards, `.bin/.idx`, manifest with its ledger, dead letters)."""

from __future__ import annotations

import gzip
import os
import uuid

import fsspec
import pytest

from dataprep.outputs import read_manifest_from
from jobs import preference as preference_job
from jobs import sft as sft_job
from jobs import tokenizer as tokenizer_job
from kiln.errors import UsageError
from kiln.paths import is_local
from tests.dataprep.chat_helpers import HH, SFT_SAMPLE, train_tokenizer
from tests.jobs.test_tokenize_job import DIRECT, _tokenize, corpus, tok_dir  # noqa: F401

MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def remote():
    """A fresh `memory://` directory, removed afterwards (the store is process-wide)."""
    url = f"memory://kiln-test-{uuid.uuid4().hex[:8]}/out"
    assert not is_local(url)
    yield url
    bucket = url.removeprefix("memory://").split("/")[0]
    if MEMORY.exists(bucket):
        MEMORY.rm(bucket, recursive=True)


def local_files(root) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for name in names:
            path = os.path.join(d, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def remote_files(url: str) -> dict[str, bytes]:
    fs, root = fsspec.core.url_to_fs(url)
    return {os.path.relpath(p, root): fs.cat_file(p) for p in fs.find(root)}


def same_outputs(local, url: str) -> dict[str, bytes]:
    """The two directories hold the same files with the same bytes; returns them."""
    here, there = local_files(local), remote_files(url)
    assert sorted(there) == sorted(here)
    for name in here:
        assert there[name] == here[name], name
    assert not any(n.startswith("_work") or n.startswith("_parts") for n in there)
    return there


def test_tokenize_out_on_object_storage_matches_local_run(corpus, tok_dir, tmp_path, remote):  # noqa: F811
    _tokenize(corpus, tok_dir, tmp_path / "local", DIRECT)
    _tokenize(corpus, tok_dir, remote, DIRECT)
    files = same_outputs(tmp_path / "local", remote)
    manifest = read_manifest_from(remote)
    assert manifest.schema["name"] == "megatron_indexed" and not manifest.ledger.check()
    names = {s.path for s in manifest.shards}
    assert names and all(n in files and n.removesuffix(".bin") + ".idx" in files for n in names)
    assert any(n.startswith("dead-letter/") for n in files)
    # an existing OUT is refused, then replaced with --overwrite
    with pytest.raises(UsageError, match="not empty"):
        _tokenize(corpus, tok_dir, remote, DIRECT)
    _tokenize(corpus, tok_dir, remote, [*DIRECT, "--overwrite"])
    same_outputs(tmp_path / "local", remote)


def test_tokenizer_out_on_object_storage_matches_local_run(corpus, tok_dir, remote):  # noqa: F811
    argv = ["--input", f"hh={corpus / 'hh'}", "--input", f"node={corpus / 'node'}",
            "--vocab-size", "1200", "--sample-bytes", "400000", "--out", remote, *DIRECT]
    assert tokenizer_job.main(argv) == 0
    same_outputs(tok_dir, remote)


@pytest.fixture(scope="module")
def chat_tok(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("chat-tok"))
    train_tokenizer(d)
    return d


def test_sft_out_on_object_storage_matches_local_run(chat_tok, tmp_path, remote):
    args = ["--input", SFT_SAMPLE, "--tokenizer", chat_tok, "--max-seq-len", "256",
            "--set", "num_shards=2", *DIRECT]
    assert sft_job.main([*args, "--out", str(tmp_path / "local")]) == 0
    assert sft_job.main([*args, "--out", remote]) == 0
    files = same_outputs(tmp_path / "local", remote)
    manifest = read_manifest_from(remote)
    assert manifest.schema["name"] == "sft" and manifest.rows > 0
    assert sorted(s.path for s in manifest.shards) == sorted(n for n in files
                                                             if n.endswith(".arrow"))


def test_preference_out_on_object_storage_matches_local_run(chat_tok, tmp_path, remote):
    hh = tmp_path / "hh-head.jsonl.gz"  # the first 400 pairs keep the test quick
    with gzip.open(HH, "rt", encoding="utf-8") as src, gzip.open(hh, "wt") as dst:
        dst.writelines(line for _, line in zip(range(400), src, strict=False))
    args = ["--input", str(hh), "--tokenizer", chat_tok, *DIRECT]
    assert preference_job.main([*args, "--out", str(tmp_path / "local")]) == 0
    assert preference_job.main([*args, "--out", remote]) == 0
    files = same_outputs(tmp_path / "local", remote)
    manifest = read_manifest_from(remote)
    assert manifest.schema["name"] == "preference" and not manifest.ledger.check()
    assert manifest.ledger.stages[0].input == 400 and "dead-letter/dead-letter.jsonl" in files
