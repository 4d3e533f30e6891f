"""The local spec's fused RMSNorm, SwiGLU and QKV split + RoPE compute what megatron's unfused code computes:
values and gradients of the functions alone, and of a whole GPT (loss and every parameter's
gradient) built with `model.local_fusions` on and off."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from tensor_parallel.fused_ops import RMSNorm, SwiGLU, _QkvRope
from tests.tensor_parallel._model_pair import same_model


def _freqs(s: int, hn: int, base: float) -> torch.Tensor:
    """megatron's RotaryEmbedding output: [s, 1, 1, hn], the half-width angles twice."""
    inv = 1.0 / (base ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    angles = torch.outer(torch.arange(s, dtype=torch.float32), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def _megatron_qkv_rope(mixed, q_freqs, k_freqs, per_group):
    """What `SelfAttention` does unfused: split the QKV output, rotate query and key."""
    s, b, ng, width = mixed.shape
    hn = width // (per_group + 2)
    query, key, value = torch.split(mixed, [per_group * hn, hn, hn], dim=3)
    query = query.reshape(s, b, -1, hn)
    return (_apply_rotary_pos_emb_bshd(query, q_freqs), _apply_rotary_pos_emb_bshd(key, k_freqs),
            value)


@pytest.mark.parametrize("groups, per_group", [(2, 2), (4, 1), (1, 4)])
@pytest.mark.parametrize("same_freqs", [True, False])
def test_qkv_rope_matches_megatron_split_and_rotary(groups: int, per_group: int,
                                                    same_freqs: bool) -> None:
    s, b, hn = 10, 3, 16
    gen = torch.Generator().manual_seed(groups * 10 + per_group)
    mixed = torch.randn(s, b, groups, (per_group + 2) * hn, generator=gen, requires_grad=True)
    q_freqs = _freqs(s, hn, 10000.0)
    k_freqs = q_freqs if same_freqs else _freqs(s, hn, 500.0)
    ours = _QkvRope.apply(mixed, q_freqs, k_freqs, per_group)
    theirs = _megatron_qkv_rope(mixed, q_freqs, k_freqs, per_group)
    weights = [torch.randn(t.shape, generator=gen) for t in theirs]
    grads = []
    for outputs in (ours, theirs):
        loss = sum((o * w).sum() for o, w in zip(outputs, weights, strict=True))
        grads.append(torch.autograd.grad(loss, mixed)[0])
    for o, t in zip(ours, theirs, strict=True):
        assert o.shape == t.shape
        torch.testing.assert_close(o, t, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
    # laid out [b, s, ...] in memory: core attention's `transpose(0, 1).contiguous()` is free
    assert all(o.transpose(0, 1).is_contiguous() for o in ours)


def test_qkv_rope_gradient_when_an_output_is_unused() -> None:
    """Autograd passes None for outputs that do not reach the loss: their gradient is zero."""
    s, b, groups, per_group, hn = 6, 2, 2, 2, 8
    mixed = torch.randn(s, b, groups, (per_group + 2) * hn, requires_grad=True)
    freqs = _freqs(s, hn, 10000.0)
    query, _, _ = _QkvRope.apply(mixed, freqs, freqs, per_group)
    (grad,) = torch.autograd.grad(query.square().sum(), mixed)
    ref_query, _, _ = _megatron_qkv_rope(mixed, freqs, freqs, per_group)
    (ref,) = torch.autograd.grad(ref_query.square().sum(), mixed)
    torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-6)
    assert grad[..., per_group * hn:].abs().max() == 0


def test_swiglu_matches_megatron_glu() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 2 * 24, generator=gen, requires_grad=True)
    weight = torch.randn(7, 3, 24, generator=gen)
    gate, linear = torch.chunk(x, 2, dim=-1)  # megatron's `glu`
    expected = F.silu(gate) * linear
    (expected_grad,) = torch.autograd.grad((expected * weight).sum(), x)
    got = SwiGLU()(x)
    (grad,) = torch.autograd.grad((got * weight).sum(), x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=1e-6)


def test_rms_norm_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 2, 32, generator=gen, requires_grad=True)
    weight = torch.randn(9, 2, 32, generator=gen)
    ours = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(32, generator=gen) + 0.5)
    reference = torch.nn.RMSNorm(32, eps=1e-5)
    reference.load_state_dict(ours.state_dict())
    results = []
    for norm in (ours, reference):
        out = norm(x)
        grads = torch.autograd.grad((out * weight).sum(), [x, norm.weight])
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_gpt_with_fused_ops_matches_the_unfused_model() -> None:
    fused, unfused = same_model(
        ["model.local_fusions=true", "model.rope_scaling_factor=8.0"],
        ["model.local_fusions=false", "model.rope_scaling_factor=8.0"])
    ours = {f"tensor_parallel.fused_ops.{name}"
            for name in ("FusedRopeSelfAttention", "SwiGLU", "RMSNorm")}
    nodes = {"_QkvRopeBackward", "_SwiGLUFunctionBackward", "_RMSNormFunctionBackward"}
    assert ours | nodes <= fused, fused
    assert not (ours | nodes) & unfused, unfused
