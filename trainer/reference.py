"""Reference-policy log-probs for DPO and KTO: precomputed once and stored, or computed online by
a frozen copy of the starting model.

The reference policy is the model the run starts from: the `init.checkpoint` weights, or the
seeded initialisation when there is none. A `Reference` gives, on the last pipeline stage, the
summed log-probs under it of the two sequences of a dataset row (chosen and rejected, or
completion and KL-partner completion), looked up by row index. `<stage>.reference` picks one of:

- `precomputed` (`StoredReference`): before the first optimizer step the policy *is* the
  reference, so one forward-only pass of it over the rows the stage trains and validates on gives
  every value; training then needs no second model and no second forward. The values are stored
  in `<run_dir>/reference_logps.arrow` (or `<stage>.reference_path`), one row per dataset row
  keyed by its `id`, with the identity of the reference (init checkpoint, seed, model config,
  dataset shards, rows used) in the schema metadata. A resumed run reuses the file when the
  identity matches and refuses to continue when it does not (its policy has moved).
- `online` (`OnlineReference`): a frozen copy of the starting model (a second set of chunks at
  this rank's TP/PP/VPP place; no gradients, not in the optimizer, not checkpointed) scores the
  micro-batches of each step just before it, and the validation rows once. Nothing is stored, so
  a resumed run simply recomputes. It costs the reference's weights and one more forward per
  step, and saves the pass over the whole dataset and the file.

Both run through megatron's pipeline schedule (`trainer.forward.forward_only`), so any TP/PP/VPP/DP
layout computes them; the parallel layout is not part of a reference's identity.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from megatron.core.models.gpt import GPTModel

from kiln.config import to_dict
from kiln.errors import DataError
from kiln.log import get_logger
from kiln.paths import atomic_write
from tensor_parallel import runtime
from trainer.checkpoint import load_weights, resolve
from trainer.forward import forward_only
from trainer.generate import frozen
from trainer.model import build_gpt_chunks
from trainer.stages import Batch

log = get_logger(__name__)

META = b"kiln.reference"
FILE = "reference_logps.arrow"
Model = list[torch.nn.Module]


@dataclass
class RowScorer:
    """How a stage turns dataset rows into per-sequence log-probs: its collation, forward and
    sequence log-probs (`[2b]`: first sequences, then second sequences)."""

    batch: Callable[[np.ndarray], Batch]
    forward: Callable[[torch.nn.Module, Batch], torch.Tensor]
    sequence_logps: Callable[[torch.Tensor, Batch], torch.Tensor]
    micro_batch_size: int  # samples per micro-batch (two sequences each)
    seq_length: int

    def __call__(self, model: Model, micro_batches: list[np.ndarray]
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(dataset rows `[b]`, log-probs `[b, 2]`) of each micro-batch on the last pipeline
        stage, [] elsewhere. Collective over the pipeline: its stages pass the same rows."""
        batches = [self.batch(rows) for rows in micro_batches]

        def collect(output: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            logps = self.sequence_logps(output, batch).detach().double()
            return batch["index"], logps.view(2, -1).T

        return forward_only(model, lambda: iter(batches), len(batches), self.forward, collect,
                            seq_length=self.seq_length, micro_batch_size=self.micro_batch_size * 2)


def score_rows(scorer: RowScorer, model: Model, rows: np.ndarray,
               num_rows: int) -> torch.Tensor | None:
    """`[num_rows, 2]` float64 values of dataset `rows` (NaN for the others), each row computed
    by one DP rank and summed over DP; on the last pipeline stage, None elsewhere. Collective."""
    dp, rank, mb = runtime.dp_size(), runtime.dp_rank(), scorer.micro_batch_size
    mine = rows[rank::dp]
    num_micro = max(1, math.ceil(math.ceil(len(rows) / dp) / mb))
    pp = runtime.layout().pp
    num_micro = math.ceil(num_micro / pp) * pp  # interleaved schedules want a multiple of PP
    # every DP rank runs the same number of micro-batches: pad with repeats of its own rows
    padded = np.resize(mine if len(mine) else rows[:1], num_micro * mb)
    reports = scorer(model, [padded[i:i + mb] for i in range(0, len(padded), mb)])
    if not runtime.is_last_stage():
        return None
    values = torch.zeros(num_rows, 2, dtype=torch.float64, device=runtime.device())
    for index, logps in reports:
        values[index] = logps
    owned = torch.zeros(num_rows, dtype=torch.bool, device=values.device)
    owned[torch.from_numpy(mine).to(values.device)] = True
    values[~owned] = 0.0  # a rank with no rows of its own scored a borrowed one: count rows once
    runtime.dp_all_reduce(values, with_context_parallel=False)  # CP ranks hold the same values
    unused = torch.ones(num_rows, dtype=torch.bool)
    unused[torch.from_numpy(rows)] = False
    values = values.cpu()
    values[unused] = float("nan")
    return values


class Reference(ABC):
    """Per-row reference log-probs `[2]` on the last pipeline stage, NaN where not computed.

    Per step the stage calls `before_step` (every rank, outside the training schedule), then
    `lookup` for each micro-batch it trains or validates on.
    """

    path: str | None = None  # where the values are stored, if anywhere (named in errors)
    uncomputed = "outside the train/valid split they were made for"  # why a row can lack values

    def __init__(self, scorer: RowScorer, num_rows: int) -> None:
        self.scorer, self.num_rows = scorer, num_rows
        self.values: torch.Tensor | None = None  # [num_rows, 2] float64 on the CPU

    @abstractmethod
    def before_step(self, step: int, policy: Model,
                    step_rows: Callable[[], list[np.ndarray]]) -> None:
        """Have the values of the step's micro-batches (`step_rows()`, this DP rank's rows of
        each) ready before the step trains on `policy`. Collective: every rank calls it."""

    def before_evaluate(self, step: int, policy: Model) -> None:  # noqa: B027 (optional hook)
        """Have the validation rows' values ready for a run that evaluates without training
        (`train.steps` reached, or 0). Collective. The online reference scored them at set-up."""

    def missing(self) -> str:
        """Why there are no values at all (the lookup's error)."""
        return "no reference log-probs on this rank"

    def lookup(self, index: torch.Tensor) -> torch.Tensor:
        """`[b, 2]` for the dataset rows `index` (last pipeline stage)."""
        table = self.values
        if table is None:
            raise DataError(self.missing(), path=self.path)
        values = table[index.cpu()].to(index.device)
        if torch.isnan(values).any():
            raise DataError(f"a batch holds rows whose reference log-probs were not computed "
                            f"({self.uncomputed})", path=self.path)
        return values


@contextlib.contextmanager
def _rng_untouched() -> Iterator[None]:
    """Building a model draws from the RNGs: keep the run's streams (dropout) as they were."""
    state = runtime.rng_state()
    try:
        yield
    finally:
        runtime.set_rng_state(state)


def frozen_reference(cfg: Any, policy: Model, vocab_size: int, *,
                     model_class: type[GPTModel] = GPTModel, new: tuple[str, ...] = ()) -> Model:
    """The starting policy, frozen (see `trainer.generate.frozen`), as this rank's chunks of the
    run's layout: `init.checkpoint`'s weights (`new`: names it may lack), else a copy of the
    `policy` chunks, which before the loop restores anything hold the seeded initialisation."""
    with _rng_untouched():
        chunks = build_gpt_chunks(cfg, vocab_size, model_class=model_class)
    if cfg.init.checkpoint:
        load_weights(chunks, resolve(cfg.init.checkpoint), new=new)
    else:
        for ref, start in zip(chunks, policy, strict=True):
            ref.load_state_dict(start.state_dict())
    return [frozen(c) for c in chunks]


class OnlineReference(Reference):
    """A frozen reference model scores each step's micro-batches just before the step."""

    uncomputed = "neither validation rows nor rows of this step's micro-batches"

    def __init__(self, scorer: RowScorer, num_rows: int, model: Model) -> None:
        super().__init__(scorer, num_rows)
        self.model = model
        if runtime.is_last_stage():
            self.values = torch.full((num_rows, 2), float("nan"), dtype=torch.float64)

    def score(self, rows: np.ndarray) -> None:
        """Values of `rows` (e.g. the validation split: the reference is frozen, so once is
        enough), split over DP ranks. Collective."""
        if len(rows) == 0:
            return
        values = score_rows(self.scorer, self.model, rows, self.num_rows)
        if values is not None:
            self.values[rows] = values[rows]

    def before_step(self, step: int, policy: Model,
                    step_rows: Callable[[], list[np.ndarray]]) -> None:
        for index, logps in self.scorer(self.model, step_rows()):
            self.values[index.cpu()] = logps.cpu()

    def missing(self) -> str:
        return "no reference log-probs: the online reference runs on the last pipeline stage"


def reference_identity(cfg: Any, manifest_shards: list, rows: np.ndarray | None = None,
                       partners: np.ndarray | None = None) -> dict[str, Any]:
    """What stored log-probs depend on (not the parallel layout: any layout gives them),
    including which dataset rows were computed when not all of them, and the KL partner of each
    row when the second sequence is another row's completion (KTO)."""
    def digest(a: np.ndarray) -> str:
        return hashlib.sha256(np.asarray(a, dtype=np.int64).tobytes()).hexdigest()

    init = cfg.init.checkpoint
    if init is not None:
        init = os.path.abspath(resolve(init))
    identity = {"init_checkpoint": init, "seed": None if init else cfg.train.seed,
                "model": to_dict(cfg.model), "stage": cfg.stage,
                # where sequences are cut: a shorter length scores fewer response tokens
                "seq_length": cfg.train.seq_length,
                "data": hashlib.sha256("".join(s.sha256 for s in manifest_shards).encode()
                                       ).hexdigest(),
                "rows": None if rows is None else digest(rows)}
    if partners is not None:
        identity["kl_partners"] = digest(partners)
    return identity


class StoredReference(Reference):
    """The policy scores every used row before step 0; the values live in an Arrow file."""

    def __init__(self, scorer: RowScorer, path: str, identity: dict[str, Any], ids: list[str],
                 columns: tuple[str, str], rows: np.ndarray | None = None) -> None:
        super().__init__(scorer, len(ids))
        self.path, self.identity, self.ids, self.columns = path, identity, ids, columns
        # the dataset rows the stage uses (train and validation); the others stay NaN
        self.rows = np.arange(len(ids)) if rows is None else np.asarray(rows, dtype=np.int64)

    def missing(self) -> str:
        return (f"no reference log-probs: they are computed before the first training step, or "
                f"read from {self.path} when a run resumes")

    def before_step(self, step: int, policy: Model,
                    step_rows: Callable[[], list[np.ndarray]]) -> None:
        """Load the stored log-probs, or compute them with `policy` while it is still the
        reference (step 0)."""
        if self.values is not None:
            return
        stored = self._read()
        if stored is not None:
            self.values = stored
            return
        if step > 0:
            raise DataError(f"resuming at step {step} without the reference log-probs of this run "
                            f"(missing, or made for another model/data): restore {FILE}, start "
                            "a new run_dir, or set reference=online", path=self.path)
        for chunk in policy:
            chunk.eval()
        values = score_rows(self.scorer, policy, self.rows, self.num_rows)
        for chunk in policy:
            chunk.train()
        if values is not None:
            log.info("reference log-probs of %d of %d rows computed", len(self.rows),
                     self.num_rows)
            self.values = values
            if runtime.is_logging_rank():
                self._write(values)

    def before_evaluate(self, step: int, policy: Model) -> None:
        # at step 0 (`train.steps=0` on a new run) the policy is still the reference
        self.before_step(step, policy, list)

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
        changed = sorted(k for k in {*stored, *self.identity}
                         if stored.get(k) != self.identity.get(k))
        if table.column("id").to_pylist() != self.ids:
            changed.append("row ids")
        if changed:
            log.warning("%s was made for another reference model or dataset (%s differ): not "
                        "used", self.path, ", ".join(changed))
            return None
        return torch.from_numpy(np.stack([table.column(c).to_numpy() for c in self.columns], 1))
