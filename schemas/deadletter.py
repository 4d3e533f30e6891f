"""Dead-letter entries: one JSON line per rejected input record, with where it came from and why."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

DEAD_LETTER_DIR = "dead-letter"


@dataclass(frozen=True)
class DeadLetter:
    source: str  # input file
    offset: int | None  # line number (1-based) or byte / record offset, as the reader knows it
    reason: str
    record: str | None = None  # the raw record when it is text (truncated by the writer)
    stage: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


MAX_RECORD_CHARS = 100_000


def dead_letter(source: str, offset: int | None, reason: str, record: Any = None,
                stage: str | None = None) -> DeadLetter:
    """Build an entry; bytes are decoded with replacement, long records are cut."""
    if isinstance(record, bytes):
        record = record.decode("utf-8", errors="replace")
    elif record is not None and not isinstance(record, str):
        record = json.dumps(record, ensure_ascii=False, default=str)
    if record is not None and len(record) > MAX_RECORD_CHARS:
        record = record[:MAX_RECORD_CHARS] + "...[truncated]"
    return DeadLetter(source, offset, reason, record, stage)


def write_dead_letters(directory: str, entries: Iterable[DeadLetter],
                       name: str = "dead-letter.jsonl") -> tuple[str, int]:
    """Write entries sorted by (source, offset) to `directory/dead-letter/<name>`; returns count."""
    out_dir = os.path.join(directory, DEAD_LETTER_DIR)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, name)
    rows = sorted(entries, key=lambda e: (e.source, e.offset if e.offset is not None else -1,
                                          e.reason))
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        for e in rows:
            f.write(e.to_json() + "\n")
    os.replace(f"{path}.tmp", path)
    return path, len(rows)
