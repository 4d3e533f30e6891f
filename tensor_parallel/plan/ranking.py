"""Valid layouts for a GPU count, the cheapest setting that fits each, ranked by a speed proxy."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from kiln.errors import UsageError
from tensor_parallel.plan.memory import (
    GIB,
    RECOMPUTE_MODES,
    Layout,
    MemoryEstimate,
    ModelShape,
    Recompute,
    TrainingSetup,
    check_layout,
    estimate_memory,
    layer_parameters,
)


@dataclass(frozen=True)
class Plan:
    """A layout, its memory, the cheapest setting that fits, and a relative speed for ordering."""

    estimate: MemoryEstimate
    distributed_optimizer: bool
    recompute: Recompute
    peak_bytes: int
    fits: bool
    throughput: float

    @property
    def layout(self) -> Layout:
        return self.estimate.layout


# Relative cost of recomputation (full recompute re-runs the forward: 3 units of work become 4).
_RECOMPUTE_SPEED = {"none": 1.0, "selective": 0.97, "full": 0.75}


def stage_balance(model: ModelShape, layout: Layout, seq_length: int) -> float:
    """Mean over slowest stage work: the last stage also runs the output layer and the loss.

    Work per token is counted in multiply-adds: one per GEMM parameter, plus s * query_size for
    causal attention (QK^T and PV over half the sequence on average); the embedding lookup is free.
    """
    layer = layer_parameters(model) + seq_length * model.query_size
    output = model.padded_vocab_size(layout.tp) * model.hidden_size
    per_stage = layer * (model.num_layers // layout.pp)
    return (per_stage * layout.pp + output) / layout.pp / (per_stage + output)


def throughput_proxy(model: ModelShape, layout: Layout, setup: TrainingSetup,
                     recompute: Recompute, gpus_per_node: int = 8) -> float:
    """Relative step speed, only for ordering layouts: bubble, stage balance, TP, recompute.

    The 1F1B bubble is (pp - 1) / (vpp * m) of the ideal time (Narayanan et al. 2021); a pipeline
    runs at the pace of its slowest stage; TP stays inside a node (NVLink) and each doubling costs
    some 4% in all-gather/reduce-scatter time; interleaving adds point-to-point traffic per chunk.
    Context parallelism is costed like TP inside a node, and at 10% per doubling across nodes:
    its K/V exchange overlaps attention only in part, so it ranks first where it saves
    recomputation or makes a layout fit.
    Data-parallel gradient reduction is taken as overlapped with the backward pass.
    """
    work = layout.chunks * setup.num_microbatches(layout)
    pipeline = work / (work + layout.pp - 1) * stage_balance(model, layout, setup.seq_length)
    tp = 0.96 ** math.log2(layout.tp)
    inside = min(layout.cp, max(1, gpus_per_node // layout.tp))
    cp = 0.96 ** math.log2(inside) * 0.9 ** math.log2(layout.cp / inside)
    interleave = 0.99 ** (layout.chunks - 1)
    return pipeline * tp * cp * interleave * _RECOMPUTE_SPEED[recompute]


def context_parallel_sizes(gpus_per_node: int = 8) -> list[int]:
    """The CP sizes `kiln plan` considers by default: 1 and the powers of two up to a node."""
    return [2**k for k in range(int(math.log2(gpus_per_node)) + 1)]


def candidate_layouts(model: ModelShape, gpus: int, gpus_per_node: int = 8,
                      cp_sizes: Sequence[int] = (1,)) -> list[Layout]:
    """Every tp x pp (x vpp) x cp x dp = gpus with tp inside a node; validity is checked
    separately."""
    layouts = []
    for tp in _divisors(gpus):
        if tp > gpus_per_node:
            continue
        for cp in cp_sizes:
            if (gpus // tp) % cp:
                continue
            for pp in _divisors(gpus // (tp * cp)):
                if pp > model.num_layers:
                    continue
                dp = gpus // (tp * cp * pp)
                layouts.append(Layout(tp, pp, dp, None, tp > 1, cp))
                if pp > 1:
                    for vpp in _divisors(model.num_layers // pp if model.num_layers % pp == 0 else 1):
                        if vpp > 1:
                            layouts.append(Layout(tp, pp, dp, vpp, tp > 1, cp))
    return layouts


def plan_layouts(model: ModelShape, gpus: int, gpu_memory_gb: float, setup: TrainingSetup,
                 gpus_per_node: int = 8, reserve_gb: float = 4.0,
                 cp_sizes: Sequence[int] = (1,)) -> tuple[list[Plan], dict[str, int]]:
    """Rank valid layouts: those that fit first, then by throughput proxy, then by peak memory.

    `reserve_gb` is kept free for the CUDA context, communication buffers and fragmentation. For
    each layout the distributed optimizer is used whenever dp x cp > 1, and the cheapest
    recomputation that fits is chosen. `cp_sizes`: the context-parallel sizes to consider.
    Returns the plans and, per reason, how many layouts were invalid.
    """
    if gpus <= 0:
        raise UsageError(f"--gpus must be positive, got {gpus}")
    budget = (gpu_memory_gb - reserve_gb) * GIB
    plans, rejected = [], {}
    for layout in candidate_layouts(model, gpus, gpus_per_node, cp_sizes):
        reason = check_layout(model, layout, setup)
        if reason:
            rejected[reason] = rejected.get(reason, 0) + 1
            continue
        estimate = estimate_memory(model, layout, setup)
        dist_opt = layout.dp * layout.cp > 1
        recompute = next((r for r in RECOMPUTE_MODES if estimate.peak(dist_opt, r) <= budget), "full")
        peak = estimate.peak(dist_opt, recompute)
        speed = throughput_proxy(model, layout, setup, recompute, gpus_per_node)
        plans.append(Plan(estimate, dist_opt, recompute, peak, peak <= budget, speed))
    # Layouts that fit go by speed; the rest by how close they come to fitting.
    plans.sort(key=lambda p: (0, -round(p.throughput, 6), p.peak_bytes) if p.fits
               else (1, p.peak_bytes, -p.throughput))
    return plans, rejected


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
