"""Measure a real megatron GPTModel on CPU: parameter count, training-state bytes, saved activations.

Run as a script (its own process: it initialises a one-rank gloo group and patches megatron's
CUDA-only device and RNG lookups for this process only). Reads a JSON list of model configs on
stdin and prints one JSON list of measurements.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def _cpu_megatron() -> None:
    # megatron-core 0.16 allocates on torch.cuda.current_device(), forks CUDA RNG state in its
    # attention dropout and saves/restores it around recomputation; on a CPU-only build all of
    # these must resolve to the CPU (whose generator megatron saves and restores anyway).
    torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRngTracker(mrandom.CudaRNGStatesTracker):
        def fork(self, name: str = "model-parallel-rng"):
            return torch.random.fork_rng(devices=[])

    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *args, **kwargs: None
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRngTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    parallel_state.initialize_model_parallel(1, 1)


def saved_for_backward(model: torch.nn.Module, forward) -> tuple[torch.Tensor, int]:
    """`forward()`'s output and the bytes of the distinct storages autograd saved for its
    backward, the model's weights excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # weights are not activations
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = forward()
    return output, sum(saved.values())


def measure(cfg: dict) -> dict:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.module import Float16Module

    bf16 = cfg["dtype"] == "bf16"
    recompute = {"none": {},
                 "selective": {"recompute_granularity": "selective",
                               "recompute_modules": ["core_attn"]},
                 "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                          "recompute_num_layers": 1}}[cfg.get("recompute", "none")]
    config = TransformerConfig(
        num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["ffn_hidden_size"], num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_query_groups"], kv_channels=cfg.get("kv_channels"),
        normalization=cfg["normalization"], gated_linear_unit=cfg["gated_linear_unit"],
        activation_func=torch.nn.functional.silu if cfg["gated_linear_unit"] else torch.nn.functional.gelu,
        add_bias_linear=cfg["add_bias_linear"], hidden_dropout=cfg["hidden_dropout"],
        attention_dropout=cfg["attention_dropout"],
        use_cpu_initialization=True, gradient_accumulation_fusion=False,
        masked_softmax_fusion=False, bias_activation_fusion=False, persist_layer_norm=False,
        apply_rope_fusion=False, bf16=bf16, params_dtype=torch.bfloat16 if bf16 else torch.float32,
        **recompute,
    )
    model = GPTModel(config, get_gpt_layer_local_spec(normalization=cfg["normalization"]),
                     vocab_size=cfg["vocab_size"], max_sequence_length=cfg["seq_length"],
                     position_embedding_type="rope",
                     share_embeddings_and_output_weights=cfg["tie_embeddings"])
    result = {"params": sum(p.numel() for p in model.parameters())}
    wrapped = Float16Module(config, model) if bf16 else model

    s, b = cfg["seq_length"], cfg["micro_batch_size"]
    ids = torch.randint(0, cfg["vocab_size"], (b, s))
    position_ids = torch.arange(s).expand(b, s)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    loss, result["activation_bytes"] = saved_for_backward(
        model, lambda: wrapped(ids, position_ids, causal, labels=ids))

    if not bf16 and not recompute:  # fp32 training state with torch Adam: weights, grads and both moments
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss.float().mean().backward()
        optimizer.step()
        result["weight_bytes"] = sum(p.nbytes for p in model.parameters())
        result["grad_bytes"] = sum(p.grad.nbytes for p in model.parameters())
        result["optimizer_bytes"] = sum(v.nbytes for st in optimizer.state.values()
                                        for k, v in st.items() if k != "step")
    return result


def main() -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        _cpu_megatron()
        print(json.dumps([measure(cfg) for cfg in json.load(sys.stdin)]))
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
