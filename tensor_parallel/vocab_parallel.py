"""Log-probabilities, entropy and KL from logits split over the vocabulary across the TP group.

Megatron's output layer with `parallel_output=True` leaves each tensor-parallel rank holding
logits `[..., V / TP]` for a contiguous slice of the (padded) vocabulary, rank r owning ids
`[r * V/TP, (r + 1) * V/TP)`. The ops here never gather the vocabulary: each rank reduces its
slice and one all-reduce of a `[...]`-shaped tensor combines them (max, then sum of exponentials),
so the memory stays `O(V / TP)` per token, as in megatron's `vocab_parallel_cross_entropy`.

Conventions, shared with megatron's tensor-parallel mappings:
- Inputs other than the logits (targets, masks, gradients flowing in) are identical on every rank
  of the group, and so are the outputs. The backward of each op returns the gradient of the local
  slice only; the output layer's own backward all-reduces its input gradient over the group.
- Sequence parallelism needs nothing here: the output layer all-gathers the sequence before its
  GEMM, so the logits every rank sees cover the full sequence.
- Arithmetic is in float32 (float64 stays float64); the max is subtracted across ranks first, so
  logits of any magnitude give finite results. Gradients come back in the logits' dtype.
- Padded vocabulary entries take part in the softmax, as in megatron's cross entropy.
- Target ids outside `[0, V)` (an ignore index such as -100) give a finite, meaningless value
  with a finite gradient: mask those positions out with `masked_sum` / `masked_mean`.
- Logits of -inf (banned tokens) are allowed as long as each row has a finite one.

`group=None` means megatron's tensor-model-parallel group when `parallel_state` is initialised,
and no tensor parallelism (a single rank) otherwise.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def resolve_group(group: ProcessGroup | None) -> ProcessGroup | None:
    """The given group; else megatron's TP group if initialised; else None (a single rank)."""
    if group is not None:
        return group
    # Never imported means never initialised: spare the multi-second megatron import.
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is None or not (dist.is_available() and dist.is_initialized()):
        return None
    if parallel_state.model_parallel_is_initialized():
        return parallel_state.get_tensor_model_parallel_group()
    return None


def _world(group: ProcessGroup | None) -> tuple[int, int]:
    """(rank in group, group size), (0, 1) without a group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_reduce(tensor: Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _shifted_logits(logits: Tensor, temperature: float,
                    group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """(x, max): x = (logits - global max) / T in a fresh float buffer, so x <= 0 everywhere."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    x = logits.detach().to(_compute_dtype(logits), copy=True)
    logits_max = _all_reduce(x.amax(dim=-1), dist.ReduceOp.MAX, group)
    x.sub_(logits_max.unsqueeze(-1))
    if temperature != 1.0:
        x.div_(temperature)
    return x, logits_max


def _softmax_(x: Tensor, group: ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """Turn shifted logits x into this slice of the softmax in place; also return log Z."""
    sum_exp = _all_reduce(x.exp_().sum(dim=-1), dist.ReduceOp.SUM, group)
    return x.div_(sum_exp.unsqueeze(-1)), sum_exp.log()


def _log_softmax_(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """Turn shifted logits x into this slice of the log-softmax in place."""
    sum_exp = _all_reduce(x.exp().sum(dim=-1), dist.ReduceOp.SUM, group)
    return x.sub_(sum_exp.log().unsqueeze(-1))


def _local_target(targets: Tensor, vocab_shard: int, rank: int) -> tuple[Tensor, Tensor]:
    """(index into this rank's slice, clamped to 0 where the id lives elsewhere; ownership mask)."""
    start = rank * vocab_shard
    owned = (targets >= start) & (targets < start + vocab_shard)
    local = torch.where(owned, targets - start, torch.zeros_like(targets))
    return local, owned


class _VocabParallelLogProbs(torch.autograd.Function):
    """log softmax(logits / T)[target]; d/dlogits_j = (1[j = target] - p_j) / T."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, temperature: float,
                group: ProcessGroup | None) -> Tensor:
        rank, _ = _world(group)
        x, _ = _shifted_logits(logits, temperature, group)
        local, owned = _local_target(targets, x.shape[-1], rank)
        target_x = x.gather(-1, local.unsqueeze(-1)).squeeze(-1) * owned
        target_x = _all_reduce(target_x, dist.ReduceOp.SUM, group)
        # x becomes the softmax in place: the only vocabulary-sized buffer, kept for backward.
        softmax, log_z = _softmax_(x, group)
        ctx.save_for_backward(softmax, local, owned)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        return target_x - log_z

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        softmax, local, owned = ctx.saved_tensors
        scale = grad_output.to(softmax.dtype) / ctx.temperature
        grad = softmax * -scale.unsqueeze(-1)
        grad.scatter_add_(-1, local.unsqueeze(-1), (scale * owned).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


class _VocabParallelEntropy(torch.autograd.Function):
    """H = log Z - sum_j p_j x_j; dH/dlogits_j = -p_j (log p_j + H) / T."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, group: ProcessGroup | None) -> Tensor:
        x, _ = _shifted_logits(logits, temperature, group)
        log_p = _log_softmax_(x, group)
        p_log_p = _all_reduce(_xlogx(log_p).sum(dim=-1), dist.ReduceOp.SUM, group)
        entropy = -p_log_p
        ctx.save_for_backward(log_p, entropy)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        return entropy

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        log_p, entropy = ctx.saved_tensors
        scale = (grad_output.to(log_p.dtype) / ctx.temperature).unsqueeze(-1)
        grad = _xlogx(log_p, offset=entropy.unsqueeze(-1)).mul_(-scale)
        return grad.to(ctx.logits_dtype), None, None


class _VocabParallelLogSumExp(torch.autograd.Function):
    """logsumexp(logits / T) over the whole vocabulary; d/dlogits_j = p_j / T."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, group: ProcessGroup | None) -> Tensor:
        x, logits_max = _shifted_logits(logits, temperature, group)
        softmax, log_z = _softmax_(x, group)
        ctx.save_for_backward(softmax)
        ctx.temperature, ctx.logits_dtype = temperature, logits.dtype
        return log_z + logits_max / temperature

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (softmax,) = ctx.saved_tensors
        grad = softmax * (grad_output.to(softmax.dtype) / ctx.temperature).unsqueeze(-1)
        return grad.to(ctx.logits_dtype), None, None


class _VocabParallelLogSoftmax(torch.autograd.Function):
    """This rank's slice of log softmax(logits / T). Its gradient is local, but the softmax
    couples the slices: d/dlogits_j = (g_j - p_j * sum_k g_k) / T, the sum over all ranks."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, group: ProcessGroup | None) -> Tensor:
        x, _ = _shifted_logits(logits, temperature, group)
        log_p = _log_softmax_(x, group)
        ctx.save_for_backward(log_p)
        ctx.temperature, ctx.logits_dtype, ctx.group = temperature, logits.dtype, group
        return log_p

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        (log_p,) = ctx.saved_tensors
        g = grad_output.to(log_p.dtype)
        total = _all_reduce(g.sum(dim=-1, keepdim=True), dist.ReduceOp.SUM, ctx.group)
        grad = (g - log_p.exp() * total) / ctx.temperature
        return grad.to(ctx.logits_dtype), None, None


class _SumOverVocab(torch.autograd.Function):
    """Sum of the last dimension over all ranks' slices; the backward passes the (replicated)
    gradient to the local slice, as megatron's `reduce_from_tensor_model_parallel_region` does."""

    @staticmethod
    def forward(ctx, local: Tensor, group: ProcessGroup | None) -> Tensor:
        ctx.shape = local.shape
        return _all_reduce(local.sum(dim=-1), dist.ReduceOp.SUM, group)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        return grad_output.unsqueeze(-1).expand(ctx.shape), None


def vocab_parallel_log_probs(logits: Tensor, targets: Tensor, group: ProcessGroup | None = None,
                             temperature: float = 1.0) -> Tensor:
    """log softmax(logits / temperature)[targets] from vocab-sharded logits `[..., V/TP]`.

    `targets` `[...]` holds global vocabulary ids; returns `[...]` in float32 (float64 for
    float64 logits), identical on every rank of `group`.
    """
    if targets.shape != logits.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} does not match logits "
                         f"{tuple(logits.shape)} without the vocabulary dimension")
    return _VocabParallelLogProbs.apply(logits, targets.long(), temperature, resolve_group(group))


def vocab_parallel_entropy(logits: Tensor, group: ProcessGroup | None = None,
                           temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature) over the whole vocabulary, `[...]`."""
    return _VocabParallelEntropy.apply(logits, temperature, resolve_group(group))


def vocab_parallel_logsumexp(logits: Tensor, group: ProcessGroup | None = None,
                             temperature: float = 1.0) -> Tensor:
    """logsumexp(logits / temperature) over the whole vocabulary, `[...]`."""
    return _VocabParallelLogSumExp.apply(logits, temperature, resolve_group(group))


def vocab_parallel_log_softmax(logits: Tensor, group: ProcessGroup | None = None,
                               temperature: float = 1.0) -> Tensor:
    """This rank's slice of log softmax(logits / temperature), `[..., V/TP]`.

    Unlike the other ops its output is per rank, so the gradient flowing in is per rank too;
    the backward all-reduces what the softmax couples across slices.
    """
    return _VocabParallelLogSoftmax.apply(logits, temperature, resolve_group(group))


def vocab_parallel_kl_divergence(logits: Tensor, ref_logits: Tensor,
                                 group: ProcessGroup | None = None,
                                 temperature: float = 1.0) -> Tensor:
    """KL(p || q) = sum_v p_v (log p_v - log q_v) per token, p from `logits`, q from `ref_logits`.

    Both are vocab-sharded the same way; gradients flow to both (detach the reference to keep
    it fixed). Used for distillation and for the exact per-token KL to a reference policy.
    """
    group = resolve_group(group)
    log_p = vocab_parallel_log_softmax(logits, group, temperature)
    log_q = vocab_parallel_log_softmax(ref_logits, group, temperature)
    return _SumOverVocab.apply(log_p.exp() * (log_p - log_q), group)


def _xlogx(log_p: Tensor, offset: Tensor | float = 0.0) -> Tensor:
    """p * (log p + offset) with p = exp(log p), taken as 0 where p is 0 (a -inf logit)."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p + offset), torch.zeros((), dtype=p.dtype, device=p.device))


Dims = int | tuple[int, ...] | None


def masked_sum(values: Tensor, mask: Tensor, dim: Dims = -1) -> Tensor:
    """Sum of `values` where `mask` is true (or non-zero), over `dim` (None: every dimension).

    Masked positions contribute exactly 0, even when they hold inf or NaN (padding), and receive
    a zero gradient.
    """
    kept = torch.where(mask.to(torch.bool), values,
                       torch.zeros((), dtype=values.dtype, device=values.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(values: Tensor, mask: Tensor, dim: Dims = -1) -> Tensor:
    """Mean of `values` over the positions where `mask` is true; 0 where none is."""
    mask = mask.to(torch.bool).expand_as(values)
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(values, mask, dim) / count.clamp(min=1).to(values.dtype)
