"""HF config.json <-> ModelConfig, the refusals, and the QKV / SwiGLU layouts (no megatron here)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from kiln.errors import DataError
from tests.trainer.hf_util import COMMON, FAMILIES
from trainer.config import ModelConfig
from trainer.hf.config_map import hf_from_model, model_from_hf
from trainer.hf.mapping import Dims, hf_names, hf_shapes, params, to_hf, to_megatron

ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def hf_config(family: str, **changes) -> dict:
    cfg = {"architectures": [ARCH[family]], "model_type": family, "hidden_act": "silu",
           **copy.deepcopy(COMMON), **copy.deepcopy(FAMILIES[family])}
    cfg.update(changes)
    return cfg


def test_llama3_maps_rope_scaling_gqa_and_norms() -> None:
    m = model_from_hf(hf_config("llama"), "config.json")
    assert (m.family, m.vocab_size, m.warnings) == ("llama", 300, [])
    c = m.model
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (2, 64, 96)
    assert (c.num_attention_heads, c.num_query_groups) == (4, 2)
    assert (c.rotary_base, c.rope_scaling_factor, c.norm_epsilon) == (500000, 8.0, 1e-5)
    assert not c.qkv_bias and not c.tie_embeddings


def test_qwen2_has_qkv_bias_and_tied_embeddings() -> None:
    c = model_from_hf(hf_config("qwen2"), "config.json").model
    assert c.qkv_bias and c.tie_embeddings and c.rope_scaling_factor is None
    assert c.rotary_base == 1000000


def test_transformers4_rope_keys_map_like_rope_parameters() -> None:
    legacy = hf_config("llama", rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})
    del legacy["rope_parameters"]
    assert model_from_hf(legacy, "c") == model_from_hf(hf_config("llama"), "c")


@pytest.mark.parametrize(("changes", "field"), [
    ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
    ({"architectures": ["MixtralForCausalLM"]}, "architectures"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"head_dim": 32}, "head_dim"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     "rope_parameters.rope_type"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 64}},
     "rope_parameters.original_max_position_embeddings"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.5}}, "rope_theta"),
])
def test_unrepresentable_configs_are_refused_naming_the_key(changes: dict, field: str) -> None:
    with pytest.raises(DataError) as err:
        model_from_hf(hf_config("llama", **changes), "config.json")
    assert err.value.field == field and "config.json" in str(err.value)


def test_mistral_sliding_window_shorter_than_context_caps_positions_with_a_warning() -> None:
    m = model_from_hf(hf_config("mistral", sliding_window=4096), "c")
    assert m.model.max_position_embeddings == 4096
    assert "sliding_window=4096" in m.warnings[0] and "seq_length <= 4096" in m.warnings[0]
    ignored = model_from_hf(hf_config("mistral"), "c")  # window 16384 == max positions
    assert ignored.model.max_position_embeddings == 16384 and "ignored" in ignored.warnings[0]


def test_exported_config_reads_back_to_the_same_model_in_transformers(tmp_path) -> None:
    from transformers import AutoConfig

    for family in ARCH:
        m = model_from_hf(hf_config(family), "c")
        exported = hf_from_model(m.model, m.vocab_size, "float32", family=family)
        assert model_from_hf(exported, "c").model == m.model
        (tmp_path / "config.json").write_text(json.dumps(exported))
        read = AutoConfig.from_pretrained(str(tmp_path))
        assert read.rope_parameters["rope_theta"] == m.model.rotary_base
        assert read.rope_parameters.get("factor") == m.model.rope_scaling_factor
        assert read.num_key_value_heads == 2 and read.tie_word_embeddings == m.model.tie_embeddings


def dims(heads: int = 4, groups: int = 2) -> Dims:
    model = ModelConfig(num_layers=1, hidden_size=heads * 2, ffn_hidden_size=6,
                        num_attention_heads=heads, num_query_groups=groups, qkv_bias=True)
    return Dims.of(model, vocab=10)


def test_qkv_is_grouped_per_kv_head_as_megatron_splits_it() -> None:
    d = dims()  # 4 query heads, 2 groups, head_dim 2

    def label(tag: int, rows: int) -> torch.Tensor:  # row r of HF tensor `tag` holds tag*10 + r
        return torch.tensor([[tag * 10 + r] * d.hidden for r in range(rows)], dtype=torch.float32)

    qkv = next(p for p in params(d) if p.key.endswith("linear_qkv.weight"))
    fused = to_megatron(qkv, [label(1, 8), label(2, 4), label(3, 4)], d)
    # rows: group 0 = q heads 0,1 (rows 10-13), k head 0 (20,21), v head 0 (30,31); then group 1
    assert fused[:, 0].tolist() == [10, 11, 12, 13, 20, 21, 30, 31, 14, 15, 16, 17, 22, 23, 32, 33]
    # megatron's attention: view [groups, (q_per_group + 2) * head_dim] and split [q, k, v]
    q, k, v = fused[:, 0].view(2, 8).split([4, 2, 2], dim=1)
    assert q.flatten().tolist() == list(range(10, 18)) and k.flatten().tolist() == [20, 21, 22, 23]


@pytest.mark.parametrize(("heads", "groups"), [(4, 2), (4, 4), (4, 1), (6, 3)])
def test_layout_changes_invert_exactly(heads: int, groups: int) -> None:
    d = dims(heads, groups)
    gen = torch.Generator().manual_seed(0)
    for p in params(d):
        hf = [torch.randn(s, generator=gen) for s in hf_shapes(p, d)]
        back = to_hf(p, to_megatron(p, hf, d), d)
        assert all(torch.equal(a, b) for a, b in zip(hf, back, strict=True)), p.key
    assert sum(1 for _ in hf_names(d)) == 1 + 12 + 1 + 1  # embed, layer (with bias), norm, head
