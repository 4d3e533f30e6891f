"""The document records the dedup transforms read and write: validation, survivor order, outputs.

A document is a dict with `id` (non-empty str, unique in the input), `text` (str) and optionally
`quality` (a finite number, higher is better). Of a group of duplicates the survivor is the one
with the highest `quality`; a document without `quality` ranks below every document with one;
ties go to the smallest `id` (plain string order). Any other keys travel through unchanged.
"""

from __future__ import annotations

import math
from typing import Any

EXACT_STAGE = "exact_dedup"
MINHASH_STAGE = "minhash_dedup"
DECONTAM_STAGE = "decontamination"

Rank = tuple[float, str]


def invalid_reason(doc: Any) -> str | None:
    """Why `doc` cannot be deduplicated (missing/ill-typed field), or None if it can."""
    if not isinstance(doc, dict):
        return f"record is {type(doc).__name__}, not a JSON object"
    doc_id = doc.get("id")
    if not isinstance(doc_id, str) or not doc_id:
        return "field 'id' must be a non-empty string"
    if not isinstance(doc.get("text"), str):
        return "field 'text' must be a string"
    quality = doc.get("quality")
    if quality is not None and (isinstance(quality, bool) or not isinstance(quality, (int, float))
                                or not math.isfinite(quality)):
        return f"field 'quality' must be a finite number, got {quality!r}"
    return None


def survivor_rank(doc: dict[str, Any]) -> Rank:
    """Sort key whose minimum is the survivor: (-quality, id), missing quality as +inf."""
    quality = doc.get("quality")
    return (math.inf if quality is None else -float(quality), doc["id"])


def duplicate_record(doc_id: str, duplicate_of: str, stage: str, similarity: float) -> dict:
    """One line of the `duplicates/` output."""
    return {"id": doc_id, "duplicate_of": duplicate_of, "stage": stage,
            "similarity": float(similarity)}


def error_record(doc: Any, stage: str, reason: str) -> dict:
    """One dead-letter entry for a record a dedup stage cannot read."""
    doc_id = doc.get("id") if isinstance(doc, dict) else None
    return {"id": doc_id if isinstance(doc_id, str) else None, "stage": stage, "reason": reason,
            "record": doc}
