"""`kiln validate PATH...`: check dataset directories or single shards against their contract.

Checks schema name/version, column types, aligned list lengths (ids vs mask), token ids below the
vocabulary size, empty completions, packed-row boundaries, `.bin`/`.idx` consistency, manifest
sha256/row counts/byte sizes and ledger arithmetic. Every problem names the file, the row and the
field; broken input never produces a traceback. Exit 0 valid, 1 invalid, 2 unusable arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from schemas.contracts import CONTRACTS, Contract, schema_identity
from schemas.indexed import IndexFormatError, check_pair
from schemas.manifest import MANIFEST, Manifest
from schemas.shards import sha256_file

PARQUET_MAGIC = b"PAR1"
ARROW_MAGIC = b"ARROW1"


@dataclass
class Issue:
    path: str
    message: str
    row: int | None = None
    field: str | None = None

    def __str__(self) -> str:
        where = self.path
        if self.row is not None:
            where += f", row {self.row}"
        if self.field is not None:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    rows: int = 0
    tokens: int = 0

    @property
    def ok(self) -> bool:
        return not self.issues

    def add(self, path: str, message: str, row: int | None = None, fld: str | None = None) -> None:
        self.issues.append(Issue(path, message, row, fld))


def validate_path(path: str, vocab_size: int | None = None,
                  fingerprint: str | None = None) -> Report:
    """Validate a dataset directory (with manifest.json) or one shard file."""
    report = Report()
    try:
        if os.path.isdir(path):
            _validate_dir(path, report, vocab_size)
        elif os.path.exists(path):
            _validate_file(path, report, vocab_size, fingerprint, expect=None)
        else:
            report.add(path, "no such file or directory")
    except Exception as exc:  # noqa: BLE001 - any failure to parse untrusted bytes means invalid
        report.add(path, f"unreadable: {type(exc).__name__}: {_one_line(exc)}")
    return report


def _validate_dir(directory: str, report: Report, vocab_size: int | None) -> None:
    report.checked.append(directory)
    mpath = os.path.join(directory, MANIFEST)
    if not os.path.exists(mpath):
        report.add(directory, f"missing {MANIFEST} (a dataset directory needs its manifest; "
                              "pass single shard files to check them alone)")
        return
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = Manifest.from_json(json.load(f))
    except (ValueError, UnicodeDecodeError) as exc:
        report.add(mpath, f"invalid manifest: {_one_line(exc)}")
        return
    name, version = manifest.schema.get("name"), manifest.schema.get("version")
    c = CONTRACTS.get(name)
    if c is None:
        report.add(mpath, f"unknown schema '{name}'", fld="schema.name")
        return
    if version != c.version:
        report.add(mpath, f"schema '{name}' version {version}, this llmkiln reads version "
                          f"{c.version}", fld="schema.version")
    tok = manifest.tokenizer or {}
    vocab = vocab_size or tok.get("vocab_size")
    fp = tok.get("fingerprint")
    for problem in manifest.ledger.check():
        report.add(mpath, f"ledger: {problem}", fld="ledger")
    for i, shard in enumerate(manifest.shards):
        spath = os.path.join(directory, shard.path)
        if c.format == "megatron_indexed":
            prefix = spath.removesuffix(".bin").removesuffix(".idx")
            files = [f"{prefix}.bin", f"{prefix}.idx"]
        else:
            files = [spath]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            report.add(mpath, f"shard file {missing[0]} is missing", fld=f"shards[{i}].path")
            continue
        size = sum(os.path.getsize(f) for f in files)
        if size != shard.bytes:
            report.add(spath, f"size {size} bytes, manifest says {shard.bytes}",
                       fld=f"shards[{i}].bytes")
        if sha256_file(*files) != shard.sha256:
            report.add(spath, "sha256 differs from the manifest (file changed or damaged)",
                       fld=f"shards[{i}].sha256")
        rows_before = report.rows
        _validate_file(files[0], report, vocab, fp, expect=c)
        if report.rows - rows_before != shard.rows:
            report.add(spath, f"{report.rows - rows_before} rows, manifest says {shard.rows}",
                       fld=f"shards[{i}].rows")


def _validate_file(path: str, report: Report, vocab: int | None, fingerprint: str | None,
                   expect: Contract | None) -> None:
    report.checked.append(path)
    if path.endswith((".bin", ".idx")):
        prefix = path[:-4]
        try:
            index = check_pair(prefix, vocab)
        except IndexFormatError as exc:
            report.add(prefix + (".idx" if "header" in str(exc) else ""), str(exc))
            return
        except FileNotFoundError as exc:
            report.add(path, f"missing partner file: {exc.filename}")
            return
        report.rows += len(index.lengths)
        report.tokens += int(index.lengths.astype(np.int64).sum())
        return
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == PARQUET_MAGIC:
        if expect is not None and expect.format != "parquet":
            report.add(path, f"a Parquet file where an Arrow IPC file of contract "
                             f"'{expect.name}' is expected")
            return
        _validate_parquet(path, report)
        return
    if head[:6] != ARROW_MAGIC:
        report.add(path, f"not an Arrow IPC or Parquet file (starts with {head[:8]!r})")
        return
    table = ipc.open_file(pa.memory_map(path, "r")).read_all()
    table.validate(full=True)  # corrupt offsets become an ArrowInvalid here, not a crash later
    _validate_table(path, table, report, vocab, fingerprint, expect)


def _validate_parquet(path: str, report: Report) -> None:
    c = CONTRACTS["documents"]
    pf = pq.ParquetFile(path)
    schema = pf.schema_arrow
    if not _check_columns(path, schema, c, report):
        return
    table = pf.read()
    table.validate(full=True)
    for name in ("id", "text"):
        nulls = pc.is_null(table.column(name))
        if pc.any(nulls).as_py():
            report.add(path, "null value", row=_first_true(nulls), fld=name)
    empty = pc.equal(pc.utf8_length(table.column("text")), 0)
    if pc.any(empty).as_py():
        report.add(path, "empty text", row=_first_true(empty), fld="text")
    report.rows += table.num_rows


def _validate_table(path: str, table: pa.Table, report: Report, vocab: int | None,
                    fingerprint: str | None, expect: Contract | None) -> None:
    name, version, fp = schema_identity(table.schema)
    if name is None:
        report.add(path, "schema metadata has no 'kiln.schema' name (not written by llmkiln?)")
        return
    c = CONTRACTS.get(name)
    if c is None or c.format != "arrow":
        report.add(path, f"unknown Arrow contract '{name}'", fld="kiln.schema")
        return
    if expect is not None and c.name != expect.name:
        report.add(path, f"contract '{c.name}', the manifest says '{expect.name}'", fld="kiln.schema")
    if version != c.version:
        report.add(path, f"contract '{name}' version {version}, expected {c.version}",
                   fld="kiln.schema_version")
    if fingerprint and fp != fingerprint:
        report.add(path, f"tokenizer fingerprint {fp} differs from the manifest's {fingerprint}",
                   fld="kiln.tokenizer_fingerprint")
    if not _check_columns(path, table.schema, c, report):
        return
    for f in c.schema:
        if not f.nullable:
            nulls = pc.is_null(table.column(f.name))
            if pc.any(nulls).as_py():
                report.add(path, "null value", row=_first_true(nulls), fld=f.name)
                return
    lengths = {col: pc.list_value_length(table.column(col)) for group in c.aligned for col in group}
    for group in c.aligned:
        first = lengths[group[0]]
        for other in group[1:]:
            diff = pc.not_equal(first, lengths[other])
            if pc.any(diff).as_py():
                row = _first_true(diff)
                report.add(path, f"length {lengths[other][row].as_py()} differs from "
                                 f"'{group[0]}' length {first[row].as_py()}", row=row, fld=other)
    for col in c.non_empty:
        empty = pc.equal(pc.list_value_length(table.column(col)), 0)
        if pc.any(empty).as_py():
            report.add(path, "empty token list", row=_first_true(empty), fld=col)
    for col in c.token_columns:
        column = table.column(col)
        values = pc.list_flatten(column)
        if len(values) == 0:
            continue
        bad = pc.less(values, 0)
        if vocab is not None:
            bad = pc.or_(bad, pc.greater_equal(values, vocab))
        if pc.any(bad).as_py():
            pos = _first_true(bad)
            row, offset = _row_of_flat(column, pos)
            report.add(path, f"token id {values[pos].as_py()} at position {offset} is outside "
                             f"[0, {vocab if vocab is not None else 'inf'})", row=row, fld=col)
        report.tokens += len(values)
    mask_cols = [g[1] for g in c.aligned if g[1].endswith("mask")]
    for col in mask_cols:
        flat = pc.list_flatten(table.column(col))
        if len(flat):
            bad = pc.and_(pc.not_equal(flat, 0), pc.not_equal(flat, 1))
            if pc.any(bad).as_py():
                row, _ = _row_of_flat(table.column(col), _first_true(bad))
                report.add(path, "loss mask values must be 0 or 1", row=row, fld=col)
    if c.name == "sft_packed":
        _check_packed(path, table, report)
    report.rows += table.num_rows


def _check_packed(path: str, table: pa.Table, report: Report) -> None:
    ids_len = pc.list_value_length(table.column("input_ids")).to_pylist()
    for row, (bounds, names) in enumerate(zip(table.column("seq_boundaries").to_pylist(),
                                              table.column("ids").to_pylist(), strict=True)):
        if not bounds or bounds[0] != 0 or bounds[-1] != ids_len[row] or any(
                b >= a for a, b in zip(bounds[1:], bounds, strict=False)):
            report.add(path, f"boundaries {bounds[:6]}... must rise strictly from 0 to "
                             f"{ids_len[row]}", row=row, fld="seq_boundaries")
            return
        if len(names) != len(bounds) - 1:
            report.add(path, f"{len(names)} ids for {len(bounds) - 1} packed sequences", row=row,
                       fld="ids")
            return


def _check_columns(path: str, schema: pa.Schema, c: Contract, report: Report) -> bool:
    ok = True
    for f in c.schema:
        idx = schema.get_field_index(f.name)
        if idx < 0:
            report.add(path, f"column missing (contract '{c.name}' v{c.version})", fld=f.name)
            ok = False
        elif not schema.field(idx).type.equals(f.type):
            report.add(path, f"type {schema.field(idx).type}, contract says {f.type}", fld=f.name)
            ok = False
    return ok


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int:
    arr = mask.to_numpy(zero_copy_only=False) if hasattr(mask, "to_numpy") else np.asarray(mask)
    return int(np.argmax(np.asarray(arr, dtype=bool)))


def _row_of_flat(column: pa.ChunkedArray, flat_pos: int) -> tuple[int, int]:
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    ends = np.cumsum(np.nan_to_num(lengths.astype(np.float64)).astype(np.int64))
    row = int(np.searchsorted(ends, flat_pos, side="right"))
    start = int(ends[row - 1]) if row else 0
    return row, flat_pos - start


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kiln validate", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="dataset directories or shard files")
    parser.add_argument("--json", action="store_true", help="print a JSON report")
    parser.add_argument("--vocab-size", type=int, help="check token ids against this size")
    parser.add_argument("--fingerprint", help="expected tokenizer fingerprint")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return 0 if exc.code == 0 else 2
    results = {p: validate_path(p, args.vocab_size, args.fingerprint) for p in args.paths}
    if args.json:
        print(json.dumps({p: {"ok": r.ok, "rows": r.rows, "tokens": r.tokens,
                              "checked": r.checked, "issues": [asdict(i) for i in r.issues]}
                          for p, r in results.items()}, indent=2))
    else:
        for p, r in results.items():
            if r.ok:
                print(f"OK       {p}: {len(r.checked)} files, {r.rows:,} rows, {r.tokens:,} tokens")
            else:
                print(f"INVALID  {p}: {len(r.issues)} problem(s)")
                for issue in r.issues[:20]:
                    print(f"  - {issue}")
                if len(r.issues) > 20:
                    print(f"  ... and {len(r.issues) - 20} more")
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
