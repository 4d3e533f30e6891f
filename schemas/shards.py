"""Writing and reading shards: zstd Arrow IPC files (memory-mappable) and zstd Parquet files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from schemas.contracts import arrow_schema, contract
from schemas.manifest import ShardEntry

_CHUNK = 1 << 20


def sha256_file(*paths: str) -> str:
    """sha256 over the files' bytes in order (an indexed shard hashes `.bin` then `.idx`)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def to_table(rows: Sequence[Mapping[str, Any]] | pa.Table, name: str,
             fingerprint: str | None = None) -> pa.Table:
    """Rows (dicts) or a table, cast to the contract's schema; a missing field raises KeyError."""
    schema = arrow_schema(name, fingerprint)
    if isinstance(rows, pa.Table):
        return rows.select(schema.names).cast(schema)
    columns = {f.name: [row[f.name] if f.nullable is False else row.get(f.name) for row in rows]
               for f in schema}
    return pa.table(columns, schema=schema)


def count_tokens(table: pa.Table, name: str) -> int:
    total = 0
    for col in contract(name).token_columns:
        lengths = pc.list_value_length(table.column(col))
        total += int(pc.sum(lengths).as_py() or 0)
    return total


def write_arrow_shard(path: str, rows: Sequence[Mapping[str, Any]] | pa.Table, name: str,
                      fingerprint: str | None = None, *, root: str | None = None,
                      batch_rows: int = 1024) -> ShardEntry:
    """Write one zstd Arrow IPC file atomically; returns its manifest entry (path relative to root)."""
    table = to_table(rows, name, fingerprint)
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    options = ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(tmp, "wb") as sink, ipc.new_file(sink, table.schema, options=options) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    os.replace(tmp, path)
    return _entry(path, table.num_rows, count_tokens(table, name), root)


def write_parquet_shard(path: str, rows: Sequence[Mapping[str, Any]] | pa.Table, name: str,
                        *, root: str | None = None, row_group_rows: int = 4096) -> ShardEntry:
    """Write one zstd Parquet file atomically (the `documents` contract)."""
    table = to_table(rows, name)
    tmp = f"{path}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_rows)
    os.replace(tmp, path)
    return _entry(path, table.num_rows, 0, root)


def indexed_shard_entry(prefix: str, *, root: str | None = None,
                        source: str | None = None) -> ShardEntry:
    """Manifest entry of a finished `.bin/.idx` pair: path is the `.bin`, sha256 covers both."""
    from schemas.indexed import read_index

    index = read_index(f"{prefix}.idx")
    bin_path = f"{prefix}.bin"
    rel = os.path.relpath(bin_path, root) if root else os.path.basename(bin_path)
    return ShardEntry(path=rel, rows=len(index.lengths),
                      bytes=os.path.getsize(bin_path) + os.path.getsize(f"{prefix}.idx"),
                      sha256=sha256_file(bin_path, f"{prefix}.idx"),
                      tokens=int(index.lengths.sum(dtype="int64")), source=source)


def read_arrow_shard(path: str) -> pa.Table:
    """Memory-map an Arrow IPC shard (zstd buffers are decompressed on access)."""
    source = pa.memory_map(path, "r")
    return ipc.open_file(source).read_all()


def iter_parquet_rows(path: str, columns: Iterable[str] | None = None,
                      batch_rows: int = 1024) -> Iterable[dict[str, Any]]:
    """Stream rows of a Parquet shard as dicts without loading the whole file."""
    with pq.ParquetFile(path) as f:
        for batch in f.iter_batches(batch_size=batch_rows, columns=list(columns) if columns else None):
            yield from batch.to_pylist()


def _entry(path: str, rows: int, tokens: int, root: str | None) -> ShardEntry:
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    return ShardEntry(path=rel, rows=rows, bytes=os.path.getsize(path), sha256=sha256_file(path),
                      tokens=tokens)
