"""The one way to open a path: local files, `gs://` and `s3://` (with the `cloud` extra) via fsspec.

Writes that must never be seen half-done go through `atomic_write`/`atomic_dir`: on a local disk
they write beside the target and rename; object stores make a single PUT visible atomically.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec
from fsspec.core import url_to_fs


def filesystem(path: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `path` and the path inside it."""
    return url_to_fs(str(path))


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def open_path(path: str, mode: str = "rb", *, compression: str | None = "infer",
              **kwargs: Any) -> IO:
    """Open a local or remote file; `.gz`, `.zst`, `.bz2`, `.xz` are decompressed by suffix."""
    return fsspec.open(str(path), mode, compression=compression, **kwargs).open()


def expand(patterns: str | list[str]) -> list[str]:
    """Expand globs (and directories, to their files) into a sorted list of full paths."""
    if isinstance(patterns, str):
        patterns = [patterns]
    out: list[str] = []
    for pattern in patterns:
        fs, inner = filesystem(pattern)
        protocol = fs.protocol[0] if isinstance(fs.protocol, (list, tuple)) else fs.protocol
        prefix = "" if protocol in ("file", "local") else f"{protocol}://"
        if any(ch in inner for ch in "*?["):
            matches = fs.glob(inner)
        elif fs.isdir(inner):
            matches = [p for p in fs.find(inner)]
        else:
            matches = [inner] if fs.exists(inner) else []
        out.extend(prefix + m for m in matches if not fs.isdir(m))
    return sorted(dict.fromkeys(out))


def exists(path: str) -> bool:
    fs, inner = filesystem(path)
    return fs.exists(inner)


def makedirs(path: str) -> None:
    fs, inner = filesystem(path)
    fs.makedirs(inner, exist_ok=True)


def join(base: str, *parts: str) -> str:
    base = str(base)
    if is_local(base):
        return os.path.join(base, *parts)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    return fs.cat_file(inner)


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


@contextmanager
def atomic_write(path: str, mode: str = "wb") -> Iterator[IO]:
    """Write to `path` so that readers see the old file or the whole new one, never a part."""
    path = str(path)
    if is_local(path):
        local = path.removeprefix("file://")
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(local)),
                                   prefix=f".{os.path.basename(local)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
            os.replace(tmp, local)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        # Object stores publish an object when its upload completes: on close. An exception must
        # therefore cancel the upload (gcsfs/s3fs `discard`: abort the resumable or multipart
        # upload), not close the file, or the part written so far would become the object.
        f = fsspec.open(path, mode).open()
        try:
            yield f
        except BaseException:
            discard = getattr(f, "discard", None)
            if discard is not None:
                discard()
            else:
                f.close()
                fs, _, [target] = fsspec.get_fs_token_paths(path)
                if fs.exists(target):
                    fs.rm(target)
            raise
        f.close()


def write_bytes(path: str, data: bytes) -> None:
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Build a local directory under a temporary name and rename it into place when complete."""
    final = os.path.abspath(str(path))
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(final)}.{uuid.uuid4().hex[:8]}.partial")
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(final):
            old = f"{tmp}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
