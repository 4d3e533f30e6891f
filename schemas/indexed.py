"""Megatron's indexed dataset (`.bin` + `.idx`, "MMIDIDX" version 1), written byte for byte as
`megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` writes it, and read back.

`.idx` layout (little-endian): 9-byte magic `MMIDIDX\\0\\0`, u64 version (1), u8 dtype code,
u64 sequence count S, u64 document count D (= documents + 1), int32[S] sequence lengths,
int64[S] byte offsets into `.bin`, int64[D] document indices (sequence index where each document
starts, first 0). `.bin` is the concatenated token ids in the dtype.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64,
    7: np.float32, 8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8


def token_dtype(vocab_size: int) -> type[np.number]:
    """uint16 below 65,500 ids (as megatron's `DType.optimal_dtype`), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


class IndexFormatError(ValueError):
    """The `.idx`/`.bin` pair is not a valid MMIDIDX dataset; the message says where."""


class IndexedWriter:
    """Append documents (one sequence each) and finalize into `<prefix>.bin` + `<prefix>.idx`."""

    def __init__(self, prefix: str, dtype: type[np.number]) -> None:
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._bin = open(f"{prefix}.bin.tmp", "wb")
        self.lengths: list[int] = []
        self.tokens = 0

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self.lengths.append(int(arr.size))
        self.tokens += int(arr.size)

    def finalize(self) -> tuple[str, str]:
        """Write the index; both files appear under their final names only when complete."""
        self._bin.close()
        idx_tmp = f"{self.prefix}.idx.tmp"
        with open(idx_tmp, "wb") as f:
            f.write(index_bytes(self.lengths, self.dtype))
        os.replace(f"{self.prefix}.bin.tmp", f"{self.prefix}.bin")
        os.replace(idx_tmp, f"{self.prefix}.idx")
        return f"{self.prefix}.bin", f"{self.prefix}.idx"


def index_bytes(lengths: list[int] | np.ndarray, dtype: type[np.number] | np.dtype) -> bytes:
    """The `.idx` bytes for documents of the given lengths (one sequence per document)."""
    dtype = np.dtype(dtype)
    lengths = np.asarray(lengths, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths):
        pointers[1:] = np.cumsum(lengths[:-1] * dtype.itemsize)
    doc_idx = np.arange(len(lengths) + 1, dtype=np.int64)
    return b"".join([
        MAGIC, struct.pack("<Q", VERSION), struct.pack("<B", CODE_OF[dtype]),
        struct.pack("<Q", len(lengths)), struct.pack("<Q", len(doc_idx)),
        lengths.astype(np.int32).tobytes(), pointers.tobytes(), doc_idx.tobytes(),
    ])


@dataclass
class Index:
    dtype: np.dtype
    lengths: np.ndarray
    pointers: np.ndarray
    document_indices: np.ndarray


def read_index(idx_path: str) -> Index:
    """Parse and check an `.idx` file; raises IndexFormatError naming the field that is wrong."""
    with open(idx_path, "rb") as f:
        data = f.read()
    if len(data) < HEADER_BYTES:
        raise IndexFormatError(f"header: file is {len(data)} bytes, shorter than the "
                               f"{HEADER_BYTES}-byte header")
    if data[:9] != MAGIC:
        raise IndexFormatError(f"magic: expected {MAGIC!r}, found {data[:9]!r}")
    (version,) = struct.unpack_from("<Q", data, 9)
    if version != VERSION:
        raise IndexFormatError(f"version: expected {VERSION}, found {version}")
    code = data[17]
    if code not in DTYPE_CODES:
        raise IndexFormatError(f"dtype: unknown code {code}")
    seq_count, doc_count = struct.unpack_from("<QQ", data, 18)
    expected = HEADER_BYTES + seq_count * (4 + 8) + doc_count * 8
    if len(data) not in (expected, expected + seq_count):  # + int8 modes when multimodal
        raise IndexFormatError(f"size: {seq_count} sequences and {doc_count} document indices "
                               f"need {expected} bytes, file has {len(data)}")
    off = HEADER_BYTES
    lengths = np.frombuffer(data, np.int32, seq_count, off)
    off += 4 * seq_count
    pointers = np.frombuffer(data, np.int64, seq_count, off)
    off += 8 * seq_count
    doc_idx = np.frombuffer(data, np.int64, doc_count, off)
    return Index(np.dtype(DTYPE_CODES[code]), lengths, pointers, doc_idx)


def check_pair(prefix: str, vocab_size: int | None = None) -> Index:
    """Check `.idx` against `.bin` (pointers, lengths, size) and token ids against the vocabulary."""
    index = read_index(f"{prefix}.idx")
    n = len(index.lengths)
    if n and (index.lengths < 0).any():
        bad = int(np.argmax(index.lengths < 0))
        raise IndexFormatError(f"sequence {bad}: negative length {index.lengths[bad]}")
    expected_ptr = np.zeros(n, dtype=np.int64)
    if n:
        expected_ptr[1:] = np.cumsum(index.lengths[:-1].astype(np.int64) * index.dtype.itemsize)
    if not np.array_equal(expected_ptr, index.pointers):
        bad = int(np.argmax(expected_ptr != index.pointers))
        raise IndexFormatError(f"sequence {bad}: pointer {index.pointers[bad]} disagrees with the "
                               f"lengths before it (expected {expected_ptr[bad]})")
    d = index.document_indices
    if len(d) != n + 1 or not np.array_equal(d, np.arange(n + 1)):
        bad = int(np.argmax(d != np.arange(len(d)))) if len(d) == n + 1 else len(d)
        raise IndexFormatError(f"document_indices[{bad}]: llmkiln shards hold one sequence per "
                               f"document, so the indices must be 0..{n}")
    bin_size = os.path.getsize(f"{prefix}.bin")
    total = int(index.lengths.astype(np.int64).sum()) * index.dtype.itemsize
    if bin_size != total:
        raise IndexFormatError(f".bin size: {bin_size} bytes, the index describes {total}")
    if vocab_size is not None and total:
        tokens = np.memmap(f"{prefix}.bin", dtype=index.dtype, mode="r")
        bad_pos = np.flatnonzero((tokens >= vocab_size) | (tokens < 0))
        if bad_pos.size:
            pos = int(bad_pos[0])
            seq = int(np.searchsorted(index.pointers // index.dtype.itemsize, pos, side="right") - 1)
            raise IndexFormatError(f"token {pos} (sequence {seq}): id {int(tokens[pos])} is not "
                                   f"below the vocabulary size {vocab_size}")
    return index


class IndexedReader:
    """Random access to documents of an MMIDIDX pair through a memory map."""

    def __init__(self, prefix: str) -> None:
        self.index = read_index(f"{prefix}.idx")
        self._bin = np.memmap(f"{prefix}.bin", dtype=self.index.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.index.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = self.index.pointers[i] // self.index.dtype.itemsize
        return np.asarray(self._bin[start:start + self.index.lengths[i]])
