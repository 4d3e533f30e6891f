"""Paths (local, atomic writes, globs) and the kiln dispatcher's exit codes."""

from __future__ import annotations

import gzip
import os

import pytest

from kiln import paths
from kiln.cli import SUBCOMMANDS, main


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = str(tmp_path / "a" / "f.txt")
    paths.write_text(target, "old")
    with pytest.raises(RuntimeError), paths.atomic_write(target, "w") as f:
        f.write("half")
        raise RuntimeError("crash mid-write")
    assert open(target).read() == "old"
    assert os.listdir(tmp_path / "a") == ["f.txt"]


def test_atomic_dir_appears_only_when_complete(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(ValueError), paths.atomic_dir(str(final)) as tmp:
        open(os.path.join(tmp, "x"), "w").write("1")
        raise ValueError
    assert not final.exists() and os.listdir(tmp_path) == []
    with paths.atomic_dir(str(final)) as tmp:
        open(os.path.join(tmp, "x"), "w").write("1")
    assert (final / "x").read_text() == "1"


def test_open_and_expand(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write('{"a": 1}\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b")
    with paths.open_path(str(tmp_path / "a.jsonl.gz"), "rt") as f:
        assert f.read() == '{"a": 1}\n'
    assert paths.expand(str(tmp_path / "*.gz")) == [str(tmp_path / "a.jsonl.gz")]
    assert paths.expand(str(tmp_path / "sub")) == [str(tmp_path / "sub" / "b.txt")]
    assert paths.expand(str(tmp_path / "missing*")) == []


def test_cli_usage_and_unknown_command(capsys):
    assert main([]) == 2
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS)
    assert main(["frobnicate"]) == 2
