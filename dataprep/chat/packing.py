"""Packing SFT conversations into fixed-capacity rows (best-fit decreasing, deterministic), and the
helpers a trainer uses to keep attention and positions inside each packed conversation."""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: items taken longest first (ties by index), each into the bin with the
    least room that still fits it, else a new bin. Bins keep their items in placement order."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free space, bin index)
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"item {i} has {n} tokens, more than the capacity {capacity}")
        pos = bisect.bisect_left(room, (n, -1))
        if pos < len(room):
            free, b = room.pop(pos)
            bins[b].append(i)
            if free - n:
                bisect.insort(room, (free - n, b))
        else:
            bins.append([i])
            if capacity - n:
                bisect.insort(room, (capacity - n, len(bins) - 1))
    return bins


def pack_rows(rows: Sequence[Mapping[str, Any]], max_seq_len: int) -> list[dict[str, Any]]:
    """`sft` rows -> `sft_packed` rows (no padding: each row holds at most `max_seq_len` tokens).
    Input order does not matter: rows are sorted by id first, so packing is deterministic."""
    rows = sorted(rows, key=lambda r: r["id"])
    bins = best_fit_decreasing([len(r["input_ids"]) for r in rows], max_seq_len)
    packed = []
    for members in bins:
        ids: list[int] = []
        mask: list[int] = []
        bounds = [0]
        for i in members:
            ids += rows[i]["input_ids"]
            mask += rows[i]["loss_mask"]
            bounds.append(len(ids))
        packed.append({"input_ids": ids, "loss_mask": mask, "seq_boundaries": bounds,
                       "ids": [rows[i]["id"] for i in members],
                       "sources": [rows[i]["source"] for i in members]})
    return sorted(packed, key=lambda r: r["ids"][0])


def packing_efficiency(rows: Sequence[Mapping[str, Any]], max_seq_len: int) -> float:
    """Tokens / (rows x max_seq_len)."""
    if not rows:
        return 0.0
    return sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_seq_len)


def unpack(row: Mapping[str, Any]) -> list[tuple[list[int], list[int], str]]:
    """(input_ids, loss_mask, id) of every conversation in a packed row, in packed order."""
    b = row["seq_boundaries"]
    ids, mask = list(row["input_ids"]), list(row["loss_mask"])
    return [(ids[b[k]:b[k + 1]], mask[b[k]:b[k + 1]], row["ids"][k]) for k in range(len(b) - 1)]


def packed_attention_mask(boundaries: Sequence[int], seq_len: int) -> np.ndarray:
    """(seq_len, seq_len) bool, True where query i may attend to key j: causal and inside the same
    packed conversation. Positions past the last boundary (padding) attend to nothing."""
    seg = segment_ids(boundaries, seq_len)
    causal = np.tril(np.ones((seq_len, seq_len), dtype=bool))
    same = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0)
    return causal & same


def packed_position_ids(boundaries: Sequence[int], seq_len: int) -> np.ndarray:
    """Position ids restarting at 0 at each conversation; padding positions get 0."""
    pos = np.zeros(seq_len, dtype=np.int64)
    for start, end in zip(boundaries[:-1], boundaries[1:], strict=False):
        pos[start:min(end, seq_len)] = np.arange(min(end, seq_len) - start)
    return pos


def segment_ids(boundaries: Sequence[int], seq_len: int) -> np.ndarray:
    """Index of the packed conversation at each position (-1 for padding)."""
    seg = np.full(seq_len, -1, dtype=np.int64)
    for k, (start, end) in enumerate(zip(boundaries[:-1], boundaries[1:], strict=False)):
        seg[start:min(end, seq_len)] = k
    return seg
