"""Megatron `torch_dist` checkpoints without a process group: a streaming writer and a slice reader.

A megatron distributed checkpoint is a PyTorch DCP checkpoint (`.metadata` + `*.distcp` data
files, each stored chunk a `torch.save` blob at an offset) plus `metadata.json` (the backend) and
`common.pt` (non-sharded values). Chunks are addressed by global key and offset, so what is
written here by one process loads under any TP/PP layout, and what any layout saved can be read
here slice by slice.

`torch.distributed.checkpoint.save` keeps every tensor of a data file alive until the file is
complete; the writer below writes each tensor as soon as it is given, so a converter holds one
tensor at a time.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import uuid
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    BytesStorageMetadata,
    DefaultLoadPlanner,
    FileSystemReader,
    LoadPlan,
    Metadata,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

# What megatron's `dist_checkpointing.save` writes to `metadata.json` for its default backends.
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}
DATA_FILE = "__0_0.distcp"
COMMON_FILE = "common.pt"


class CheckpointWriter:
    """Writes one megatron checkpoint, tensor by tensor; `close()` writes the metadata last."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._stream = open(os.path.join(directory, DATA_FILE), "wb")  # noqa: SIM115
        self._tensors: dict[str, TensorStorageMetadata] = {}
        self._objects: dict[str, BytesStorageMetadata] = {}
        self._storage: dict[MetadataIndex, Any] = {}

    def _append(self, index: MetadataIndex, write: Any) -> None:
        offset = self._stream.tell()
        write(self._stream)
        self._storage[index] = dcp_fs._StorageInfo(DATA_FILE, offset, self._stream.tell() - offset)

    def add_tensor(self, key: str, global_shape: Sequence[int], offsets: Sequence[int],
                   tensor: torch.Tensor) -> None:
        """One chunk of global tensor `key` at `offsets` (`tensor` has the chunk's full rank)."""
        if tensor.untyped_storage().nbytes() != tensor.nbytes or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)  # torch.save writes storage
        meta = self._tensors.get(key)
        if meta is None:
            meta = self._tensors[key] = TensorStorageMetadata(
                properties=TensorProperties(dtype=tensor.dtype), size=torch.Size(global_shape),
                chunks=[])
        elif meta.properties.dtype != tensor.dtype or tuple(meta.size) != tuple(global_shape):
            raise ValueError(f"{key}: chunks disagree on dtype or global shape")
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=tensor.shape)
        meta.chunks.append(chunk)
        self._append(MetadataIndex(key, chunk.offsets), lambda f: torch.save(tensor, f))

    def add_object(self, unique_key: str, value: Any) -> None:
        """A megatron `ShardedObject` (stored as `torch.save([value])`, as megatron does)."""
        self._objects[unique_key] = BytesStorageMetadata()
        blob = io.BytesIO()
        torch.save([value], blob)
        self._append(MetadataIndex(unique_key), lambda f: f.write(blob.getbuffer()))

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()  # after an error: the caller discards the directory

    def close(self, common: dict[str, Any]) -> None:
        """Finish the data file, then write `.metadata`, `common.pt` and `metadata.json`."""
        self._stream.close()
        metadata = Metadata(
            state_dict_metadata={**self._tensors, **self._objects}, storage_data=self._storage,
            storage_meta=StorageMeta(checkpoint_id=self.directory, save_id=uuid.uuid4().hex),
            version=getattr(dcp_fs, "CURRENT_DCP_VERSION", None))
        with open(os.path.join(self.directory, ".metadata"), "wb") as f:
            pickle.dump(metadata, f)
        torch.save(common, os.path.join(self.directory, COMMON_FILE))
        with open(os.path.join(self.directory, "metadata.json"), "w", encoding="utf-8") as f:
            json.dump(BACKEND, f)


class _SlicePlanner(DefaultLoadPlanner):
    """Reads a box of each requested global tensor into a tensor of the box's shape."""

    def __init__(self, boxes: dict[str, ChunkStorageMetadata]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.boxes = boxes

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, box in self.boxes.items():
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key],
                                                      [box])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]


class CheckpointReader:
    """Reads global tensors (or slices of them) from a checkpoint saved under any layout."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.metadata = FileSystemReader(directory).read_metadata()

    def shape(self, key: str) -> tuple[int, ...] | None:
        meta = self.metadata.state_dict_metadata.get(key)
        return tuple(meta.size) if isinstance(meta, TensorStorageMetadata) else None

    def dtype(self, key: str) -> torch.dtype:
        return self.metadata.state_dict_metadata[key].properties.dtype

    def read(self, boxes: dict[str, tuple[Sequence[int], Sequence[int]]],
             dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """{key: (offsets, sizes)} -> {key: that box of the global tensor}, in one pass."""
        chunks = {k: ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s))
                  for k, (o, s) in boxes.items()}
        out = {k: torch.empty(tuple(c.sizes), dtype=dtype or self.dtype(k))
               for k, c in chunks.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(out, storage_reader=FileSystemReader(self.directory),
                     planner=_SlicePlanner(chunks), no_dist=True)
        return out


def load_common(directory: str) -> dict[str, Any]:
    """The checkpoint's non-sharded values (the trainer stores its run config under `config`)."""
    return torch.load(os.path.join(directory, COMMON_FILE), map_location="cpu", weights_only=False)
