"""`dataprep.outputs` on fsspec's in-memory filesystem: staged files appear only when the writer
finished, under their relative paths; a remote `.idx` reads like a local one; clearing an output
directory removes everything, the manifest included."""

from __future__ import annotations

import os
import uuid

import fsspec
import numpy as np
import pytest

from dataprep.outputs import clear_dir, is_empty_dir, local_staging, read_index_from
from kiln.paths import read_bytes
from schemas.indexed import IndexedWriter, read_index

MEMORY = fsspec.filesystem("memory")


@pytest.fixture
def remote():
    bucket = f"kiln-outputs-{uuid.uuid4().hex[:8]}"
    yield f"memory://{bucket}/out"
    if MEMORY.exists(bucket):
        MEMORY.rm(bucket, recursive=True)


def test_staged_files_are_uploaded_under_their_relative_paths(remote):
    with local_staging(remote) as local:
        os.makedirs(os.path.join(local, "dead-letter"))
        for name, data in (("a.bin", b"tokens"), ("dead-letter/x.jsonl", b"{}\n")):
            with open(os.path.join(local, name), "wb") as f:
                f.write(data)
        assert is_empty_dir(remote)  # nothing is visible before the block completes
    assert read_bytes(f"{remote}/a.bin") == b"tokens"
    assert read_bytes(f"{remote}/dead-letter/x.jsonl") == b"{}\n"
    assert not os.path.exists(local)


def test_a_failed_writer_uploads_nothing(remote):
    with pytest.raises(RuntimeError), local_staging(remote) as local:
        with open(os.path.join(local, "half.bin"), "wb") as f:
            f.write(b"half")
        raise RuntimeError("worker died")
    assert is_empty_dir(remote)


def test_local_staging_of_a_local_directory_is_the_directory(tmp_path):
    with local_staging(str(tmp_path)) as local:
        assert local == str(tmp_path)


def test_remote_index_reads_like_the_local_one(tmp_path, remote):
    writer = IndexedWriter(str(tmp_path / "part"), np.uint16)
    for doc in ([1, 2, 3], [4], [5, 6]):
        writer.add_document(doc)
    writer.finalize()
    with local_staging(remote) as local, open(os.path.join(local, "part.idx"), "wb") as f:
        f.write((tmp_path / "part.idx").read_bytes())
    here, there = read_index(str(tmp_path / "part.idx")), read_index_from(f"{remote}/part.idx")
    assert there.dtype == here.dtype == np.uint16
    assert there.lengths.tolist() == here.lengths.tolist() == [3, 1, 2]
    assert there.pointers.tolist() == here.pointers.tolist()


def test_clear_dir_empties_a_remote_output(remote):
    with local_staging(remote) as local:
        for name in ("manifest.json", "x-00000.bin", "x-00000.idx"):
            with open(os.path.join(local, name), "w") as f:
                f.write(name)
    assert not is_empty_dir(remote)
    clear_dir(remote)
    assert is_empty_dir(remote)


def test_a_documents_manifest_on_object_storage_names_the_tokenize_inputs(remote):
    import json

    from dataprep.token_inputs import resolve_files

    manifest = {"schema": {"name": "documents", "version": 1}, "ledger": {"stages": []},
                "shards": [{"path": "part-0.parquet", "rows": 1, "bytes": 1, "sha256": "0"}],
                "extra": {}}
    MEMORY.pipe(remote.removeprefix("memory://") + "/manifest.json", json.dumps(manifest).encode())
    MEMORY.pipe(remote.removeprefix("memory://") + "/part-0.parquet", b"x")
    assert resolve_files(remote) == [f"{remote}/part-0.parquet"]
