"""Parameter names and layouts: Hugging Face Llama/Mistral/Qwen2 <-> megatron `GPTModel`.

Megatron keys are the global checkpoint keys of the model's `sharded_state_dict` (what
`dist_checkpointing` stores): per-layer weights are one tensor stacked over layers
(`decoder.layers.<name>` with a leading layer axis), and the norms sit under the names the
Transformer Engine spec uses (`linear_qkv.layer_norm_weight`), which the local spec maps to too.

Layouts that differ from Hugging Face:
- `linear_qkv` is grouped per KV head, as TP splits it: for each query group, its
  `heads / groups` query heads, then its key head, then its value head (same for the bias).
- `linear_fc1` is `[gate; up]` (SwiGLU: `silu(gate) * up`).
RoPE needs no permutation: HF's `rotate_half` is megatron's non-interleaved rotary layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from trainer.config import ModelConfig

LAYERS = "decoder.layers."
# Modules whose (empty, for the local spec) `_extra_state` megatron stores per layer as objects.
EXTRA_STATE_MODULES = ("self_attention.linear_proj", "self_attention.linear_qkv",
                       "mlp.linear_fc1", "mlp.linear_fc2")


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    ffn: int
    heads: int
    groups: int
    vocab: int
    tied: bool
    qkv_bias: bool

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def qkv_rows(self) -> int:
        return (self.heads + 2 * self.groups) * self.head_dim

    @classmethod
    def of(cls, model: ModelConfig, vocab: int) -> Dims:
        return cls(layers=model.num_layers, hidden=model.hidden_size, ffn=model.ffn_hidden_size,
                   heads=model.num_attention_heads,
                   groups=model.num_query_groups or model.num_attention_heads, vocab=vocab,
                   tied=model.tie_embeddings, qkv_bias=model.qkv_bias)


@dataclass(frozen=True)
class Param:
    """One megatron tensor (per layer when `layered`) and the HF tensors it is made of."""

    key: str
    shape: tuple[int, ...]  # of one layer's slice when layered
    hf: tuple[str, ...]  # HF names; "{i}" is the layer index
    kind: str  # "copy", "qkv" or "gate_up"
    layered: bool

    def hf_names(self, layer: int | None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]


def params(d: Dims) -> list[Param]:
    """Every megatron tensor of the model, in checkpoint order."""
    attn, mlp = "model.layers.{i}.self_attn.", "model.layers.{i}.mlp."
    out = [Param("embedding.word_embeddings.weight", (d.vocab, d.hidden),
                 ("model.embed_tokens.weight",), "copy", False)]
    layer = [
        Param("self_attention.linear_qkv.layer_norm_weight", (d.hidden,),
              ("model.layers.{i}.input_layernorm.weight",), "copy", True),
        Param("self_attention.linear_qkv.weight", (d.qkv_rows, d.hidden),
              (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), "qkv", True),
        Param("self_attention.linear_proj.weight", (d.hidden, d.heads * d.head_dim),
              (attn + "o_proj.weight",), "copy", True),
        Param("mlp.linear_fc1.layer_norm_weight", (d.hidden,),
              ("model.layers.{i}.post_attention_layernorm.weight",), "copy", True),
        Param("mlp.linear_fc1.weight", (2 * d.ffn, d.hidden),
              (mlp + "gate_proj.weight", mlp + "up_proj.weight"), "gate_up", True),
        Param("mlp.linear_fc2.weight", (d.hidden, d.ffn), (mlp + "down_proj.weight",), "copy",
              True),
    ]
    if d.qkv_bias:
        layer.insert(2, Param("self_attention.linear_qkv.bias", (d.qkv_rows,),
                              (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                              "qkv", True))
    out += [Param(LAYERS + p.key, p.shape, p.hf, p.kind, True) for p in layer]
    out.append(Param("decoder.final_layernorm.weight", (d.hidden,), ("model.norm.weight",), "copy",
                     False))
    if not d.tied:
        out.append(Param("output_layer.weight", (d.vocab, d.hidden), ("lm_head.weight",), "copy",
                         False))
    return out


def stacked(p: Param, d: Dims) -> tuple[int, ...]:
    """The global checkpoint shape: layered tensors get a leading layer axis."""
    return (d.layers, *p.shape) if p.layered else p.shape


def hf_shapes(p: Param, d: Dims) -> list[tuple[int, ...]]:
    """Expected shape of each HF tensor of `p`."""
    if p.kind == "qkv":
        kv = d.groups * d.head_dim
        rows = [d.heads * d.head_dim, kv, kv]
        return [(r, *p.shape[1:]) for r in rows]
    if p.kind == "gate_up":
        return [(d.ffn, d.hidden)] * 2
    return [p.shape]


def to_megatron(p: Param, hf: list[torch.Tensor], d: Dims) -> torch.Tensor:
    """The megatron tensor (one layer's slice) from its HF tensors."""
    if p.kind == "copy":
        return hf[0]
    if p.kind == "gate_up":
        return torch.cat(hf, dim=0)
    q, k, v = hf
    g, dh, rest = d.groups, d.head_dim, q.shape[1:]
    per_group = [q.reshape(g, -1, *rest), k.reshape(g, dh, *rest), v.reshape(g, dh, *rest)]
    return torch.cat(per_group, dim=1).reshape(d.qkv_rows, *rest)


def to_hf(p: Param, tensor: torch.Tensor, d: Dims) -> list[torch.Tensor]:
    """Inverse of `to_megatron`: the HF tensors (in `p.hf` order), each contiguous."""
    if p.kind == "copy":
        return [tensor.contiguous()]
    if p.kind == "gate_up":
        return [t.contiguous() for t in tensor.split(d.ffn, dim=0)]
    g, dh, rest = d.groups, d.head_dim, tensor.shape[1:]
    q_rows = d.heads // g * dh
    q, k, v = tensor.reshape(g, q_rows + 2 * dh, *rest).split([q_rows, dh, dh], dim=1)
    return [t.reshape(-1, *rest).contiguous() for t in (q, k, v)]


def extra_state_key(module: str, layer: int, layers: int) -> str:
    """The unique key megatron gives a layer's `_extra_state` object (one per global layer)."""
    return f"{LAYERS}{module}._extra_state/shard_{layer}_{layers}"


def hf_names(d: Dims) -> Iterator[str]:
    """Every HF tensor name the model has."""
    for p in params(d):
        for layer in range(d.layers) if p.layered else [None]:
            yield from p.hf_names(layer)
