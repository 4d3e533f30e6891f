"""`manifest.json`: what a dataset directory holds (schema, shards with sizes and sha256, token
totals, tokenizer fingerprint) and the ledger that accounts for every input record, per stage.

Ledger arithmetic (checked, not hoped): for each stage
`input == kept + sum(filtered.values()) + duplicate + error`, and each stage's input is the
previous stage's kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class ShardEntry:
    path: str  # relative to the dataset directory
    rows: int
    bytes: int
    sha256: str
    tokens: int = 0
    source: str | None = None  # tag of the source this shard came from (mixtures)


@dataclass
class LedgerStage:
    name: str
    input: int = 0
    kept: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    duplicate: int = 0
    error: int = 0
    # A fan-out stage (one record -> several units, e.g. scored completions -> candidate pairs)
    # counts its own units as `input` and names the upstream records they came from here; the
    # chain check then compares this, not `input`, with the previous stage's kept.
    derived_from: int | None = None

    def balance_error(self) -> str | None:
        accounted = self.kept + sum(self.filtered.values()) + self.duplicate + self.error
        if accounted != self.input:
            return (f"stage '{self.name}': input {self.input} != kept {self.kept} + filtered "
                    f"{sum(self.filtered.values())} + duplicate {self.duplicate} + error "
                    f"{self.error} (= {accounted})")
        return None


@dataclass
class Ledger:
    stages: list[LedgerStage] = field(default_factory=list)

    def stage(self, name: str, input: int, kept: int, filtered: dict[str, int] | None = None,
              duplicate: int = 0, error: int = 0) -> LedgerStage:
        s = LedgerStage(name, input, kept, dict(filtered or {}), duplicate, error)
        self.stages.append(s)
        return s

    def check(self) -> list[str]:
        """Every arithmetic problem, one line each (empty when the ledger balances)."""
        problems = [p for s in self.stages if (p := s.balance_error())]
        for prev, cur in zip(self.stages, self.stages[1:], strict=False):
            if cur.derived_from is not None:
                if cur.derived_from != prev.kept:
                    problems.append(f"stage '{cur.name}': derived from {cur.derived_from} "
                                    f"records != previous stage '{prev.name}' kept {prev.kept}")
            elif cur.input != prev.kept:
                problems.append(f"stage '{cur.name}': input {cur.input} != previous stage "
                                f"'{prev.name}' kept {prev.kept}")
        return problems

    def to_json(self) -> dict[str, Any]:
        stages = []
        for s in self.stages:
            entry = asdict(s)
            if entry["derived_from"] is None:
                del entry["derived_from"]
            stages.append(entry)
        return {"stages": stages}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ledger:
        stages = []
        for i, s in enumerate(data.get("stages", [])):
            if not isinstance(s, dict) or "name" not in s:
                raise ValueError(f"ledger.stages[{i}]: expected an object with a name")
            filtered = s.get("filtered", {})
            if not isinstance(filtered, dict):
                raise ValueError(f"ledger.stages[{i}].filtered: expected an object")
            stages.append(LedgerStage(
                name=str(s["name"]), input=_int(s, "input", i), kept=_int(s, "kept", i),
                filtered={str(k): _int(filtered, k, i) for k in filtered},
                duplicate=_int(s, "duplicate", i), error=_int(s, "error", i),
                derived_from=_int(s, "derived_from", i) if "derived_from" in s else None))
        return cls(stages)


def _int(d: dict[str, Any], key: str, i: int) -> int:
    v = d.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ValueError(f"ledger.stages[{i}].{key}: expected a non-negative integer, got {v!r}")
    return v


@dataclass
class Manifest:
    schema: dict[str, Any]  # {"name": ..., "version": ...}
    shards: list[ShardEntry] = field(default_factory=list)
    tokenizer: dict[str, Any] | None = None  # {"fingerprint", "vocab_size", "path", ...}
    ledger: Ledger = field(default_factory=Ledger)
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-source totals/weights
    extra: dict[str, Any] = field(default_factory=dict)  # job-specific facts (config, stats)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest_version": MANIFEST_VERSION,
            "schema": self.schema,
            "shards": [asdict(s) for s in self.shards],
            "rows": self.rows,
            "tokens": self.tokens,
            "tokenizer": self.tokenizer,
            "sources": self.sources,
            "ledger": self.ledger.to_json(),
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise ValueError("top level: expected an object")
        schema = data.get("schema")
        if not isinstance(schema, dict) or "name" not in schema or "version" not in schema:
            raise ValueError("schema: expected {\"name\": ..., \"version\": ...}")
        shards = []
        for i, s in enumerate(data.get("shards", [])):
            try:
                shards.append(ShardEntry(**s))
            except TypeError as exc:
                raise ValueError(f"shards[{i}]: {exc}") from None
        ledger = data.get("ledger") or {"stages": []}
        if not isinstance(ledger, dict):
            raise ValueError("ledger: expected an object with 'stages'")
        return cls(schema=schema, shards=shards, tokenizer=data.get("tokenizer"),
                   ledger=Ledger.from_json(ledger), sources=data.get("sources") or {},
                   extra=data.get("extra") or {})


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Write `directory/manifest.json` atomically (after the shards: it marks the set complete)."""
    path = os.path.join(directory, MANIFEST)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory_or_file: str) -> Manifest:
    path = directory_or_file
    if os.path.isdir(path):
        path = os.path.join(path, MANIFEST)
    with open(path, encoding="utf-8") as f:
        return Manifest.from_json(json.load(f))
