"""SDPA core attention equals megatron's own `DotProductAttention` (values and gradients) on the
inputs the trainer gives it: causal GQA training, packed-conversation masks, generation masks
with left padding, one-token decode steps, and a whole GPT forward/backward."""

from __future__ import annotations

import textwrap

from tests.tensor_parallel._model_pair import run_child, same_model

SCRIPT = textwrap.dedent("""
    import torch
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from tensor_parallel import runtime
    from tensor_parallel.sdpa_attention import SdpaDotProductAttention
    from trainer.generate import attention_mask

    runtime.init(tp=1, seed=3)
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               num_query_groups=2, use_cpu_initialization=True,
                               attention_dropout=0.0)
    ours = SdpaDotProductAttention(config, 1, AttnMaskType.causal, "self")
    theirs = DotProductAttention(config, 1, AttnMaskType.causal, "self")
    s, b, hn = 12, 3, 16
    gen = torch.Generator().manual_seed(0)

    def compare(name, sq, sk, mask, rows=slice(None)):
        q = torch.randn(sq, b, 4, hn, generator=gen, requires_grad=True)
        k = torch.randn(sk, b, 2, hn, generator=gen, requires_grad=True)
        v = torch.randn(sk, b, 2, hn, generator=gen, requires_grad=True)
        outs, grads = [], []
        for module in (ours, theirs):
            out = module(q, k, v, mask)
            assert out.shape == (sq, b, 64), out.shape
            weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            (out[rows] * weight[rows]).sum().backward()
            outs.append(out[rows].detach())
            grads.append([t.grad.clone() for t in (q, k, v)])
            for t in (q, k, v):
                t.grad = None
        assert torch.allclose(outs[0], outs[1], atol=1e-5), (name, (outs[0] - outs[1]).abs().max())
        for g0, g1 in zip(*grads):
            assert torch.allclose(g0, g1, atol=1e-5), (name, (g0 - g1).abs().max())
        print("ok", name)

    compare("causal GQA", s, s, None)
    # packed conversations: block-diagonal causal mask (True = masked)
    segment = torch.tensor([0] * 5 + [1] * 7)
    allowed = (segment[:, None] == segment[None, :]) & torch.ones(s, s).tril().bool()
    compare("packed", s, s, (~allowed).expand(b, 1, s, s).clone())
    # generation: left padding; padded query rows are fully masked (finite, not compared)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[0, :4] = False
    valid[2, :7] = False
    real = valid.T  # [s, b] rows of real queries
    q_mask = attention_mask(valid, s)
    out = ours(torch.randn(s, b, 4, hn), torch.randn(s, b, 2, hn), torch.randn(s, b, 2, hn), q_mask)
    assert torch.isfinite(out).all()
    compare("left padding", s, s, q_mask, rows=real)
    compare("decode step", 1, s, attention_mask(valid, 1))
    compare("decode step, no mask", 1, s, None)
    runtime.shutdown()
""")

def test_sdpa_attention_matches_megatron_dot_product_attention() -> None:
    out = run_child(SCRIPT)
    for case in ("causal GQA", "packed", "left padding", "decode step", "decode step, no mask"):
        assert f"ok {case}\n" in out, out


def test_gpt_with_sdpa_attention_matches_the_unfused_model() -> None:
    sdpa, unfused = same_model(["model.local_attention=sdpa"], ["model.local_attention=megatron"])
    name = "tensor_parallel.sdpa_attention.SdpaDotProductAttention"
    assert name in sdpa and name not in unfused


def test_a_mask_is_converted_once_for_every_layer() -> None:
    import torch

    from tensor_parallel.sdpa_attention import _additive_mask

    masked = torch.tensor([[False, True], [False, False]])
    first = _additive_mask(masked, torch.float32)
    assert first.tolist() == [[0.0, -10000.0], [0.0, 0.0]]
    assert _additive_mask(masked, torch.float32) is first  # the next layer: the same tensor
    assert _additive_mask(masked, torch.bfloat16) is not first
    masked[1, 0] = True  # changed in place: converted again
    assert (_additive_mask(masked, torch.bfloat16) < 0).tolist() == [[False, True], [True, False]]
    assert _additive_mask(masked.clone(), torch.bfloat16) is not first
