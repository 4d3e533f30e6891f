"""Job output directories on a local disk or object storage (gs://, s3://, any fsspec URL).

Writers in `schemas` (Arrow shards, `.bin/.idx` pairs, dead letters, manifests) write local files
with a temp name and a rename. For a remote directory, `local_staging` lets them write into a
local temp dir and then uploads each file with `kiln.paths.atomic_write` (an object appears whole
or not at all), so a reader never sees half a file; the manifest is still written last, after
every shard it names.
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from kiln.paths import atomic_dir, atomic_write, filesystem, is_local, join, open_path, read_text
from schemas.indexed import Index, read_index
from schemas.manifest import MANIFEST, Manifest

_COPY_CHUNK = 16 << 20


def upload(local: str, dest: str) -> None:
    """Copy a finished local file to `dest` in one atomic write."""
    with open(local, "rb") as src, atomic_write(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


@contextmanager
def local_staging(directory: str) -> Iterator[str]:
    """A local directory that stands for `directory`: the directory itself when it is local;
    otherwise a temp dir whose files are uploaded under `directory` (same relative paths, in
    sorted order, so `x.bin` lands before `x.idx`) when the block ends without an error."""
    if is_local(directory):
        yield directory.removeprefix("file://")
        return
    with tempfile.TemporaryDirectory(prefix="kiln-upload-") as tmp:
        yield tmp
        found = [os.path.relpath(os.path.join(root, name), tmp)
                 for root, _, names in os.walk(tmp) for name in names]
        for rel in sorted(found):
            upload(os.path.join(tmp, rel), join(directory, *rel.split(os.sep)))


def remove_tree(path: str) -> None:
    """Delete a directory (or object prefix) and everything under it; nothing if it is absent."""
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def is_empty_dir(path: str) -> bool:
    fs, inner = filesystem(path)
    return not fs.exists(inner) or not fs.ls(inner, detail=False)


def clear_dir(path: str) -> None:
    """Empty an output directory, its manifest first: while the rest is deleted (and
    rewritten) no manifest names files that may be gone."""
    fs, inner = filesystem(path)
    manifest = posixpath.join(inner, MANIFEST)
    if fs.exists(manifest):
        fs.rm(manifest)
    remove_tree(path)
    fs.makedirs(inner, exist_ok=True)


@contextmanager
def output_dir(path: str) -> Iterator[str]:
    """The directory a job builds its output in. Local: a sibling renamed into place when the
    block completes (`kiln.paths.atomic_dir`). Remote: object stores cannot rename a prefix, so
    the job writes in place after the old content is removed, and its completion marker (the
    manifest) must be the last file it writes; a failed run leaves files but no marker."""
    if is_local(path):
        with atomic_dir(path.removeprefix("file://")) as staging:
            yield staging
    else:
        clear_dir(path)
        yield path


def write_manifest_to(directory: str, manifest: Manifest) -> str:
    """`schemas.manifest.write_manifest` for a local or remote directory (same bytes)."""
    from schemas.manifest import write_manifest

    with local_staging(directory) as local:
        write_manifest(local, manifest)
    return join(directory, MANIFEST)


def read_manifest_from(directory: str) -> Manifest:
    return Manifest.from_json(json.loads(read_text(join(directory, MANIFEST))))


def read_index_from(idx_path: str) -> Index:
    """`schemas.indexed.read_index` for a local or remote `.idx` (a remote one is copied to a
    local temp file first: the reader parses a local file)."""
    if is_local(idx_path):
        return read_index(idx_path.removeprefix("file://"))
    with tempfile.TemporaryDirectory(prefix="kiln-idx-") as tmp:
        local = os.path.join(tmp, "part.idx")
        with open_path(idx_path, "rb", compression=None) as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        return read_index(local)
