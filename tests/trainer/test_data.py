"""Pretraining data: manifests are checked, order is fixed, DP ranks split micro-batches."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from kiln.errors import ConfigError, DataError
from trainer.data.manifest import read_token_manifest
from trainer.data.pretrain import build_token_data, micro_batches

SAMPLE = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "data" / "sample-pretrain"


def write_dataset(root: Path, docs: list[list[int]], vocab: int = 50) -> Path:
    root.mkdir(parents=True)
    builder = IndexedDatasetBuilder(str(root / "part-0.bin"), dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.tensor(doc))
        builder.end_document()
    builder.finalize(str(root / "part-0.idx"))
    manifest = {"schema": {"name": "megatron_indexed", "version": 1},
                "tokenizer": {"fingerprint": "t", "vocab_size": vocab},
                "shards": [{"path": "part-0.bin", "rows": len(docs), "bytes": 0, "sha256": "",
                            "tokens": sum(map(len, docs))}]}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_sample_manifest_reads() -> None:
    m = read_token_manifest(str(SAMPLE))
    assert m.vocab_size == 257 and len(m.prefixes) == 2 and sum(m.shard_tokens) > 100_000


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["schema"].update(version=2), "schema.version"),
    (lambda m: m["schema"].update(name="sft"), "schema.name"),
    (lambda m: m["tokenizer"].pop("vocab_size"), "tokenizer.vocab_size"),
    (lambda m: m["shards"][0].update(path="missing.bin"), "shards.path"),
])
def test_bad_manifest_names_the_field(tmp_path: Path, edit, field: str) -> None:
    root = write_dataset(tmp_path / "d", [[1, 2, 3]])
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError) as err:
        read_token_manifest(str(root))
    assert err.value.field == field and "manifest.json" in str(err.value)


@pytest.fixture(scope="module")
def one_rank_group(tmp_path_factory):
    """megatron's blended dataset asks for the rank: a gloo group of one (no CPU backend)."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _data(tmp_path: Path, name: str):
    return build_token_data([str(SAMPLE)], None, "90,10,0", seq_length=32, seed=3,
                            train_samples=64, valid_samples=8, cache_dir=str(tmp_path / name))


def test_order_is_deterministic_and_labels_shift(tmp_path: Path, one_rank_group) -> None:
    a, b = _data(tmp_path, "a"), _data(tmp_path, "b")
    first = a.train[0]
    assert torch.equal(first["tokens"], b.train[0]["tokens"])
    assert torch.equal(first["tokens"][1:], first["labels"][:-1])
    assert a.vocab_size == 257 and a.valid is not None


def test_dp_ranks_read_what_one_rank_reads_with_accumulation(tmp_path: Path,
                                                             one_rank_group) -> None:
    data = _data(tmp_path, "c").train
    one = micro_batches(data, start_sample=8, micro_batch_size=2, dp_rank=0, dp_size=1)
    rank0 = micro_batches(data, start_sample=8, micro_batch_size=2, dp_rank=0, dp_size=2)
    rank1 = micro_batches(data, start_sample=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    serial = torch.cat([next(one)["tokens"] for _ in range(4)])
    split = torch.cat([torch.cat([next(rank0)["tokens"], next(rank1)["tokens"]]) for _ in range(2)])
    assert torch.equal(serial, split)
    assert not torch.equal(serial[:2], serial[2:4])


def test_blend_of_two_manifests_must_share_a_tokenizer(tmp_path: Path, one_rank_group) -> None:
    other = write_dataset(tmp_path / "other", [list(range(40))] * 4, vocab=300)
    shutil.copytree(SAMPLE, tmp_path / "sample")
    with pytest.raises(DataError, match="tokenizer"):
        build_token_data([str(tmp_path / "sample"), str(other)], [0.5, 0.5], "100,0,0",
                         seq_length=16, seed=1, train_samples=8, valid_samples=0,
                         cache_dir=str(tmp_path / "cache"))


def test_tokenizer_fingerprint_must_match_the_config(tmp_path: Path, one_rank_group) -> None:
    with pytest.raises(DataError) as err:
        build_token_data([str(SAMPLE)], None, "100,0,0", seq_length=16, seed=1, train_samples=8,
                         valid_samples=0, cache_dir=str(tmp_path / "cache"),
                         fingerprint="sentencepiece-abc")
    assert err.value.field == "tokenizer.fingerprint" and "utf8-bytes-v1" in str(err.value)


@pytest.mark.parametrize("damage, message", [
    (lambda r: (r / "part-0.idx").write_bytes((r / "part-0.idx").read_bytes()[:40]), "size:"),
    (lambda r: (r / "part-0.idx").write_bytes(b"x" * 100), "magic:"),
    (lambda r: (r / "part-0.bin").write_bytes((r / "part-0.bin").read_bytes()[:10]),
     ".bin size"),
])
def test_damaged_shard_is_named_before_training(tmp_path: Path, damage, message: str) -> None:
    """Not megatron's traceback from inside a training step."""
    root = write_dataset(tmp_path / "d", [list(range(1, 30))] * 3)
    damage(root)
    with pytest.raises(DataError) as err:
        read_token_manifest(str(root))
    assert err.value.field == "shards.path" and "damaged" in str(err.value)
    assert message in str(err.value) and "part-0" in str(err.value)


def test_manifest_row_count_must_match_the_index(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", [list(range(1, 30))] * 3)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["rows"] = 4
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="holds 3 documents, the manifest says 4"):
        read_token_manifest(str(root))


def test_a_shard_with_no_validation_document_sits_the_split_out(tmp_path: Path,
                                                                one_rank_group) -> None:
    """Megatron splits each shard's documents: at 95,5,0 a shard of 5 documents has none to
    validate on, and a GPTDataset asked for samples from no documents loops forever. The blend
    of that split leaves it out; training still reads it; the training order is unchanged."""
    small = write_dataset(tmp_path / "small", [list(range(1, 60))] * 5, vocab=257)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = read_token_manifest(str(SAMPLE)).fingerprint
    (small / "manifest.json").write_text(json.dumps(manifest))

    def build(paths, name):
        return build_token_data(paths, None, "95,5,0", seq_length=32, seed=3, train_samples=64,
                                valid_samples=8, cache_dir=str(tmp_path / name))

    both = build([str(SAMPLE), str(small)], "both")  # returned at all: no hang
    assert both.valid is not None and len(both.valid) >= 8
    shards = {d.dataset_path for d in both.valid.datasets}
    assert shards == {p for p in read_token_manifest(str(SAMPLE)).prefixes}
    assert any("small" in d.dataset_path for d in both.train.datasets)
    # the training blend is the one megatron's builder makes for all splits at once
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from trainer.data.pretrain import _blend, _DatasetTokenizer

    ours = build([str(SAMPLE)], "ours")
    prefixes, weights, _ = _blend([read_token_manifest(str(SAMPLE))], None)
    config = GPTDatasetConfig(
        random_seed=3, sequence_length=32, blend=(prefixes, weights), split="95,5,0",
        path_to_cache=str(tmp_path / "megatron"), tokenizer=_DatasetTokenizer(257, 256),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, mid_level_dataset_surplus=0.005)
    train, valid, _ = BlendedMegatronDatasetBuilder(GPTDataset, [64, 8, 0], lambda: True,
                                                    config).build()
    for mine, theirs in ((ours.train, train), (ours.valid, valid)):
        assert len(mine) == len(theirs)
        assert all(torch.equal(mine[i]["tokens"], theirs[i]["tokens"]) for i in range(len(mine)))
    only = build([str(small)], "only")
    assert only.valid is None and len(only.train) >= 64


def test_blend_weights_are_checked(tmp_path: Path) -> None:
    from trainer.data.pretrain import _blend

    sample = read_token_manifest(str(SAMPLE))
    other = read_token_manifest(str(write_dataset(tmp_path / "o", [list(range(1, 30))] * 3)))
    prefixes, weights, docs = _blend([sample, other], [1.0, 0.0])  # a weight 0 is not read
    assert prefixes == sample.prefixes and docs == sample.shard_documents
    for bad in ([0.0, 0.0], [1.0, -1.0], [1.0, float("nan")], [1.0]):
        with pytest.raises(ConfigError, match="data.weights"):
            _blend([sample, other], bad)
