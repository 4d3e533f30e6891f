"""Text inputs of the tokenizer jobs: `documents` dataset directories (`kiln corpus` output) or
JSONL/Parquet files with a text field, named as sources and cut into deterministic work units.

A work unit is a fixed range of one input file (a run of Parquet row groups, or a whole JSONL
file); its bounds depend only on the file, never on the runner, so units (and everything keyed
by them) are the same on one worker or a thousand. Documents keep a stable order:
(source, file index, row).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from kiln.errors import DataError, UsageError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True)
class Source:
    """A named input: its files, in the order that defines document order."""

    name: str
    spec: str  # what the user passed
    files: tuple[str, ...]
    weight: float | None = None  # blend weight; None = proportional to tokens


@dataclass(frozen=True)
class InputUnit:
    """Rows [row_start, row_start + rows) of one file (rows None: the whole JSONL file)."""

    source: str
    path: str
    file_index: int
    row_start: int = 0
    rows: int | None = None
    row_groups: tuple[int, ...] = field(default=())

    @property
    def key(self) -> str:
        return f"{self.file_index:06d}-{self.row_start:012d}"

    @property
    def order(self) -> tuple[str, int, int]:
        return (self.source, self.file_index, self.row_start)


@dataclass(frozen=True)
class Record:
    """One input row: where it came from, its id, and its text or why it has none."""

    path: str
    offset: int  # JSONL: 1-based line number; Parquet: 0-based row
    doc_id: str | None
    text: str | None
    problem: str | None = None  # set when the row is unusable (goes to the dead-letter output)
    raw: str | None = None


def parse_sources(inputs: Sequence[str], tags: Sequence[str] | None = None,
                  weights: Sequence[str] | None = None) -> list[Source]:
    """`--input PATH` (with `--source-tag NAME` each) or `--input NAME=PATH`; PATH is a
    `documents` dataset directory, a directory of JSONL/Parquet files, or a glob."""
    tags = list(tags or [])
    if tags and len(tags) != len(inputs):
        raise UsageError(f"--source-tag given {len(tags)} times for {len(inputs)} --input")
    sources: list[Source] = []
    for i, spec in enumerate(inputs):
        name, sep, path = spec.partition("=")
        if tags or not sep or "/" in name:  # a plain path (which may itself contain '=')
            name, path = "", spec
        name = tags[i] if tags else (name or _default_name(path))
        if not name or not all(c.isalnum() or c in "-_." for c in name):
            raise UsageError(f"source tag {name!r}: use letters, digits, '-', '_' or '.'")
        sources.append(Source(name, spec, tuple(resolve_files(path))))
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"source tags must be distinct, got {names}")
    for w in weights or []:
        name, _, value = w.partition("=")
        try:
            weight = float(value)
        except ValueError:
            raise UsageError(f"--source-weight {w!r}: expected NAME=NUMBER") from None
        if name not in names or weight < 0:
            raise UsageError(f"--source-weight {w!r}: unknown source or negative weight")
        i = names.index(name)
        sources[i] = Source(name, sources[i].spec, sources[i].files, weight)
    if weights and any(s.weight is None for s in sources):
        raise UsageError("--source-weight: give a weight for every source or for none")
    return sources


def _default_name(path: str) -> str:
    base = path.rstrip("/")
    if any(c in base for c in "*?["):
        base = os.path.dirname(base.split("*")[0].split("?")[0].split("[")[0]) or "input"
    name = os.path.basename(base).split(".")[0]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "input"


def resolve_files(path: str) -> list[str]:
    """The input files of one source, in document order."""
    from dataprep.outputs import read_manifest_from
    from kiln.paths import exists, expand, join
    from schemas.manifest import MANIFEST

    if exists(join(path, MANIFEST)):
        try:
            manifest = read_manifest_from(path)  # local or object storage
        except (ValueError, OSError) as exc:
            raise DataError(f"unreadable manifest: {exc}", path=join(path, MANIFEST)) from None
        if manifest.schema.get("name") != "documents":
            raise DataError(f"schema '{manifest.schema.get('name')}', expected 'documents'",
                            path=join(path, MANIFEST), field="schema.name")
        files = [join(path, s.path) for s in manifest.shards]
        missing = [f for f in files if not exists(f)]
        if missing:
            raise DataError("shard listed in the manifest is missing", path=missing[0])
        return files
    files = [f for f in expand(path) if f.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES)]
    if not files:
        raise UsageError(f"--input {path!r}: no manifest.json and no .jsonl/.parquet files")
    return files


def plan_units(sources: Sequence[Source], rows_per_unit: int,
               text_field: str = "text") -> list[InputUnit]:
    """Cut every file into units; Parquet by whole row groups (footer read only, so a file that
    is not Parquet or lacks the text column fails here, before the pipeline starts)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kiln.paths import open_path

    units: list[InputUnit] = []
    for src in sources:
        for i, path in enumerate(src.files):
            if not path.endswith(PARQUET_SUFFIXES):
                units.append(InputUnit(src.name, path, i))
                continue
            try:
                with open_path(path, "rb") as f:
                    pf = pq.ParquetFile(f)
                    meta, names = pf.metadata, pf.schema_arrow.names
            except (pa.ArrowException, OSError) as exc:
                raise DataError(f"unreadable Parquet file: {exc}", path=path) from None
            if text_field not in names:
                raise DataError(f"no column '{text_field}' (columns: {', '.join(names)})",
                                path=path, field=text_field)
            start, groups, rows = 0, [], 0
            for g in range(meta.num_row_groups):
                groups.append(g)
                rows += meta.row_group(g).num_rows
                if rows >= rows_per_unit or g == meta.num_row_groups - 1:
                    units.append(InputUnit(src.name, path, i, start, rows, tuple(groups)))
                    start, groups, rows = start + rows, [], 0
    return units


def read_unit(unit: InputUnit, text_field: str = "text", id_field: str = "id",
              batch_rows: int = 1024) -> Iterator[Record]:
    """The unit's rows in order; unusable rows come back with `problem` set, never raised."""
    if unit.row_groups:
        yield from _read_parquet(unit, text_field, id_field, batch_rows)
    else:
        yield from _read_jsonl(unit, text_field, id_field)


def _read_parquet(unit: InputUnit, text_field: str, id_field: str,
                  batch_rows: int) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kiln.paths import open_path

    offset = unit.row_start
    try:
        with open_path(unit.path, "rb") as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            columns = [text_field] + ([id_field] if id_field in names else [])
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=list(unit.row_groups),
                                         columns=columns):
                texts = batch.column(text_field).to_pylist()
                ids = (batch.column(id_field).to_pylist() if id_field in names
                       else [None] * len(texts))
                for text, doc_id in zip(texts, ids, strict=True):
                    problem = None if isinstance(text, str) else \
                        f"field '{text_field}' is not a string"
                    yield Record(unit.path, offset, None if doc_id is None else str(doc_id),
                                 text if problem is None else None, problem)
                    offset += 1
    except (pa.ArrowException, OSError) as exc:  # a damaged page: the rest of the unit is lost
        yield Record(unit.path, offset, None, None, f"unreadable from row {offset}: {exc}")


def _read_jsonl(unit: InputUnit, text_field: str, id_field: str) -> Iterator[Record]:
    from kiln.paths import open_path

    line_no = 0
    try:
        with open_path(unit.path, "rt", encoding="utf-8", errors="surrogateescape") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():  # blank lines separate nothing and hold no record
                    yield _jsonl_record(unit.path, line_no, line, text_field, id_field)
    except (OSError, EOFError) as exc:  # e.g. a truncated .gz: the rest of the file is lost
        yield Record(unit.path, line_no + 1, None, None,
                     f"unreadable from line {line_no + 1}: {type(exc).__name__}: {exc}")


def _jsonl_record(path: str, line_no: int, line: str, text_field: str, id_field: str) -> Record:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        return Record(path, line_no, None, None, f"invalid JSON: {exc}", line)
    if not isinstance(obj, dict):
        return Record(path, line_no, None, None, "not a JSON object", line)
    text = obj.get(text_field)
    doc_id = None if obj.get(id_field) is None else str(obj.get(id_field))
    if not isinstance(text, str):
        return Record(path, line_no, doc_id, None,
                      f"field '{text_field}' missing or not a string", line)
    return Record(path, line_no, doc_id, text, None, line)
