"""Read a token dataset's `manifest.json`: its shards, token counts and tokenizer.

Plain JSON on purpose (the schema module validates manifests at write time; here we only need the
fields training depends on, each checked with an error naming the file and field).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kiln.errors import DataError

SCHEMA_NAME = "megatron_indexed"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TokenManifest:
    path: str  # the manifest file
    prefixes: list[str]  # .bin/.idx path prefixes, absolute
    shard_tokens: list[int]
    vocab_size: int
    fingerprint: str
    eod_id: int | None


def manifest_file(path: str) -> str:
    return os.path.join(path, "manifest.json") if os.path.isdir(path) else path


def read_token_manifest(path: str) -> TokenManifest:
    """Parse and check a pretraining manifest; shard paths are relative to its directory."""
    path = manifest_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise DataError("manifest not found", path=path) from None
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc}", path=path) from None
    schema = doc.get("schema") or {}
    if schema.get("name") != SCHEMA_NAME:
        raise DataError(f"schema is {schema.get('name')!r}, the trainer's pretraining data needs "
                        f"{SCHEMA_NAME!r} (run `kiln tokenize`)", path=path, field="schema.name")
    if schema.get("version") != SCHEMA_VERSION:
        raise DataError(f"schema version {schema.get('version')!r}, this trainer reads version "
                        f"{SCHEMA_VERSION}; re-run `kiln tokenize`", path=path, field="schema.version")
    tokenizer = doc.get("tokenizer") or {}
    vocab_size = tokenizer.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError("missing or invalid vocab_size", path=path, field="tokenizer.vocab_size")
    shards = doc.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataError("no shards listed", path=path, field="shards")
    root = os.path.dirname(os.path.abspath(path))
    prefixes, shard_tokens = [], []
    for i, shard in enumerate(shards):
        rel = shard.get("path") if isinstance(shard, dict) else None
        if not isinstance(rel, str):
            raise DataError("shard has no path", path=path, row=i, field="shards.path")
        prefix = os.path.join(root, rel.removesuffix(".bin").removesuffix(".idx"))
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise DataError(f"shard file {prefix + ext} does not exist", path=path, row=i,
                                field="shards.path")
        prefixes.append(prefix)
        shard_tokens.append(int(shard.get("tokens") or 0))
    eod = tokenizer.get("eod_id", tokenizer.get("eos_id"))
    return TokenManifest(path=path, prefixes=prefixes, shard_tokens=shard_tokens,
                         vocab_size=vocab_size,
                         fingerprint=str(tokenizer.get("fingerprint", "")),
                         eod_id=eod if isinstance(eod, int) else None)
