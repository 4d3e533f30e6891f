"""RMSNorm, SwiGLU and the fused QKV split + rotary embedding, for the local (non-TE) spec.

Under Transformer Engine these are TE kernels. Off TE, megatron runs them as chains of torch
ops, and each chain makes passes and copies that TE avoids:

- RMSNorm: torch's `rms_norm` is composite on CPU (pow, mean, add, rsqrt, two muls, and their
  autograd). `RMSNorm` computes the statistics in one read and the backward in closed form.
- SwiGLU: megatron's `glu` chunks the fc1 output, so autograd `cat`s the two halves' gradients.
  `SwiGLU` writes both halves into one gradient tensor instead.
- The QKV projection: megatron splits its fused output into query, key and value (a `cat` in the
  backward), rotates query and key (`_rotate_half` and the rotary pass-through each `cat`), and
  core attention then copies all three into its `[b, s]` layout. `FusedRopeSelfAttention` changes
  each tensor's layout once and rotates it in three elementwise ops (`_QkvRope`); its backward
  writes the fused gradient directly, without a `cat`.

All three compute what megatron's unfused code computes (tests compare values and gradients).
On CPU (fp32) all three run; with the local spec on a GPU, `_QkvRope` runs, RMSNorm falls back
to torch's for bf16 and megatron's compiled `bias_swiglu_impl` is the SwiGLU.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
    _yarn_get_concentration_factor_from_config,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.identity_op import IdentityOp


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        hidden = x.shape[-1]
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        rstd = rstd.square_().div_(hidden).add_(eps).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, weight, rstd)
        return normed * weight

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        normed, weight, rstd = ctx.saved_tensors
        grad_normed = grad * weight
        # d/dx of x·rstd: rstd · (g - x̂ · mean(g · x̂))
        mean = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1).div_(normed.shape[-1])
        grad_x = torch.addcmul(grad_normed, normed, mean, value=-1.0).mul_(rstd)
        grad_weight = (grad * normed).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class RMSNorm(torch.nn.RMSNorm):
    """`torch.nn.RMSNorm` over the last dimension with a fused forward and backward (fp32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype != torch.float32 or self.weight is None or len(self.normalized_shape) != 1
                or self.eps is None):
            return super().forward(x)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        gate, linear = x.chunk(2, dim=-1)
        activated = F.silu(gate)
        ctx.save_for_backward(x, activated)
        return activated * linear

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        x, activated = ctx.saved_tensors
        gate, linear = x.chunk(2, dim=-1)
        grad_x = torch.empty_like(x)
        grad_gate, grad_linear = grad_x.chunk(2, dim=-1)
        torch.mul(grad, activated, out=grad_linear)
        torch.mul(grad, linear, out=grad_gate)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad_x


class SwiGLU(torch.nn.Module):
    """silu(gate) · linear over the fc1 output `[..., 2·ffn]` (gate half first, as megatron).

    The module megatron's MLP builds from `MLPSubmodules.activation_func` and calls on the whole
    fc1 output when `config.use_te_activation_func` is set.
    """

    def __init__(self, config: Any = None, **_: Any) -> None:
        super().__init__()
        if config is not None and (config.activation_func_clamp_value is not None
                                   or config.glu_linear_offset != 0.0):
            raise ValueError("SwiGLU: clamped or offset GLUs are not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SwiGLUFunction.apply(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        return {}  # no parameters


def _rotate(src: torch.Tensor, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            inverse: bool) -> None:
    """out = src·cos + rotate_half(src)·sin with rotate_half(t) = [-t2, t1] (megatron's
    non-interleaved RoPE), or its transpose when `inverse` (the backward).

    `src` and `out` share one contiguous layout: torch's elementwise kernels are several times
    slower on mismatched strides than the copy that aligns them.
    """
    h = src.shape[-1] // 2
    torch.mul(src, cos, out=out)
    if not inverse:  # o1 = s1·c1 - s2·n1 ; o2 = s2·c2 + s1·n2
        out[..., :h].addcmul_(src[..., h:], sin[..., :h], value=-1.0)
        out[..., h:].addcmul_(src[..., :h], sin[..., h:])
    else:  # g1 = o1·c1 + o2·n2 ; g2 = o2·c2 - o1·n1
        out[..., :h].addcmul_(src[..., h:], sin[..., h:])
        out[..., h:].addcmul_(src[..., :h], sin[..., :h], value=-1.0)


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of `freqs` `[s, 1, 1, hn]` shaped `[1, s, 1, 1, hn]`: broadcast over the
    `[b, s, groups, heads per group, hn]` layout the rotation runs in."""
    freqs = freqs.reshape(1, freqs.shape[0], 1, 1, freqs.shape[-1])
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


class _QkvRope(torch.autograd.Function):
    """mixed `[s, b, ng, (r + 2)·hn]` -> query `[s, b, ng·r, hn]` and key `[s, b, ng, hn]` rotated,
    value `[s, b, ng, hn]`; each laid out `[b, s, ...]` in memory (what core attention reads)."""

    @staticmethod
    def forward(ctx: Any, mixed: torch.Tensor, q_freqs: torch.Tensor, k_freqs: torch.Tensor,
                per_group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        s, b, ng, width = mixed.shape
        hn = width // (per_group + 2)
        q_trig = _cos_sin(q_freqs, mixed.dtype)
        k_trig = q_trig if k_freqs is q_freqs else _cos_sin(k_freqs, mixed.dtype)
        # one layout change per tensor ([s, b] -> [b, s]), then elementwise work on matching
        # contiguous layouts
        src_q = mixed.new_empty(b, s, ng, per_group, hn)
        src_q.transpose(0, 1).copy_(mixed[..., :per_group * hn].unflatten(-1, (per_group, hn)))
        src_k = mixed.new_empty(b, s, ng, 1, hn)
        src_k.transpose(0, 1).copy_(mixed[..., per_group * hn:-hn].unsqueeze(3))
        value = mixed.new_empty(b, s, ng, hn)
        value.transpose(0, 1).copy_(mixed[..., -hn:])
        query, key = torch.empty_like(src_q), torch.empty_like(src_k)
        _rotate(src_q, query, *q_trig, False)
        _rotate(src_k, key, *k_trig, False)
        ctx.save_for_backward(*q_trig, *k_trig)
        ctx.shape, ctx.per_group = mixed.shape, per_group
        return (query.flatten(2, 3).transpose(0, 1), key.squeeze(3).transpose(0, 1),
                value.transpose(0, 1))

    @staticmethod
    def backward(ctx: Any, grad_q: torch.Tensor | None, grad_k: torch.Tensor | None,
                 grad_v: torch.Tensor | None):
        q_cos, q_sin, k_cos, k_sin = ctx.saved_tensors
        ng, width = ctx.shape[2:]
        r = ctx.per_group
        hn = width // (r + 2)
        q_trig, k_trig = (q_cos, q_sin), (k_cos, k_sin)
        grad = q_cos.new_empty(ctx.shape)
        dq = grad[..., :r * hn].unflatten(-1, (r, hn))
        dk, dv = grad[..., r * hn:-hn].unsqueeze(3), grad[..., -hn:]
        for g, target, trig, shape in ((grad_q, dq, q_trig, (ng, r)), (grad_k, dk, k_trig, (ng, 1))):
            if g is None:
                target.zero_()
                continue
            g = g.transpose(0, 1).contiguous().unflatten(2, shape)
            rotated = torch.empty_like(g)
            _rotate(g, rotated, *trig, True)
            target.copy_(rotated.transpose(0, 1))
        if grad_v is None:
            dv.zero_()
        else:
            dv.copy_(grad_v)
        return grad, None, None, None


class FusedRopeSelfAttention(SelfAttention):
    """megatron's `SelfAttention` with the QKV split and the rotary embedding fused (`_QkvRope`).

    Training and evaluation forwards with rotary embeddings over whole sequences take the fused
    path; generation (an inference context), packed sequences and configurations outside
    plain Llama-style RoPE (interleaved or partial rotary, YaRN scaling, q/k norms, gated
    attention, fewer KV groups than TP ranks) run megatron's own code unchanged.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self._fusable = (not config.rotary_interleaved and not config.multi_latent_attention
                         and not config.attention_output_gate and not config.flash_decode
                         and _yarn_get_concentration_factor_from_config(config) == 1.0
                         and config.num_query_groups >= self.world_size
                         and isinstance(self.q_layernorm, IdentityOp | type(None))
                         and isinstance(self.k_layernorm, IdentityOp | type(None)))
        self._pending_rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden_states, attention_mask, key_value_states=None,
                inference_context=None, rotary_pos_emb=None, *args, **kwargs):
        rope = rotary_pos_emb
        if rope is not None and not isinstance(rope, tuple):
            rope = (rope, rope)
        fuse = (self._fusable and rope is not None and key_value_states is None
                and inference_context is None and kwargs.get("inference_params") is None
                and kwargs.get("packed_seq_params") is None and not args
                and not (self.config.no_rope_freq and self.config.no_rope_freq[self.layer_number - 1])
                and all(f is not None and f.dim() == 4 and f.shape[1:3] == (1, 1)
                        and f.shape[-1] == self.hidden_size_per_attention_head for f in rope))
        if not fuse:
            return super().forward(hidden_states, attention_mask, key_value_states,
                                   inference_context, rotary_pos_emb, *args, **kwargs)
        # megatron applies no rotary embedding when given none; `get_query_key_value_tensors`
        # below applies it while splitting
        self._pending_rope = rope
        try:
            return super().forward(hidden_states, attention_mask, key_value_states,
                                   inference_context, None, **kwargs)
        finally:
            self._pending_rope = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate=False, split_qkv=True):
        if self._pending_rope is None or not split_qkv or output_gate:
            return super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                       output_gate=output_gate,
                                                       split_qkv=split_qkv)
        mixed, _ = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                       split_qkv=False)
        per_group = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
        q_freqs, k_freqs = self._pending_rope
        return _QkvRope.apply(mixed, q_freqs, k_freqs, per_group)


__all__ = ["FusedRopeSelfAttention", "RMSNorm", "SwiGLU"]
