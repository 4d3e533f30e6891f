"""Reference-policy log-probs for DPO and KTO, precomputed once and stored beside the run.

The reference policy is the model the run starts from: the `init.checkpoint` weights, or the
seeded initialisation when there is none. Before the first optimizer step the policy *is* that
model, so one forward-only pass of it through the normal pipeline schedule (any TP/PP/DP layout)
gives, for every dataset row, the summed log-probs of its two sequences (chosen and rejected, or
completion and KL-partner completion). Training then needs no second model and no second forward.

Storage: `<run_dir>/reference_logps.arrow` (or `<stage>.reference_path`), one row per dataset row
keyed by the row's `id`, with the identity of the reference (init checkpoint, seed, model config,
dataset shards) in the schema metadata. A resumed run reuses the file when the identity matches
and refuses to continue when it does not (it can no longer recompute: its policy has moved).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from kiln.config import to_dict
from kiln.errors import DataError
from kiln.log import get_logger
from kiln.paths import atomic_write
from tensor_parallel import runtime
from trainer.stages import Batch

log = get_logger(__name__)

META = b"kiln.reference"
FILE = "reference_logps.arrow"


def reference_identity(cfg: Any, manifest_shards: list,
                       rows: np.ndarray | None = None) -> dict[str, Any]:
    """What the stored log-probs depend on (not the parallel layout: any layout gives them),
    including which dataset rows were computed when not all of them."""
    init = cfg.init.checkpoint
    if init is not None:
        from trainer.checkpoint import resolve

        init = os.path.abspath(resolve(init))
    return {"init_checkpoint": init, "seed": None if init else cfg.train.seed,
            "model": to_dict(cfg.model), "stage": cfg.stage,
            "data": hashlib.sha256("".join(s.sha256 for s in manifest_shards).encode()).hexdigest(),
            "rows": None if rows is None else hashlib.sha256(
                np.asarray(rows, dtype=np.int64).tobytes()).hexdigest()}


class ReferenceLogps:
    """Per-row reference log-probs `[rows, 2]` on the last pipeline stage (None elsewhere)."""

    def __init__(self, path: str, identity: dict[str, Any], ids: list[str],
                 columns: tuple[str, str], rows: np.ndarray | None = None) -> None:
        self.path, self.identity, self.ids, self.columns = path, identity, ids, columns
        # the dataset rows the stage uses (train and validation); the others stay NaN
        self.rows = np.arange(len(ids)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.values: torch.Tensor | None = None

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """`[b, 2]` for the dataset rows `index` (last pipeline stage)."""
        if self.values is None:  # evaluation of a finished run: no step, so no `ensure`
            self.values = self._read()
        if self.values is None:
            raise DataError(f"no reference log-probs: they are computed before the first training "
                            f"step, or read from {self.path} when a run resumes", path=self.path)
        values = self.values.to(index.device)[index]
        if torch.isnan(values).any():
            raise DataError("a batch holds rows whose reference log-probs were not computed "
                            "(outside the train/valid split they were made for)", path=self.path)
        return values

    def ensure(self, step: int, model: list[torch.nn.Module],
               batch: Callable[[np.ndarray], Batch],
               forward: Callable[[torch.nn.Module, Batch], torch.Tensor],
               sequence_logps: Callable[[torch.Tensor, Batch], torch.Tensor],
               micro_batch_size: int, seq_length: int) -> None:
        """Load the stored log-probs, or compute them with `model` when it is still the reference
        (step 0). Collective: every rank calls it."""
        if self.values is not None:
            return
        stored = self._read()
        if stored is not None:
            self.values = stored
            return
        if step > 0:
            raise DataError(f"resuming at step {step} without the reference log-probs of this run "
                            f"(missing, or made for another model/data): restore {FILE} or start "
                            "a new run_dir", path=self.path)
        values = self._compute(model, batch, forward, sequence_logps, micro_batch_size, seq_length)
        if runtime.is_last_stage():
            self.values = values
            if runtime.is_logging_rank():
                self._write(values)

    def _compute(self, model, batch, forward, sequence_logps, micro_batch_size: int,
                 seq_length: int) -> torch.Tensor | None:
        n, dp, rank = len(self.ids), runtime.dp_size(), runtime.dp_rank()
        mine = self.rows[rank::dp]
        num_micro = max(1, math.ceil(math.ceil(len(self.rows) / dp) / micro_batch_size))
        pp = runtime.layout().pp
        num_micro = math.ceil(num_micro / pp) * pp  # interleaved schedules want a multiple of PP
        # every DP rank runs the same number of micro-batches: pad with repeats of its own rows
        padded = np.resize(mine if len(mine) else np.zeros(1, np.int64), num_micro * micro_batch_size)
        chunks = [padded[i:i + micro_batch_size] for i in range(0, len(padded), micro_batch_size)]

        def forward_step(data_iterator: Iterator[Batch], chunk: torch.nn.Module):
            b = next(data_iterator)
            return forward(chunk, b), partial(_report, b)

        def _report(b: Batch, output: torch.Tensor):
            logps = sequence_logps(output, b).detach().double()
            return output.sum() * 0.0, torch.ones((), dtype=torch.int), {"index": b["index"],
                                                                       "logps": logps}

        batches = [batch(c) for c in chunks]
        iterators = [iter(batches) for _ in model]
        for chunk in model:
            chunk.eval()
        with torch.no_grad():
            reports = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iterators if len(model) > 1 else iterators[0], model=model,
                num_microbatches=len(batches), seq_length=seq_length,
                micro_batch_size=micro_batch_size * 2, forward_only=True)
        for chunk in model:
            chunk.train()
        if not runtime.is_last_stage():
            return None
        values = torch.zeros(n, 2, dtype=torch.float64, device=runtime.device())
        for r in reports:
            index, logps = r["index"], r["logps"].view(2, -1).T  # [b, 2]: first half, second half
            values[index] = logps
        runtime.dp_all_reduce(values)  # each row was computed by exactly one DP rank
        unused = np.setdiff1d(np.arange(n), self.rows)
        values[torch.from_numpy(unused).to(values.device)] = float("nan")
        log.info("reference log-probs of %d of %d rows computed", len(self.rows), n)
        return values.cpu()

    def _write(self, values: torch.Tensor) -> None:
        table = pa.table({"id": pa.array(self.ids, pa.string()),
                          self.columns[0]: pa.array(values[:, 0].numpy()),
                          self.columns[1]: pa.array(values[:, 1].numpy())})
        table = table.replace_schema_metadata({META: json.dumps(self.identity, sort_keys=True)})
        with atomic_write(self.path, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        log.info("reference log-probs written to %s", self.path)

    def _read(self) -> torch.Tensor | None:
        """The stored values when the file exists and matches this reference and dataset."""
        if not os.path.exists(self.path):
            return None
        with pa.memory_map(self.path) as source:
            table = pa.ipc.open_file(source).read_all()
        stored = json.loads((table.schema.metadata or {}).get(META, b"{}"))
        if stored != self.identity or table.column("id").to_pylist() != self.ids:
            log.warning("%s was made for another reference model or dataset: recomputing",
                        self.path)
            return None
        return torch.from_numpy(np.stack([table.column(c).to_numpy() for c in self.columns], 1))
