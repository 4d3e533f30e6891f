"""Datasets written by the project's writers validate, and megatron reads the tokens back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from schemas.indexed import IndexedReader, IndexedWriter
from schemas.validate import main as validate_main
from schemas.validate import validate_path
from tests.schemas.conftest import make_dataset


def test_every_contract_round_trips_through_validate(dataset, capsys):
    name, directory = dataset
    assert validate_main([directory]) == 0, capsys.readouterr().out
    report = validate_path(directory)
    assert report.ok and report.rows == 24


def test_validate_json_output_is_machine_readable(dataset, capsys):
    _, directory = dataset
    assert validate_main([directory, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[directory]["ok"] is True and data[directory]["rows"] == 24


def test_megatron_indexed_dataset_reads_the_same_tokens(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = [[1, 2, 3], [7] * 50, [499, 0, 3, 3]]
    w = IndexedWriter(str(tmp_path / "s"), np.uint16)
    for d in docs:
        w.add_document(d)
    w.finalize()
    ds = IndexedDataset(str(tmp_path / "s"))
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    ours = IndexedReader(str(tmp_path / "s"))
    assert [ours[i].tolist() for i in range(len(ours))] == docs


def test_writer_is_byte_identical_to_megatron_builder(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [[5, 6], [1] * 17, [3]]
    for dtype in (np.uint16, np.int32):
        w = IndexedWriter(str(tmp_path / "ours"), dtype)
        b = IndexedDatasetBuilder(str(tmp_path / "theirs.bin"), dtype=dtype)
        for d in docs:
            w.add_document(d)
            b.add_document(torch.tensor(d), [len(d)])
        w.finalize()
        b.finalize(str(tmp_path / "theirs.idx"))
        for ext in ("bin", "idx"):
            assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / f"theirs.{ext}").read_bytes()


def test_token_id_at_vocabulary_size_is_reported_with_position(tmp_path, capsys):
    w = IndexedWriter(str(tmp_path / "s"), np.uint16)
    w.add_document([1, 2, 3])
    w.add_document([4, 500, 6])
    w.finalize()
    assert validate_main([str(tmp_path / "s.bin"), "--vocab-size", "500"]) == 1
    out = capsys.readouterr().out
    assert "token 4 (sequence 1): id 500" in out


def test_ledger_that_does_not_balance_is_invalid(tmp_path, capsys):
    directory = make_dataset(str(tmp_path / "d"), "sft")
    mpath = os.path.join(directory, "manifest.json")
    manifest = json.load(open(mpath))
    manifest["ledger"]["stages"][1]["kept"] += 1
    json.dump(manifest, open(mpath, "w"))
    assert validate_main([directory]) == 1
    out = capsys.readouterr().out
    assert "stage 'filter': input" in out and "field 'ledger'" in out


def test_parquet_where_arrow_expected_is_named(tmp_path, capsys):
    directory = make_dataset(str(tmp_path / "d"), "sft", shards=1)
    docs = make_dataset(str(tmp_path / "docs"), "documents", shards=1)
    os.replace(os.path.join(docs, "shard-00000.parquet"), os.path.join(directory, "shard-00000.arrow"))
    assert validate_main([directory]) == 1
    assert "a Parquet file where an Arrow IPC file of contract 'sft' is expected" in capsys.readouterr().out


@pytest.mark.parametrize("args,code", [([], 2), (["--bogus", "x"], 2), (["/nonexistent/dir"], 1)])
def test_exit_codes(args, code, capsys):
    assert validate_main(args) == code


def test_cli_entry_points_print_no_traceback(tmp_path):
    (tmp_path / "garbage.arrow").write_bytes(b"\x00garbage" * 10)
    for cmd in ([sys.executable, "-m", "schemas.validate"], [sys.executable, "-m", "kiln.cli", "validate"]):
        proc = subprocess.run([*cmd, str(tmp_path / "garbage.arrow")], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
        assert proc.returncode == 1
        assert "Traceback" not in proc.stderr + proc.stdout
        assert "not an Arrow IPC or Parquet file" in proc.stdout


def test_fan_out_stage_is_checked_against_the_records_it_came_from():
    from schemas.manifest import Ledger

    ledger = Ledger()
    ledger.stage("parse", input=6, kept=5, error=1)
    pair = ledger.stage("pair", input=9, kept=9)
    assert ledger.check() == ["stage 'pair': input 9 != previous stage 'parse' kept 5"]
    pair.derived_from = 5
    assert ledger.check() == []
    assert Ledger.from_json(ledger.to_json()).stages[1].derived_from == 5
    pair.derived_from = 4
    assert "derived from 4 records != previous stage 'parse' kept 5" in ledger.check()[0]
