"""Run megatron-core on CPU with gloo: the small set of patches it needs when CUDA is absent.

megatron-core has no CPU path (its maintainers say so); these are the places 0.16.1 assumes CUDA,
each measured in `shared/notes/megatron-core-on-cpu.md`:

1. the RNG tracker forks CUDA generator states -> `CpuRNGStatesTracker` forks the CPU generator;
2. `torch.cuda.current_device()` is used as an allocation device -> it returns the CPU device;
3. hard-coded `device="cuda"`, `Tensor.cuda()` and `tensor.type() == 'torch.cuda.FloatTensor'`
   asserts -> `_CudaToCpu`, a `TorchFunctionMode` that maps CUDA devices to the CPU and reports
   CPU tensors with their CUDA type names;
4. `torch.cuda.synchronize` / streams / events on overlap and timer paths -> no-ops;
5. sequence parallel with torch norms -> `SequenceParallelTorchNorm`, a norm whose parameters
   carry the `sequence_parallel` attribute so megatron all-reduces their grads over TP.

And one for speed: megatron issues its collectives whatever the group size (the DP=1 gradient
reduce-scatter and parameter all-gather, the loss all-reduces over a TP group of one...), and
gloo spends a thread hand-off and a copy on each. Collectives over a group of one rank are
identities, so `_single_rank_shortcut` answers them in place (a copy when output and input differ).
And `keep_freed_memory`: glibc returns every freed block above its mmap threshold to the kernel,
so each step's activations come back as fresh pages that fault on first touch (~5,000 minor faults
per step on the tiny benchmark model, ~2% of the step). On GPU torch's caching allocator keeps
freed blocks; on CPU raising malloc's mmap and trim thresholds does the same.

And `_outside_device_mapping`: every torch call made under a `TorchFunctionMode` pays a Python
dispatch (~1.3 µs; on the benchmark model ~2,100 calls, ~1.2% of a step). Megatron's schedules run
the model's forward and backward in `schedules.forward_step` / `backward_step`; the code under them
(layers, attention, the TP/SP collectives, the DDP hooks) allocates only on
`torch.cuda.current_device()`, which is the CPU without the mode, so those two run with the mode
off, and the one function under them that names CUDA (the RoPE table's context-parallel slice)
turns it back on (`_with_device_mapping`). Set-up, the optimizer, checkpointing, pipeline
send/recv and generation keep it.

`enable()` is called once by `tensor_parallel.runtime` and only when `torch.cuda.is_available()`
is False; nothing here runs on a GPU host.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import inspect
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from kiln.log import get_logger

log = get_logger(__name__)

_enabled = False
_mode: TorchFunctionMode | None = None


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaToCpu(TorchFunctionMode):
    """Every torch call made under this mode sees CUDA devices as the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        return func(*args, **kwargs)


class CpuRNGStatesTracker:
    """megatron's `CudaRNGStatesTracker` contract on the CPU generator.

    Named states (`model-parallel-rng`, `data-parallel-rng`, `expert-parallel-rng`) are CPU
    generator states; `fork(name)` swaps one in, runs the block, stores where it got to and swaps
    the previous state back, exactly as megatron does with CUDA states.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = False
        self.reset()

    def is_initialized(self) -> bool:
        return self._is_initialized

    def reset(self) -> None:
        self._is_initialized = False
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        self._is_initialized = True
        if seed in self.seeds_:
            raise RuntimeError(f"seed {seed} already exists")
        if name in self.states_:
            raise RuntimeError(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise RuntimeError(f"rng state {name} is not added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


class SequenceParallelTorchNorm:
    """megatron's `WrappedTorchNorm` without its `not sequence_parallel` assert.

    Under sequence parallelism each TP rank normalises its own slice of the sequence, so the norm
    weight's gradient is partial: the `sequence_parallel` attribute makes megatron's
    `finalize_model_grads` all-reduce it over the TP group (what TE's and apex's norms do).
    `fused=True` (a spec parameter) gives `fused_ops.RMSNorm` for RMSNorm.
    """

    def __new__(cls, config: Any, hidden_size: int, eps: float = 1e-5, fused: bool = False,
                **_: Any) -> torch.nn.Module:
        if config.normalization == "RMSNorm":
            from tensor_parallel.fused_ops import RMSNorm

            norm_cls = RMSNorm if fused else torch.nn.RMSNorm
        else:
            norm_cls = torch.nn.LayerNorm
        norm = norm_cls(normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _no_op(name: str) -> Any:
    """A do-nothing stand-in for `torch.cuda.<name>`: one function object per name, because
    torch.compile's trace rules refuse one object that stands for two torch functions (megatron
    compiles its fused activations when they are first imported, which can be after `enable`)."""

    def no_op(*args: Any, **kwargs: Any) -> None:
        return None

    no_op.__name__ = no_op.__qualname__ = name
    return no_op


class _NullStream:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, *args: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _cpu_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


class _DoneWork:
    """The `Work` handle of a collective that completed when it was issued."""

    def wait(self, *args: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _single_rank_shortcut() -> None:
    """Answer all-reduce, broadcast, reduce-scatter and all-gather over one-rank groups locally."""
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer

    def alone(group: Any) -> bool:
        return dist.get_world_size(group) == 1

    def done(async_op: bool) -> _DoneWork | None:
        return _DoneWork() if async_op else None

    def copy(output: torch.Tensor, source: torch.Tensor) -> None:
        if output.data_ptr() != source.data_ptr() or output.stride() != source.stride():
            output.copy_(source.view_as(output))

    def wrap(name: str, local: Any) -> Any:
        collective = getattr(dist, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            bound = _bind(collective, args, kwargs)
            if not alone(bound.get("group")):
                return collective(*args, **kwargs)
            local(bound)
            return done(bound.get("async_op", False))

        call.__wrapped__ = collective
        setattr(dist, name, call)
        return call

    def _no_op(bound: dict) -> None:
        return None

    wrap("all_reduce", _no_op)
    wrap("broadcast", _no_op)
    for name, (out, src) in {"reduce_scatter_tensor": ("output", "input"),
                             "_reduce_scatter_base": ("output", "input"),
                             "all_gather_into_tensor": ("output_tensor", "input_tensor"),
                             "_all_gather_base": ("output_tensor", "input_tensor")}.items():
        wrapped = wrap(name, lambda b, o=out, i=src: copy(b[o], b[i]))
        # megatron's buffers bound these at import time
        for attr in ("dist_reduce_scatter_func", "dist_all_gather_func"):
            if getattr(param_and_grad_buffer, attr, None) is getattr(dist, name).__wrapped__:
                setattr(param_and_grad_buffer, attr, wrapped)


def _bind(func: Any, args: tuple, kwargs: dict) -> dict:
    """`func`'s arguments by name (defaults included)."""
    signature = _SIGNATURES.get(func)
    if signature is None:
        signature = _SIGNATURES[func] = inspect.signature(func)
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


_SIGNATURES: dict[Any, inspect.Signature] = {}


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def _run_under(context: Any, func: Any) -> Any:
    """`func`, each call run inside a fresh `context()`."""

    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        with context():
            return func(*args, **kwargs)

    return run


def _outside_device_mapping(func: Any) -> Any:
    """`func`, run with `_CudaToCpu` (and any torch function handling) off."""
    return _run_under(torch._C.DisableTorchFunction, func)


def _with_device_mapping(func: Any) -> Any:
    """`func`, run with `_CudaToCpu` back on inside `_outside_device_mapping`'s region."""
    return _run_under(torch._C._EnableTorchFunction, func)


def device_mapping_active() -> bool:
    """Whether torch calls made here go through `_CudaToCpu` (for tests of the fast path)."""
    return torch._C._is_torch_function_mode_enabled() and any(
        isinstance(mode, _CudaToCpu) for mode in torch.overrides._get_current_function_mode_stack())


def keep_freed_memory() -> bool:
    """Keep freed tensor memory in the heap for reuse instead of returning it to the kernel.

    Blocks up to 256 MiB come from the heap, and up to 1 GiB of free heap is kept: a process
    holds on to its peak, as a CUDA caching allocator does. Environment settings
    (`MALLOC_MMAP_THRESHOLD_` ...) win; non-glibc systems keep their allocator's behaviour.
    """
    if any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, 256 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 64 << 20)))


def enable() -> None:
    """Install the CPU backend (idempotent). Only call when CUDA is absent."""
    global _enabled, _mode
    if _enabled:
        return
    assert not torch.cuda.is_available(), "the CPU backend must not run on a CUDA host"
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = _no_op("synchronize")
    torch.cuda.empty_cache = _no_op("empty_cache")
    torch.cuda.Stream = _NullStream
    torch.cuda.current_stream = _NullStream
    torch.cuda.default_stream = _NullStream
    torch.cuda.stream = _NullStream
    torch.cuda.set_device = _no_op("set_device")
    torch.cuda.manual_seed = _no_op("manual_seed")
    torch.cuda.manual_seed_all = _no_op("manual_seed_all")
    torch.cuda.get_rng_state = torch.get_rng_state
    torch.cuda.set_rng_state = torch.set_rng_state
    mp_random._get_cuda_rng_state = _cpu_rng_state
    mp_random._set_cuda_rng_state = _set_cpu_rng_state
    mp_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    _single_rank_shortcut()
    schedules.forward_step = _outside_device_mapping(schedules.forward_step)
    schedules.backward_step = _outside_device_mapping(schedules.backward_step)
    # what runs under those two and still names CUDA: the RoPE table's context-parallel slice
    # (a pinned index tensor moved with `.cuda()`), and the causal masks of megatron's unfused
    # softmax (`model.local_attention=megatron`; `device="cuda"`)
    from megatron.core.fusions import fused_softmax
    from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn
    from megatron.core.transformer import utils as transformer_utils

    cp_slice = _with_device_mapping(rope_utils.get_pos_emb_on_this_cp_rank)
    for module in (rope_utils, rotary_pos_embedding, yarn):
        module.get_pos_emb_on_this_cp_rank = cp_slice
    for name in ("get_default_causal_mask", "get_sliding_window_causal_mask"):
        masks = _with_device_mapping(getattr(transformer_utils, name))
        for module in (transformer_utils, fused_softmax):
            setattr(module, name, masks)
    _mode = _CudaToCpu()
    _mode.__enter__()
    kept = keep_freed_memory()
    _enabled = True
    log.info("CUDA not available: megatron-core runs on the CPU backend (gloo, local spec%s)",
             ", freed memory kept for reuse" if kept else "")


def enabled() -> bool:
    return _enabled
