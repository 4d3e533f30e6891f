"""Hugging Face `config.json` <-> the trainer's `ModelConfig`, for the families megatron can run.

Supported: `LlamaForCausalLM` (Llama 2/3, incl. Llama 3.x RoPE scaling), `MistralForCausalLM`
and `Qwen2ForCausalLM` (bias on Q/K/V only). Whatever the trainer's megatron `GPTModel` cannot
represent exactly is refused with the offending key named: a converted model that silently
computes something else is worse than no model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kiln.errors import DataError
from trainer.config import ModelConfig

# architecture -> (family, model_type)
FAMILIES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "llama"),
    "MistralForCausalLM": ("mistral", "mistral"),
    "Qwen2ForCausalLM": ("qwen2", "qwen2"),
}
ARCHITECTURE = {family: arch for arch, (family, _) in FAMILIES.items()}

# megatron-core 0.16.1 `RotaryEmbedding._apply_scaling` takes only `factor` from GPTModel; the
# other Llama 3 parameters are fixed at these values.
MEGATRON_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}


@dataclass
class HFModel:
    """What an HF config means for the trainer: the model section, and what was set aside."""

    family: str
    architecture: str
    model: ModelConfig
    vocab_size: int
    dtype: str | None
    warnings: list[str] = field(default_factory=list)


def _require(hf: dict[str, Any], key: str, path: str) -> Any:
    if key not in hf:
        raise DataError(f"missing '{key}'", path=path, field=key)
    return hf[key]


def rope_spec(hf: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(rope_type, parameters incl. rope_theta) from either the transformers 5 form
    (`rope_parameters`) or the 4.x form (`rope_theta` + `rope_scaling`)."""
    spec: dict[str, Any] = {"rope_theta": hf.get("rope_theta", 10000.0)}
    spec.update(hf.get("rope_scaling") or {})
    spec.update(hf.get("rope_parameters") or {})
    rope_type = spec.get("rope_type", spec.get("type", "default"))
    return str(rope_type), spec


def _rope(hf: dict[str, Any], path: str) -> tuple[int, float | None]:
    rope_type, spec = rope_spec(hf)
    theta = float(spec["rope_theta"])
    if theta != int(theta):
        raise DataError(f"rope_theta {theta} is not an integer (the trainer's rotary_base is)",
                        path=path, field="rope_theta")
    if rope_type == "default":
        return int(theta), None
    if rope_type != "llama3":
        raise DataError(f"rope_type '{rope_type}' cannot be represented by megatron-core 0.16.1's "
                        "GPTModel (it does 'default' and Llama 3 'llama3' scaling only)",
                        path=path, field="rope_parameters.rope_type")
    for key, fixed in MEGATRON_LLAMA3_ROPE.items():
        if not math.isclose(float(spec.get(key, fixed)), fixed):
            raise DataError(f"llama3 RoPE scaling with {key}={spec.get(key)}: megatron-core 0.16.1 "
                            f"fixes it at {fixed:g} (only 'factor' is configurable)",
                            path=path, field=f"rope_parameters.{key}")
    return int(theta), float(_require(spec, "factor", path))


def _sliding_window(hf: dict[str, Any], family: str) -> int | None:
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    window = hf.get("sliding_window")
    return int(window) if window else None


def model_from_hf(hf: dict[str, Any], path: str) -> HFModel:
    """Map an HF config (the parsed `config.json` at `path`) onto `ModelConfig`."""
    archs = hf.get("architectures") or []
    if len(archs) != 1 or archs[0] not in FAMILIES:
        raise DataError(f"unsupported architecture {archs or hf.get('model_type')!r}; "
                        f"supported: {', '.join(FAMILIES)}", path=path, field="architectures")
    arch = archs[0]
    family = FAMILIES[arch][0]
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if hf.get(key):
            raise DataError("mixture-of-experts models are not supported", path=path, field=key)
    if hf.get("hidden_act", "silu") != "silu":
        raise DataError(f"hidden_act '{hf['hidden_act']}': the trainer's MLP is SwiGLU (silu)",
                        path=path, field="hidden_act")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise DataError(f"{key}=true (bias on every projection) is not supported; only Qwen2's "
                            "Q/K/V bias is", path=path, field=key)
    hidden = int(_require(hf, "hidden_size", path))
    heads = int(_require(hf, "num_attention_heads", path))
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    if hidden % heads:
        raise DataError(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}",
                        path=path, field="hidden_size")
    if heads % kv_heads:
        raise DataError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                        f"{kv_heads}", path=path, field="num_key_value_heads")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) != hidden // heads:
        raise DataError(f"head_dim {head_dim} != hidden_size / num_attention_heads "
                        f"({hidden // heads}); the trainer derives head_dim", path=path,
                        field="head_dim")
    rotary_base, rope_factor = _rope(hf, path)
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    warnings = []
    window = _sliding_window(hf, family)
    if window is not None and window < max_pos:
        warnings.append(f"sliding_window={window} is not implemented by the trainer (full causal "
                        f"attention): identical to HF only up to {window} tokens, so "
                        f"max_position_embeddings is lowered from {max_pos} to {window}; keep "
                        f"train.seq_length <= {window}")
        max_pos = window
    elif window is not None:
        warnings.append(f"sliding_window={window} >= max_position_embeddings={max_pos}: it never "
                        "takes effect and is ignored")
    vocab = int(_require(hf, "vocab_size", path))
    model = ModelConfig(
        num_layers=int(_require(hf, "num_hidden_layers", path)), hidden_size=hidden,
        ffn_hidden_size=int(_require(hf, "intermediate_size", path)),
        num_attention_heads=heads, num_query_groups=kv_heads, vocab_size=vocab,
        max_position_embeddings=max_pos, rotary_base=rotary_base,
        rope_scaling_factor=rope_factor, qkv_bias=family == "qwen2",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)))
    dtype = hf.get("dtype", hf.get("torch_dtype"))
    return HFModel(family, arch, model, vocab, str(dtype) if dtype else None, warnings)


def hf_from_model(model: ModelConfig, vocab_size: int, dtype: str,
                  base: dict[str, Any] | None = None, family: str | None = None) -> dict[str, Any]:
    """An HF config for `model`: `base` (the imported model's config) with every field the
    weights depend on rewritten; without a base, Qwen2 when the model has a QKV bias, else Llama."""
    family = family or ("qwen2" if model.qkv_bias else "llama")
    arch = ARCHITECTURE[family]
    cfg = dict(base or {})
    for key in ("torch_dtype", "rope_scaling", "rope_parameters", "rope_theta"):
        cfg.pop(key, None)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(model.rotary_base)}
    if model.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=model.rope_scaling_factor, **MEGATRON_LLAMA3_ROPE)
    heads = model.num_attention_heads
    cfg.update(
        architectures=[arch], model_type=FAMILIES[arch][1], hidden_act="silu",
        hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=heads,
        num_key_value_heads=model.num_query_groups or heads,
        head_dim=model.hidden_size // heads, vocab_size=vocab_size,
        max_position_embeddings=cfg.get("max_position_embeddings")
        or model.max_position_embeddings or 4096,
        rms_norm_eps=model.norm_epsilon, tie_word_embeddings=model.tie_embeddings,
        initializer_range=model.init_method_std, attention_dropout=model.attention_dropout,
        dtype=dtype,
        # transformers 5 reads `rope_parameters`; 4.x reads `rope_theta` + `rope_scaling`.
        rope_parameters=rope, rope_theta=rope["rope_theta"],
        rope_scaling=None if rope["rope_type"] == "default"
        else {k: v for k, v in rope.items() if k != "rope_theta"})
    if family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    return cfg
