"""The distributed runtime: process group from torchrun's environment, megatron's parallel state,
per-rank seeds, and the few collectives the stages need (they never call torch.distributed)."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mp

from kiln.log import get_logger
from tensor_parallel import cpu_backend
from tensor_parallel.layout import Layout, infer_layout

log = get_logger(__name__)

_layout: Layout | None = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(*, tp: int = 1, pp: int = 1, vpp: int | None = None, cp: int = 1, seed: int = 1234,
         timeout_minutes: int = 30) -> Layout:
    """Join the process group torchrun described (or make a one-rank group) and split it.

    NCCL with one GPU per local rank when CUDA is present; otherwise gloo and the CPU backend.
    Seeds: the default generator gets `seed` on every rank (data order, dropout outside TP
    regions); megatron's tracker gets `seed + 2718 + tp_rank` for TP regions.
    """
    global _layout
    if _layout is not None:
        raise RuntimeError("tensor_parallel.runtime.init called twice; call shutdown() first")
    if "RANK" not in os.environ:  # plain `python trainer/main.py`: a group of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    world_size = int(os.environ["WORLD_SIZE"])
    layout = infer_layout(world_size, tp, pp, vpp, cp)
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if (layout.tp > 1 or layout.cp > 1) and torch.cuda.get_device_capability(local_rank)[0] < 10:
            # one hardware queue, so that megatron's TP/CP collectives are scheduled before the
            # weight-gradient GEMMs they overlap with (Megatron-LM asks for it before Blackwell);
            # set before this process makes its CUDA context
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        cpu_backend.enable()
        backend = "gloo"
    if not dist.is_initialized():
        from datetime import timedelta
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=timeout_minutes))
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp, context_parallel_size=layout.cp,
        distributed_timeout_minutes=timeout_minutes)
    torch.manual_seed(seed)
    mp.model_parallel_cuda_manual_seed(seed)
    _layout = layout
    log.info("rank %d/%d: %s on %s (tp=%d pp=%d vpp=%s cp=%d dp=%d)", rank(), world_size, backend,
             device(), layout.tp, layout.pp, layout.vpp, layout.cp, layout.dp)
    return layout


def shutdown(*, keep_process_group: bool = False) -> None:
    """Barrier, then tear everything down (without the barrier gloo sometimes aborts at exit).

    `keep_process_group=True` only resets megatron's parallel state, so one process can run
    several layouts in a row (the layout tests do).
    """
    global _layout
    if dist.is_initialized():
        dist.barrier()
        ps.destroy_model_parallel()
        if not keep_process_group:
            dist.destroy_process_group()
    _layout = None


def abort() -> None:
    """After an error: leave without the barrier (the other ranks may never reach it)."""
    global _layout
    if dist.is_initialized():
        ps.destroy_model_parallel()
        dist.destroy_process_group()
    _layout = None


def layout() -> Layout:
    if _layout is None:
        raise RuntimeError("tensor_parallel.runtime.init has not been called")
    return _layout


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_logging_rank() -> bool:
    """The last rank: it sits on the last pipeline stage, where losses exist."""
    return rank() == world_size() - 1


def is_first_stage(vp_stage: int | None = None) -> bool:
    return ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def is_last_stage(vp_stage: int | None = None) -> bool:
    return ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)


def rng_state() -> dict:
    """This rank's random streams: the default CPU (and CUDA) generators and megatron's tracker
    (model-parallel, data-parallel... streams)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if on_gpu() else None,
            "tracker": mp.get_cuda_rng_tracker().get_states()}


def set_rng_state(state: dict) -> None:
    """Put back streams taken by `rng_state`."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    mp.get_cuda_rng_tracker().set_states(state["tracker"])


def tp_rank() -> int:
    return ps.get_tensor_model_parallel_rank()


def pp_rank() -> int:
    return ps.get_pipeline_model_parallel_rank()


def dp_rank() -> int:
    return ps.get_data_parallel_rank()


def cp_rank() -> int:
    return ps.get_context_parallel_rank()


def dp_size() -> int:
    return ps.get_data_parallel_world_size()


def dp_all_reduce(tensor: torch.Tensor, op: str = "sum", *,
                  with_context_parallel: bool = True) -> torch.Tensor:
    """All-reduce in place over the data-parallel group (with the context-parallel ranks, unless
    the value is already the same on them)."""
    reduce_op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
    if dist.is_initialized():
        dist.all_reduce(tensor, op=reduce_op, group=ps.get_data_parallel_group(
            with_context_parallel=with_context_parallel))
    return tensor


def cp_token_positions(cp: int, rank: int, local: int,
                       device: torch.device | None = None) -> torch.Tensor:
    """Sequence positions `[local]` of the tokens CP rank `rank` of `cp` holds: chunks `rank`
    and `2cp-1-rank` of 2cp (megatron's load-balanced split, `get_batch_on_this_cp_rank`)."""
    chunk = local // 2
    return torch.cat([torch.arange(chunk, device=device) + c * chunk
                      for c in (rank, 2 * cp - 1 - rank)])


def cp_positions(local: int, device: torch.device | None = None) -> torch.Tensor:
    """This rank's `cp_token_positions` (0..local-1 without context parallelism)."""
    cp = layout().cp
    if cp == 1:
        return torch.arange(local, device=device)
    return cp_token_positions(cp, ps.get_context_parallel_rank(), local, device)


def cp_max(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the maximum over the context-parallel ranks (no gradient)."""
    if layout().cp > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=ps.get_context_parallel_group())
    return tensor


def cp_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the context-parallel ranks of per-sequence parts (e.g. each rank's share of a
    sequence's log-probs), differentiably.

    Every CP rank then computes the same loss, and the backward sums their gradients: each
    rank's share gets CP times one gradient. Each CP rank also counts the samples once, and
    megatron divides the gradients by the count summed over DP×CP, so the update is one copy's."""
    if layout().cp == 1:
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, group=ps.get_context_parallel_group())


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Max over every rank (e.g. peak memory, a NaN flag seen anywhere)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_from_last_rank(values: Sequence[float]) -> list[float]:
    """Floats computed on the last rank (losses), now on every rank."""
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device())
    if dist.is_initialized():
        dist.broadcast(tensor, src=world_size() - 1)
    return tensor.tolist()


def broadcast_last_stage_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the last pipeline stage's values of a tensor that every stage of this rank's
    pipeline holds in the same shape and dtype (e.g. the tokens sampled at a decode step)."""
    if layout().pp > 1:
        dist.broadcast(tensor, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return tensor


def broadcast_from_last_stage(tensors: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    """Tensors computed on the last pipeline stage (where outputs exist), now on every stage of
    this rank's pipeline. The other stages pass None: shapes and dtypes travel with the values."""
    if layout().pp == 1:
        return list(tensors)
    box = [None if tensors is None else [t.cpu() for t in tensors]]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return [t.to(device()) for t in box[0]]


def broadcast_object(obj: object, src: int = 0) -> object:
    """A picklable object from `src` to every rank (e.g. a run directory name)."""
    box = [obj]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
