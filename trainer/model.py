"""Build the Llama-style megatron `GPTModel` (RMSNorm, SwiGLU, RoPE, GQA) from the run config.

Local (megatron-only) layer spec in fp32 on CPU, with SDPA core attention; Transformer Engine
spec with bf16 and optional FP8 on GPU. Model chunks follow the pipeline layout: one per rank, or `vpp` interleaved chunks.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.spec_utils import ModuleSpec

from kiln.errors import ConfigError
from kiln.log import get_logger
from tensor_parallel import SequenceParallelTorchNorm, check_model_fits, runtime
from tensor_parallel.fused_ops import FusedRopeSelfAttention, SwiGLU
from tensor_parallel.sdpa_attention import SdpaDotProductAttention
from trainer.config import ModelConfig, RunConfig

log = get_logger(__name__)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Round up like Megatron so each TP rank holds an equal slice.

    Megatron pads to a multiple of `divisible_by × tp`; we pad to lcm(divisible_by, tp) so the
    padded size (which enters the softmax) does not change between TP=1 and TP=2 runs.
    """
    multiple = math.lcm(divisible_by, tp)
    return -(-vocab_size // multiple) * multiple


def have_transformer_engine() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def have_wgrad_fusion() -> bool:
    """APEX's `fused_weight_gradient_mlp_cuda`: megatron's own linear layers (the output layer
    under either spec) need it for gradient-accumulation fusion; TE's layers fuse natively."""
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except ImportError:
        return False
    return True


def check_fits_layout(m: ModelConfig, seq_length: int, sequence_parallel: bool) -> None:
    """`check_model_fits` for model config `m` under this rank's initialised layout."""
    check_model_fits(runtime.layout(), num_layers=m.num_layers,
                     num_attention_heads=m.num_attention_heads,
                     num_query_groups=m.num_query_groups or m.num_attention_heads,
                     seq_length=seq_length, sequence_parallel=sequence_parallel)


def check_model_config(cfg: RunConfig) -> None:
    """Startup errors for combinations this machine cannot run."""
    m = cfg.model
    if m.transformer_impl == "transformer_engine" and not have_transformer_engine():
        raise ConfigError("model.transformer_impl", "transformer_engine is not installed "
                          "(pip install 'llmkiln[gpu]' on a CUDA host) - use 'local'")
    if m.fp8 is not None and m.transformer_impl != "transformer_engine":
        raise ConfigError("model.fp8", "FP8 needs model.transformer_impl=transformer_engine "
                          "(Transformer Engine on a Hopper/Blackwell GPU)")
    if cfg.parallel.cp > 1 and m.transformer_impl != "transformer_engine" and \
            m.local_attention != "sdpa":
        raise ConfigError("parallel.cp", "context parallelism needs Transformer Engine attention "
                          "or the local spec's SDPA attention (model.local_attention=sdpa)")
    if m.precision == "bf16" and not runtime.on_gpu():
        log.warning("model.precision=bf16 on CPU: the GPU's mixed-precision path (bf16 weights, "
                    "fp32 main parameters and gradients) runs for checking; fp32 is the CPU's "
                    "fast path")


def transformer_config(cfg: RunConfig) -> TransformerConfig:
    m, p = cfg.model, cfg.parallel
    on_gpu = runtime.on_gpu()
    te = m.transformer_impl == "transformer_engine"
    bf16 = m.precision == "bf16"
    recompute = {"none": None, "selective": "selective", "full": "full"}[m.recompute]
    extra: dict[str, Any] = {}
    if m.fp8 is not None:
        extra.update(fp8=m.fp8_format, fp8_recipe=m.fp8, fp8_param=False)
    if recompute == "full":
        extra.update(recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(
        num_layers=m.num_layers, hidden_size=m.hidden_size, ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        normalization="RMSNorm", layernorm_epsilon=m.norm_epsilon, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=m.qkv_bias,
        hidden_dropout=m.hidden_dropout, attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        cuda_graph_scope=[],  # megatron's default ("full") is deprecated by itself and warns
        tensor_model_parallel_size=p.tp, pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp if p.vpp and p.vpp > 1 else None,
        context_parallel_size=p.cp, sequence_parallel=p.sequence_parallel,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, bf16=bf16,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_gpu, perform_initialization=True,
        # weight gradients accumulate straight into the fp32 main_grad buffer in the GEMM, as
        # Megatron-LM does by default (NGC images ship the kernel); on CPU the unfused add is all
        # there is
        gradient_accumulation_fusion=on_gpu and have_wgrad_fusion(), masked_softmax_fusion=on_gpu,
        bias_activation_fusion=on_gpu, bias_dropout_fusion=on_gpu, persist_layer_norm=False,
        apply_rope_fusion=False,
        # the local spec's MLP calls `fused_ops.SwiGLU` on the whole fc1 output on CPU; on GPU
        # megatron's own `bias_swiglu_impl` (a compiled kernel) is the fused path
        use_te_activation_func=not te and m.local_fusions and not on_gpu,
        attention_backend=AttnBackend.auto if te else AttnBackend.local,
        calculate_per_token_loss=True, recompute_granularity=recompute,
        # Interleaved schedules with batched p2p send wrong tensors when prev == next peer
        # (PP=2); Megatron-LM also overlaps p2p whenever VPP is on.
        overlap_p2p_comm=bool(p.vpp and p.vpp > 1), batch_p2p_comm=not (p.vpp and p.vpp > 1),
        batch_p2p_sync=on_gpu, deallocate_pipeline_outputs=True,
        **extra,
    )


def _layer_spec(cfg: RunConfig, config: TransformerConfig, vp_stage: int | None) -> Any:
    use_te = cfg.model.transformer_impl == "transformer_engine"
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=use_te,
                                      normalization="RMSNorm", vp_stage=vp_stage)
    if not use_te:
        # torch norms, with sequence-parallel grads reduced over TP (see SequenceParallelTorchNorm)
        norm = ModuleSpec(module=SequenceParallelTorchNorm,
                          params={"fused": cfg.model.local_fusions})
        spec.layer_norm = norm
        for layer in spec.layer_specs:
            layer.submodules.input_layernorm = norm
            layer.submodules.pre_mlp_layernorm = norm
            if cfg.model.local_attention == "sdpa":
                layer.submodules.self_attention.submodules.core_attention = SdpaDotProductAttention
            if cfg.model.local_fusions:
                layer.submodules.self_attention.module = FusedRopeSelfAttention
            if config.use_te_activation_func:
                layer.submodules.mlp.submodules.activation_func = SwiGLU
    return spec


def build_gpt_chunks(cfg: RunConfig, vocab_size: int,
                     model_class: type[GPTModel] = GPTModel) -> list[GPTModel]:
    """This rank's model chunks (one, or `vpp` with interleaved pipelining), initialised.

    `model_class`: a `GPTModel` subclass with the same constructor (e.g. a reward model's).
    """
    config = transformer_config(cfg)
    chunks = []
    vpp = cfg.parallel.vpp if cfg.parallel.vpp and cfg.parallel.vpp > 1 else None
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunk = model_class(
            config=config, transformer_layer_spec=_layer_spec(cfg, config, stage),
            vocab_size=vocab_size,
            max_sequence_length=cfg.model.max_position_embeddings or cfg.train.seq_length,
            pre_process=runtime.is_first_stage(stage), post_process=runtime.is_last_stage(stage),
            share_embeddings_and_output_weights=cfg.model.tie_embeddings,
            position_embedding_type="rope", rotary_base=cfg.model.rotary_base,
            rope_scaling=cfg.model.rope_scaling_factor is not None,
            rope_scaling_factor=cfg.model.rope_scaling_factor or 8.0,
            parallel_output=True, vp_stage=stage)
        chunks.append(chunk)
    if cfg.model.layout_independent_init:
        for chunk in chunks:
            layout_independent_init(chunk, cfg.train.seed, cfg.model.init_method_std,
                                    cfg.model.num_layers)
    if runtime.on_gpu():
        chunks = [c.cuda(torch.cuda.current_device()) for c in chunks]
    n_local = sum(p.numel() for c in chunks for p in c.parameters())
    log.info("model: %d layers, hidden %d, vocab %d; %.2fM parameters on this rank",
             cfg.model.num_layers, cfg.model.hidden_size, vocab_size, n_local / 1e6)
    return chunks


def _sharded_tensors(tree: Any) -> Iterator[ShardedTensor]:
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _sharded_tensors(tree=value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _sharded_tensors(value)
    elif isinstance(tree, ShardedTensorFactory):
        yield from _sharded_tensors(tree.build())
    elif isinstance(tree, ShardedTensor):
        yield tree


@torch.no_grad()
def layout_independent_init(model: GPTModel, seed: int, std: float, num_layers: int) -> None:
    """Re-draw every weight matrix so its value depends only on (seed, global key, index).

    Megatron's CPU initialisation draws full weights in module order on each rank, so a PP stage
    or a TP split of the SwiGLU matrix sees different numbers than a one-rank run. Here each
    global tensor (as named by the model's own `sharded_state_dict`, which knows every split) is
    drawn whole from its own seeded generator and this rank copies its slice: TP, PP, VPP and DP
    runs start from bit-identical models. Norm weights keep megatron's ones.
    """
    out_std = std / math.sqrt(2.0 * num_layers)
    for st in _sharded_tensors(model.sharded_state_dict()):
        if st.flattened_range is not None or not st.key.endswith(".weight") or "norm" in st.key:
            continue
        if not torch.is_floating_point(st.data):
            continue
        n_pre = st.prepend_axis_num
        layer_idx = st.global_offset[:n_pre]
        name = f"{st.key}|{','.join(map(str, layer_idx))}"
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        full = torch.randn(st.global_shape[n_pre:], generator=gen, dtype=torch.float32)
        scale = out_std if st.key.endswith(("linear_proj.weight", "linear_fc2.weight")) else std
        index = tuple(slice(o, o + n)
                      for o, n in zip(st.global_offset[n_pre:], st.local_shape, strict=True))
        st.data.copy_(full[index].mul_(scale))
    model.setup_embeddings_and_output_layer()
