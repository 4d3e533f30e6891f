"""Versioned Arrow/Parquet schemas of every dataset kind; name, version and tokenizer fingerprint
travel in the schema metadata so a shard describes itself."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

META_NAME = b"kiln.schema"
META_VERSION = b"kiln.schema_version"
META_FINGERPRINT = b"kiln.tokenizer_fingerprint"

TOKENS = pa.list_(pa.int32())
MASK = pa.list_(pa.int8())


@dataclass(frozen=True)
class Contract:
    """One dataset kind: its name, version, on-disk format and columns."""

    name: str
    version: int
    format: str  # "arrow" (IPC file, zstd), "parquet" or "megatron_indexed"
    schema: pa.Schema | None
    description: str
    # list columns whose lengths must agree row by row, e.g. tokens and loss mask
    aligned: tuple[tuple[str, ...], ...] = ()
    # token-id columns checked against the vocabulary size
    token_columns: tuple[str, ...] = ()
    # list columns that must not be empty
    non_empty: tuple[str, ...] = ()


def _schema(*fields: pa.Field) -> pa.Schema:
    return pa.schema(list(fields))


_ID = pa.field("id", pa.string(), nullable=False)
_SOURCE = pa.field("source", pa.string(), nullable=False)

CONTRACTS: dict[str, Contract] = {
    c.name: c
    for c in (
        Contract(
            "sft", 1, "arrow",
            _schema(_ID, _SOURCE,
                    pa.field("input_ids", TOKENS, nullable=False),
                    pa.field("loss_mask", MASK, nullable=False)),
            "one tokenized conversation per row; loss_mask[i]=1 where token i is trained on "
            "(assistant spans emitted by the chat template)",
            aligned=(("input_ids", "loss_mask"),), token_columns=("input_ids",),
            non_empty=("input_ids",),
        ),
        Contract(
            "sft_packed", 1, "arrow",
            _schema(pa.field("input_ids", TOKENS, nullable=False),
                    pa.field("loss_mask", MASK, nullable=False),
                    pa.field("seq_boundaries", pa.list_(pa.int32()), nullable=False),
                    pa.field("ids", pa.list_(pa.string()), nullable=False),
                    pa.field("sources", pa.list_(pa.string()), nullable=False)),
            "several conversations per row; seq_boundaries are cumulative offsets "
            "[0, len1, len1+len2, ...] (cu_seqlens); ids/sources name each packed conversation",
            aligned=(("input_ids", "loss_mask"),), token_columns=("input_ids",),
            non_empty=("input_ids",),
        ),
        Contract(
            "preference", 1, "arrow",
            _schema(_ID, _SOURCE,
                    pa.field("prompt_ids", TOKENS, nullable=False),
                    pa.field("chosen_ids", TOKENS, nullable=False),
                    pa.field("rejected_ids", TOKENS, nullable=False),
                    pa.field("chosen_score", pa.float32(), nullable=True),
                    pa.field("rejected_score", pa.float32(), nullable=True),
                    pa.field("margin", pa.float32(), nullable=True)),
            "prompt (chat template up to the assistant header) and the two completions "
            "(assistant content + end-of-turn + eos)",
            token_columns=("prompt_ids", "chosen_ids", "rejected_ids"),
            non_empty=("prompt_ids", "chosen_ids", "rejected_ids"),
        ),
        Contract(
            "unpaired", 1, "arrow",
            _schema(_ID, _SOURCE,
                    pa.field("prompt_ids", TOKENS, nullable=False),
                    pa.field("completion_ids", TOKENS, nullable=False),
                    pa.field("label", pa.bool_(), nullable=False)),
            "KTO: a completion marked desirable (true) or undesirable (false)",
            token_columns=("prompt_ids", "completion_ids"),
            non_empty=("prompt_ids", "completion_ids"),
        ),
        Contract(
            "prompts", 1, "arrow",
            _schema(_ID, _SOURCE,
                    pa.field("prompt_ids", TOKENS, nullable=False),
                    pa.field("reference", pa.string(), nullable=True)),
            "PPO/GRPO prompts ending at the assistant header, with an optional reference answer",
            token_columns=("prompt_ids",), non_empty=("prompt_ids",),
        ),
        Contract(
            "documents", 1, "parquet",
            _schema(_ID,
                    pa.field("url", pa.string(), nullable=True),
                    pa.field("date", pa.string(), nullable=True),
                    pa.field("text", pa.string(), nullable=False),
                    pa.field("language", pa.string(), nullable=True),
                    pa.field("language_score", pa.float32(), nullable=True),
                    pa.field("filters", pa.list_(pa.string()), nullable=False),
                    pa.field("source", pa.string(), nullable=False)),
            "cleaned web documents; `filters` names the filters each document passed",
        ),
        Contract(
            "megatron_indexed", 1, "megatron_indexed", None,
            "pretraining tokens: megatron's MMIDIDX .bin/.idx pair, one document per sequence, "
            "EOS appended",
        ),
    )
}


def contract(name: str) -> Contract:
    try:
        return CONTRACTS[name]
    except KeyError:
        raise KeyError(f"unknown contract '{name}' (known: {', '.join(CONTRACTS)})") from None


def arrow_schema(name: str, fingerprint: str | None = None) -> pa.Schema:
    """The contract's schema with name, version and tokenizer fingerprint in its metadata."""
    c = contract(name)
    if c.schema is None:
        raise ValueError(f"contract '{name}' is not a table format")
    meta = {META_NAME: name.encode(), META_VERSION: str(c.version).encode()}
    if fingerprint:
        meta[META_FINGERPRINT] = fingerprint.encode()
    return c.schema.with_metadata(meta)


def schema_identity(schema: pa.Schema) -> tuple[str | None, int | None, str | None]:
    """(name, version, fingerprint) read back from a shard's schema metadata."""
    meta = schema.metadata or {}
    name = meta.get(META_NAME)
    version = meta.get(META_VERSION)
    fp = meta.get(META_FINGERPRINT)
    try:
        v = int(version) if version is not None else None
    except ValueError:
        v = None
    return (name.decode(errors="replace") if name else None, v,
            fp.decode(errors="replace") if fp else None)
