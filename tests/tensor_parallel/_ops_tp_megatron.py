"""TP checks of the vocab-parallel ops against megatron itself (run inside a spawned rank).

- `vocab_parallel_log_probs` equals minus megatron's `vocab_parallel_cross_entropy`, value and
  gradient, and finds megatron's TP group by itself when no group is passed.
- `kiln plan`'s per-rank parameter count equals what a TP=2 megatron `GPTModel` holds per rank.
- Logits from megatron's `ColumnParallelLinear` output layer with sequence parallelism (the
  hidden states arrive split along the sequence and the layer all-gathers them) give the same
  log-probabilities and input/weight gradients as one rank with the full weight.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tensor_parallel.vocab_parallel import resolve_group, vocab_parallel_log_probs


def _cpu_megatron(tp: int) -> None:
    # megatron-core 0.16 allocates its all-gather buffers on torch.cuda.current_device().
    torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core import parallel_state

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)


def check_megatron(c, rank: int, tp: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    _cpu_megatron(tp)
    c.checks += 1
    if resolve_group(None) is not parallel_state.get_tensor_model_parallel_group():
        c.failures.append(f"rank {rank}: group=None did not resolve to megatron's TP group")

    gen = torch.Generator().manual_seed(99)
    full = torch.randn(6, 2, 32, generator=gen) * 5
    targets = torch.randint(0, 32, (6, 2), generator=gen)
    g = torch.randn(6, 2, generator=gen)
    shard = full.shape[-1] // tp
    local = full[..., rank * shard:(rank + 1) * shard]
    ours_in = local.clone().requires_grad_(True)
    ours = vocab_parallel_log_probs(ours_in, targets)  # default group: megatron's
    (ours * g).sum().backward()
    theirs_in = local.clone().requires_grad_(True)
    theirs = -vocab_parallel_cross_entropy(theirs_in.clone(), targets)
    (theirs * g).sum().backward()
    c.close("megatron cross entropy value", ours, theirs, 1e-6)
    c.close("megatron cross entropy grad", ours_in.grad, theirs_in.grad, 1e-6)

    check_sequence_parallel_output_layer(c, rank, tp)
    check_parameters_per_rank(c, rank, tp)
    parallel_state.destroy_model_parallel()


def check_parameters_per_rank(c, rank: int, tp: int) -> None:
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    from tensor_parallel.plan import Layout, ModelShape
    from tensor_parallel.plan.memory import stage_parameters

    shape = ModelShape(2, 64, 176, 8, 2, 1000, 32, make_vocab_size_divisible_by=64)
    config = TransformerConfig(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=8,
        num_query_groups=2, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False,
        tensor_model_parallel_size=tp, use_cpu_initialization=True,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False,
        bias_activation_fusion=False, persist_layer_norm=False)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=shape.padded_vocab_size(tp), max_sequence_length=32,
                     position_embedding_type="rope", share_embeddings_and_output_weights=False)
    held = sum(p.numel() for p in model.parameters())
    expected = stage_parameters(shape, Layout(tp, 1, 1), 0)
    c.checks += 1
    if held != expected:
        c.failures.append(f"rank {rank}: megatron holds {held} parameters, plan says {expected}")


def check_sequence_parallel_output_layer(c, rank: int, tp: int) -> None:
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear

    s, b, h, vocab = 8, 2, 12, 32
    torch.manual_seed(5)  # same master weight on every rank; megatron splits it
    config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=True,
                                 use_cpu_initialization=True, params_dtype=torch.float64,
                                 gradient_accumulation_fusion=False)
    layer = ColumnParallelLinear(h, vocab, config=config, init_method=torch.nn.init.normal_,
                                 bias=False, gather_output=False, skip_bias_add=True)
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(s, b, h, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (s, b), generator=gen)
    g = torch.randn(s, b, generator=gen, dtype=torch.float64)

    weight = torch.empty(vocab, h, dtype=torch.float64)
    dist.all_gather_into_tensor(weight, layer.weight.detach().contiguous())
    ref_hidden = hidden.clone().requires_grad_(True)
    ref_weight = weight.clone().requires_grad_(True)
    ref_logp = torch.log_softmax(ref_hidden @ ref_weight.t(), -1)
    ref = ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    (ref * g).sum().backward()

    piece = s // tp  # sequence-parallel input: this rank's part of the sequence
    local_hidden = hidden[rank * piece:(rank + 1) * piece].clone().requires_grad_(True)
    logits, _ = layer(local_hidden)
    c.checks += 1
    if tuple(logits.shape) != (s, b, vocab // tp):
        c.failures.append(f"rank {rank}: SP output layer gave logits {tuple(logits.shape)}")
        return
    got = vocab_parallel_log_probs(logits, targets)
    (got * g).sum().backward()
    shard = vocab // tp
    c.close("SP output layer log_probs", got, ref, 1e-6)
    c.close("SP output layer hidden grad", local_hidden.grad,
            ref_hidden.grad[rank * piece:(rank + 1) * piece], 1e-6)
    c.close("SP output layer weight grad", layer.weight.grad if layer.weight.grad is not None
            else layer.weight.main_grad, ref_weight.grad[rank * shard:(rank + 1) * shard], 1e-6)
