"""Read a pretraining dataset's `manifest.json` (the `schemas.manifest` format) and check the
fields training depends on: contract name and version, tokenizer vocabulary, shard files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from kiln.errors import DataError
from schemas.contracts import contract
from schemas.indexed import IndexFormatError, check_pair
from schemas.manifest import MANIFEST, read_manifest

SCHEMA_NAME = "megatron_indexed"
SCHEMA_VERSION = contract(SCHEMA_NAME).version


@dataclass(frozen=True)
class TokenManifest:
    path: str  # the manifest file
    prefixes: list[str]  # .bin/.idx path prefixes, absolute
    shard_tokens: list[int]
    shard_documents: list[int]
    vocab_size: int
    fingerprint: str
    eod_id: int | None


def manifest_file(path: str) -> str:
    return os.path.join(path, MANIFEST) if os.path.isdir(path) else path


def read_token_manifest(path: str) -> TokenManifest:
    """Parse and check a pretraining manifest; shard paths are relative to its directory. Each
    shard's `.idx` is read and checked against its `.bin` size and the manifest's row count (not
    the token ids: `kiln validate` scans those), so a truncated or foreign file is an error
    naming it here, not a megatron traceback in the middle of training."""
    path = manifest_file(path)
    try:
        doc = read_manifest(path)
    except FileNotFoundError:
        raise DataError("manifest not found", path=path) from None
    except (json.JSONDecodeError, ValueError) as exc:
        raise DataError(f"not a valid manifest: {exc}", path=path) from None
    if doc.schema.get("name") != SCHEMA_NAME:
        raise DataError(f"schema is {doc.schema.get('name')!r}, the trainer's pretraining data "
                        f"needs {SCHEMA_NAME!r} (run `kiln tokenize`)", path=path,
                        field="schema.name")
    if doc.schema.get("version") != SCHEMA_VERSION:
        raise DataError(f"schema version {doc.schema.get('version')!r}, this trainer reads "
                        f"version {SCHEMA_VERSION}; re-run `kiln tokenize`", path=path,
                        field="schema.version")
    tokenizer = doc.tokenizer or {}
    vocab_size = tokenizer.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise DataError("missing or invalid vocab_size", path=path, field="tokenizer.vocab_size")
    if not doc.shards:
        raise DataError("no shards listed", path=path, field="shards")
    root = os.path.dirname(os.path.abspath(path))
    prefixes, documents = [], []
    for i, shard in enumerate(doc.shards):
        prefix = os.path.join(root, shard.path.removesuffix(".bin").removesuffix(".idx"))
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise DataError(f"shard file {prefix + ext} does not exist", path=path, row=i,
                                field="shards.path")
        try:
            n = len(check_pair(prefix).lengths)
        except IndexFormatError as exc:
            raise DataError(f"shard {prefix}.idx/.bin is damaged: {exc}", path=path, row=i,
                            field="shards.path") from None
        if n != shard.rows:
            raise DataError(f"shard {prefix}.idx holds {n} documents, the manifest says "
                            f"{shard.rows}", path=path, row=i, field="shards.rows")
        if n == 0:
            raise DataError(f"shard {prefix} holds no documents (megatron cannot map an empty "
                            "file): remove it from the manifest", path=path, row=i,
                            field="shards.rows")
        prefixes.append(prefix)
        documents.append(n)
    eod = tokenizer.get("eod_id", tokenizer.get("eos_id"))
    return TokenManifest(path=path, prefixes=prefixes,
                         shard_tokens=[s.tokens for s in doc.shards], shard_documents=documents,
                         vocab_size=vocab_size,
                         fingerprint=str(tokenizer.get("fingerprint", "")),
                         eod_id=eod if isinstance(eod, int) else None)
