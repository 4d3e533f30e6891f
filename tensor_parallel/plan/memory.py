"""Memory per GPU of a megatron GPT model in a TP x PP (x VPP) x DP layout, stage by stage.

Memory per GPU is counted tensor by tensor in the manner of Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models" (Table 2 and section 4), which Megatron-LM's
`theoretical_memory_usage.py` also follows, generalised to what Llama models run: grouped-query
attention, SwiGLU, RMSNorm, no dropout, untied or tied embeddings, a padded vocabulary.

- Parameters are counted exactly as megatron's `GPTModel` holds them, per pipeline stage and per
  tensor-parallel rank (column/row-parallel weights split over TP, norms replicated).
- Bytes per parameter follow Megatron's mixed-precision recipe: bf16 weights, fp32 main gradients,
  Adam with an fp32 master copy and two fp32 moments (12 bytes, sharded over DP by the distributed
  optimizer, ZeRO-1). FP8 (Transformer Engine) adds a cached FP8 copy of each GEMM weight and its
  transpose, and stores GEMM inputs in FP8.
- Activations are the tensors autograd keeps for backward, per micro-batch and layer, for three
  kernel sets: `te` (Transformer Engine on GPU: flash attention, fused norms and SwiGLU); `sdpa`
  (the trainer's local spec as it runs on CPU by default: torch's SDPA, flash on CPU, and the
  fused RMSNorm, SwiGLU and QKV-split + RoPE of `tensor_parallel/fused_ops.py`); and `local`
  (megatron's own local spec, `model.local_attention: megatron` with `model.local_fusions:
  false`: unfused attention with an s x s softmax, torch RMSNorm). Dropout is torch's CPU dropout
  for both CPU sets.
  The in-flight micro-batches per stage follow megatron's 1F1B and interleaved schedules.
- Context parallelism (`cp`) gives each rank s/cp of every sequence's tokens, so per-token
  activations shrink by cp. Under `te` (ring attention, megatron's default `p2p`) a rank keeps
  only its own K and V; under `sdpa` it keeps the whole sequence's K and V, gathered (the
  trainer's CPU path, TE's `all_gather` type), and one `[s/cp, s]` causal mask shared by every
  layer and micro-batch. megatron's unfused attention (`local`) has no CP. The distributed
  optimizer shards over dp x cp, the ranks that reduce gradients together.
- Not modelled: MoE, uneven pipeline splits, transient buffers (a backward's gradient in
  flight, workspaces), communication buffers and allocator fragmentation; the planner keeps a
  reserve for these and for the CUDA context. On CPU the estimate is checked against the
  measured peak of real training steps (single, full recompute, bf16, TP=2 with SP, PP=2,
  CP=2, DP=2 with ZeRO-1): never above it, and 2% to 17% below it at test sizes, where fixed
  buffers weigh most (the most where asynchronous collectives overlap the backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from kiln.errors import UsageError

Dtype = Literal["fp32", "bf16", "fp8"]
Backend = Literal["te", "sdpa", "local"]
Recompute = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[Recompute, ...] = ("none", "selective", "full")
GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    """The shape of a megatron GPT model (keys as in the trainer config's `model:` section)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    seq_length: int = 4096
    tie_embeddings: bool = False
    kv_channels: int | None = None
    gated_linear_unit: bool = True
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    make_vocab_size_divisible_by: int = 128
    name: str = "custom"

    def __post_init__(self) -> None:
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "num_query_groups", "vocab_size", "seq_length", "make_vocab_size_divisible_by"):
            if getattr(self, key) <= 0:
                raise UsageError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_query_groups:
            raise UsageError(f"model.num_attention_heads ({self.num_attention_heads}) is not "
                             f"divisible by model.num_query_groups ({self.num_query_groups})")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise UsageError(f"model.hidden_size ({self.hidden_size}) is not divisible by "
                             f"model.num_attention_heads ({self.num_attention_heads}); set kv_channels")

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_query_groups * self.head_dim

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron-LM pads the vocabulary to a multiple of `make_vocab_size_divisible_by * TP`."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


# Llama 3.2 1B, Llama 3.1 8B and Llama 3.1 70B as published (config.json of each checkpoint).
NAMED_MODELS: dict[str, ModelShape] = {
    "llama-1b": ModelShape(16, 2048, 8192, 32, 8, 128256, 8192, tie_embeddings=True, name="llama-1b"),
    "llama-8b": ModelShape(32, 4096, 14336, 32, 8, 128256, 8192, name="llama-8b"),
    "llama-70b": ModelShape(80, 8192, 28672, 64, 8, 128256, 8192, name="llama-70b"),
}


@dataclass(frozen=True)
class Layout:
    """One way to place the model on `tp * pp * cp * dp` GPUs; `vpp` chunks per stage when
    interleaved; `cp` ranks share each sequence (context parallelism)."""

    tp: int
    pp: int
    dp: int
    vpp: int | None = None
    sequence_parallel: bool = True
    cp: int = 1

    def __post_init__(self) -> None:
        if min(self.tp, self.pp, self.dp, self.cp) < 1 or (self.vpp is not None and self.vpp < 2):
            raise UsageError(f"layout tp={self.tp} pp={self.pp} cp={self.cp} dp={self.dp} "
                             f"vpp={self.vpp}: sizes must be positive and vpp, when given, at "
                             "least 2")

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def chunks(self) -> int:
        return self.vpp or 1

    def __str__(self) -> str:
        vpp = f" vpp{self.vpp}" if self.vpp else ""
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return f"tp{self.tp} pp{self.pp}{vpp}{cp} dp{self.dp}"


@dataclass(frozen=True)
class TrainingSetup:
    """What one optimizer step processes, and with which numerics and kernels."""

    seq_length: int
    micro_batch_size: int = 1
    global_batch_size: int = 512
    dtype: Dtype = "bf16"
    backend: Backend = "te"

    def num_microbatches(self, layout: Layout) -> int:
        per_step = self.micro_batch_size * layout.dp
        if self.global_batch_size % per_step:
            raise UsageError(f"global batch {self.global_batch_size} is not divisible by "
                             f"micro-batch {self.micro_batch_size} x dp {layout.dp}")
        return self.global_batch_size // per_step


@dataclass(frozen=True)
class StageMemory:
    """Bytes held by one GPU of pipeline stage `stage` (every TP and DP rank of it is alike)."""

    stage: int
    params: int
    weights: int
    gradients: int
    optimizer: int
    optimizer_distributed: int
    activations: dict[str, int]

    def total(self, distributed_optimizer: bool, recompute: Recompute) -> int:
        optimizer = self.optimizer_distributed if distributed_optimizer else self.optimizer
        return self.weights + self.gradients + optimizer + self.activations[recompute]


@dataclass(frozen=True)
class MemoryEstimate:
    """Per-stage memory of one layout; `peak` is the most loaded GPU for a setting."""

    layout: Layout
    num_microbatches: int
    stages: tuple[StageMemory, ...]

    def peak(self, distributed_optimizer: bool, recompute: Recompute) -> int:
        return max(s.total(distributed_optimizer, recompute) for s in self.stages)

    @property
    def heaviest(self) -> StageMemory:
        """The stage holding the most parameters (the one whose weight columns are shown)."""
        return max(self.stages, key=lambda s: s.params)

    def activations(self, recompute: Recompute) -> int:
        return max(s.activations[recompute] for s in self.stages)

    def summary(self, distributed_optimizer: bool, recompute: Recompute) -> str:
        """One log line for the most loaded GPU, e.g. for the trainer to print at start."""
        stage = max(self.stages, key=lambda s: s.total(distributed_optimizer, recompute))
        optimizer = stage.optimizer_distributed if distributed_optimizer else stage.optimizer
        total = stage.total(distributed_optimizer, recompute)
        parts = (("weights", stage.weights), ("grads", stage.gradients), ("optimizer", optimizer),
                 (f"activations ({recompute} recompute)", stage.activations[recompute]),
                 ("total", total))
        unit, size = ("GiB", GIB) if total >= GIB else ("MiB", 2**20)
        return (f"{self.layout}, pipeline stage {stage.stage}, {stage.params:,} parameters per GPU: "
                + ", ".join(f"{name} {n / size:.2f} {unit}" for name, n in parts))


# ---------------------------------------------------------------- parameters


def layer_parameters(model: ModelShape, tp: int = 1) -> int:
    """Parameters of one transformer layer on one TP rank (megatron local or TE spec)."""
    h, bias = model.hidden_size, model.add_bias_linear
    norm = h * (1 if model.normalization == "RMSNorm" else 2)
    qkv_out = model.query_size + 2 * model.kv_size
    fc1_out = model.ffn_hidden_size * (2 if model.gated_linear_unit else 1)
    split = (qkv_out * h + model.query_size * h + fc1_out * h + model.ffn_hidden_size * h
             + (qkv_out + fc1_out if bias else 0))
    replicated = 2 * norm + (2 * h if bias else 0)  # row-parallel biases are not split
    return split // tp + replicated


def stage_parameters(model: ModelShape, layout: Layout, stage: int) -> int:
    """Parameters one TP rank of pipeline stage `stage` holds, as megatron builds it."""
    vocab = model.padded_vocab_size(layout.tp) * model.hidden_size // layout.tp
    params = layer_parameters(model, layout.tp) * (model.num_layers // layout.pp)
    if stage == 0:
        params += vocab
    if stage == layout.pp - 1:
        params += model.hidden_size * (1 if model.normalization == "RMSNorm" else 2)
        # With tied embeddings and PP > 1 the last stage keeps its own copy of the embedding.
        if not model.tie_embeddings or layout.pp > 1:
            params += vocab
    return params


def count_parameters(model: ModelShape) -> int:
    """All parameters of the model, with megatron's vocabulary padding at TP=1."""
    return stage_parameters(model, Layout(tp=1, pp=1, dp=1), 0)


def gemm_weights_per_layer(model: ModelShape, tp: int) -> int:
    h = model.hidden_size
    fc1_out = model.ffn_hidden_size * (2 if model.gated_linear_unit else 1)
    return (model.query_size + 2 * model.kv_size + model.query_size + fc1_out
            + model.ffn_hidden_size) * h // tp


# ---------------------------------------------------------------- activations


def layer_activations(model: ModelShape, layout: Layout, setup: TrainingSetup,
                      recompute: Recompute = "none") -> int:
    """Bytes one layer keeps for backward per micro-batch on one TP rank (`recompute` != full)."""
    # s: this rank's tokens of a sequence; `full` of them under context parallelism
    full = setup.seq_length
    s, b, h, f = full // layout.cp, setup.micro_batch_size, model.hidden_size, model.ffn_hidden_size
    a, hq, hkv, t = model.num_attention_heads, model.query_size, model.kv_size, layout.tp
    e = 4 if setup.dtype == "fp32" else 2
    gemm_in = 1 if setup.dtype == "fp8" else e  # TE keeps FP8 copies of GEMM inputs
    sb = s * b
    kv_sb = full * b if setup.backend == "sdpa" else sb  # keys and values kept, gathered or not
    # Tensors over the hidden dimension that TP replicates unless sequence parallelism splits them.
    shard = t if layout.sequence_parallel else 1
    replicated = split = 0
    if setup.backend == "local":
        replicated += 2 * _torch_norm_bytes(model, e, sb)
        if recompute == "selective":  # checkpointed core-attention inputs; V views the fused QKV
            split += e * sb * (2 * hq + 3 * hkv)
        else:
            # GQA: the unfused attention repeats K and V to every head. MHA: V stays a view of
            # the fused QKV output and keeps all of it alive.
            kv = 2 * hq if a > model.num_query_groups else hkv + (hq + 2 * hkv)
            scores, dropout = a * s * s * b, model.attention_dropout > 0
            # The fp32 softmax output is kept, and what feeds P @ V: its 16-bit copy, or the
            # dropout output plus the dropout mask.
            probs = 4 * scores + (2 * e * scores if dropout else e * scores if e != 4 else 0)
            split += e * sb * (hq + kv) + probs
        split += e * sb * hq  # attention output, the input of linear_proj
        glu = 5 * f if model.gated_linear_unit else 2 * f  # fc1 out (2f), silu, x_linear, product
        split += e * sb * glu
        fixed = 4 * s * model.head_dim * e  # RoPE cos and sin for q and k, per layer
    elif setup.backend == "sdpa":
        replicated += 2 * _cpu_norm_bytes(model, e, sb)
        if recompute == "selective":  # the checkpointed SDPA keeps only its inputs
            split += e * sb * (hq + 2 * hkv)
        elif model.attention_dropout > 0:
            # torch's CPU SDPA has no dropout in its flash kernel: the math kernel runs, in fp32,
            # keeping the scaled query, K and V repeated to every head, the softmax, the dropout
            # mask and the dropped probabilities
            split += 4 * (sb + 2 * kv_sb) * hq + 12 * a * s * full * b
        else:  # flash: q, k and v (laid out [b, s] by the fused RoPE) and the log-sum-exp
            split += e * (sb * hq + 2 * kv_sb * hkv) + 4 * a * sb
        split += e * sb * hq  # attention output, the input of linear_proj
        glu = 4 * f if model.gated_linear_unit else 2 * f  # fc1 out (2f), silu, product
        split += e * sb * glu
        fixed = 2 * s * model.head_dim * e  # RoPE cos and sin, shared by q and k
    else:
        # TE norms keep their input and fp32 statistics; their output feeds the next GEMM.
        replicated += 2 * ((e + gemm_in) * sb * h + _te_norm_stats(model, sb))
        split += e * sb * (hq + 2 * hkv) + e * sb * hq  # flash attention: q, k, v and its output
        if setup.dtype == "fp8":
            split += sb * hq  # FP8 copy of linear_proj's input
        if recompute == "none":
            split += 4 * a * sb  # softmax log-sum-exp
        glu_in = 2 * f if model.gated_linear_unit else f  # fused SwiGLU keeps only its input
        split += e * sb * glu_in + gemm_in * sb * f
        fixed = 0
    if model.hidden_dropout > 0:
        replicated += 2 * sb * h * _dropout_mask_bytes(setup)  # after attention and after MLP
    return replicated // shard + split // t + fixed


def _dropout_mask_bytes(setup: TrainingSetup) -> int:
    """CUDA's fused dropout keeps a one-byte mask; on CPU torch keeps one of the input's dtype."""
    return 1 if setup.backend == "te" else (4 if setup.dtype == "fp32" else 2)


def _te_norm_stats(model: ModelShape, sb: int) -> int:
    """fp32 1/rms per token for RMSNorm; mean and 1/std for LayerNorm."""
    return 4 * sb * (1 if model.normalization == "RMSNorm" else 2)


def _torch_norm_bytes(model: ModelShape, e: int, sb: int) -> int:
    """What a torch norm (megatron's local spec without Apex) keeps, its output included.

    RMSNorm is composite: it upcasts to fp32 and keeps that input, the normalised input and
    1/rms. LayerNorm is one kernel keeping its input, mean and 1/std (in the input's dtype on
    CPU). The output is kept by the GEMM it feeds.
    """
    h = model.hidden_size
    if model.normalization == "RMSNorm":
        return (4 + 4 + e) * sb * h + 4 * sb
    return 2 * e * sb * h + 2 * e * sb


def _cpu_norm_bytes(model: ModelShape, e: int, sb: int) -> int:
    """The trainer's CPU norm: the fused fp32 RMSNorm keeps its input and 1/rms (its output is
    kept by the GEMM it feeds); anything else is torch's norm."""
    if model.normalization == "RMSNorm" and e == 4:
        return 2 * e * sb * model.hidden_size + 4 * sb
    return _torch_norm_bytes(model, e, sb)


def stage_activations(model: ModelShape, layout: Layout, setup: TrainingSetup, stage: int,
                      recompute: Recompute) -> int:
    """Peak activation bytes on one GPU of `stage` under megatron's pipeline schedule."""
    s, b, h, t = (setup.seq_length // layout.cp, setup.micro_batch_size, model.hidden_size,
                  layout.tp)
    e = 4 if setup.dtype == "fp32" else 2
    shard = t if layout.sequence_parallel else 1
    layers_per_chunk = model.num_layers // (layout.pp * layout.chunks)
    m = setup.num_microbatches(layout)
    if layout.pp == 1:
        in_flight_chunks = 1
    elif layout.vpp is None:
        in_flight_chunks = min(layout.pp - stage, m)
    else:  # interleaved 1F1B warm-up, as in megatron's get_pp_rank_microbatches
        warmup = (layout.pp - stage - 1) * 2 + (layout.vpp - 1) * layout.pp
        in_flight_chunks = min(warmup + 1, m * layout.vpp)
    if recompute == "full":
        per_layer = e * s * b * h // shard  # each layer keeps only its input
        # and the fp32 RoPE table (this CP rank's rows) all of a chunk's layers share
        per_chunk = 4 * s * model.head_dim
        # During backward one layer at a time is recomputed in full.
        transient = layer_activations(model, layout, setup, "none")
    else:
        per_layer = layer_activations(model, layout, setup, recompute)
        per_chunk = transient = 0
    layers = (per_layer * layers_per_chunk + per_chunk) * in_flight_chunks
    in_flight_microbatches = math.ceil(in_flight_chunks / layout.chunks)
    extra = 0
    if stage == 0:
        extra += 8 * s * b  # token ids kept by the embedding lookup
        if model.hidden_dropout > 0:
            extra += s * b * h * _dropout_mask_bytes(setup) // shard
        if setup.backend == "local":
            extra += s * s  # the boolean causal mask handed to every layer
        extra *= in_flight_microbatches
    if layout.cp > 1 and setup.backend == "sdpa" and recompute == "none":
        # one for every layer and micro-batch: the rows putting the gathered K and V in position
        # order, and the causal mask over global positions that the flash kernel keeps (the
        # math kernel, under attention dropout, adds it to the scores and keeps nothing)
        extra += 8 * setup.seq_length
        if model.attention_dropout == 0:
            extra += e * s * setup.seq_length
    if stage == layout.pp - 1:
        vocab = model.padded_vocab_size(t) // t
        if setup.backend == "local":
            norm = _torch_norm_bytes(model, e, s * b)
        elif setup.backend == "sdpa":
            norm = _cpu_norm_bytes(model, e, s * b)
        else:
            norm = 2 * e * s * b * h + _te_norm_stats(model, s * b)
        # fp32 softmax kept by the vocab-parallel cross entropy, plus its index bookkeeping.
        extra += norm // shard + 4 * s * b * vocab + 9 * s * b
    return layers + transient + extra


# ---------------------------------------------------------------- estimate


def bytes_per_parameter(dtype: Dtype) -> tuple[int, int, int]:
    """(weight, gradient, optimizer) bytes: fp32 keeps no master copy; Adam has two moments."""
    if dtype == "fp32":
        return 4, 4, 8
    return 2, 4, 12  # bf16/fp8: bf16 weight, fp32 main grad, fp32 master + m + v


def estimate_stage_memory(model: ModelShape, layout: Layout, setup: TrainingSetup,
                          stage: int) -> StageMemory:
    params = stage_parameters(model, layout, stage)
    weight_b, grad_b, optim_b = bytes_per_parameter(setup.dtype)
    weights = params * weight_b
    if setup.dtype == "fp8":  # Transformer Engine caches the FP8 weight and its transpose
        weights += 2 * gemm_weights_per_layer(model, layout.tp) * (model.num_layers // layout.pp)
    activations = {r: stage_activations(model, layout, setup, stage, r) for r in RECOMPUTE_MODES}
    return StageMemory(stage=stage, params=params, weights=weights, gradients=params * grad_b,
                       optimizer=params * optim_b,
                       optimizer_distributed=-(-params * optim_b // (layout.dp * layout.cp)),
                       activations=activations)


def check_layout(model: ModelShape, layout: Layout, setup: TrainingSetup) -> str | None:
    """Why megatron would refuse `layout` for this model and batch, or None if it is valid."""
    if layout.cp > 1 and setup.backend == "local":
        return "megatron's unfused attention has no context parallelism"
    # sequence parallelism splits the tokens over TP; CP splits them into 2 x cp chunks
    parts = []
    if layout.sequence_parallel and layout.tp > 1:
        parts.append((f"tp {layout.tp}", layout.tp))
    if layout.cp > 1:
        parts.append((f"2 x cp {layout.cp}", 2 * layout.cp))
    split = math.prod(n for _, n in parts)
    if setup.seq_length % split:
        return (f"the sequence does not split into {split} parts "
                f"({' x '.join(name for name, _ in parts)})")
    if model.num_attention_heads % layout.tp or model.num_query_groups % layout.tp:
        return f"tp {layout.tp} does not divide the attention heads and query groups"
    if model.ffn_hidden_size % layout.tp:
        return f"tp {layout.tp} does not divide ffn_hidden_size"
    if model.num_layers % (layout.pp * layout.chunks):
        vpp = f" x vpp {layout.vpp}" if layout.vpp else ""
        return f"pp {layout.pp}{vpp} does not divide {model.num_layers} layers"
    if layout.vpp is not None and layout.pp < 2:
        return "virtual pipeline stages need pp >= 2"
    if setup.global_batch_size % (setup.micro_batch_size * layout.dp):
        return f"global batch is not divisible by micro-batch x dp {layout.dp}"
    if layout.vpp is not None and setup.num_microbatches(layout) % layout.pp:
        return "the interleaved schedule needs micro-batches divisible by pp"
    return None


def estimate_memory(model: ModelShape, layout: Layout, setup: TrainingSetup) -> MemoryEstimate:
    """Memory of every pipeline stage of `layout`; raises UsageError for an invalid layout."""
    reason = check_layout(model, layout, setup)
    if reason:
        raise UsageError(f"layout {layout}: {reason}")
    stages = tuple(estimate_stage_memory(model, layout, setup, p) for p in range(layout.pp))
    return MemoryEstimate(layout, setup.num_microbatches(layout), stages)
