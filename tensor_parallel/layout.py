"""The TP×PP×(VPP)×CP×DP layout of a run and the checks that it fits the model and the batch."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """How `world_size` ranks split one model: tensor, pipeline (+virtual), context and data."""

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    dp: int = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def model_chunks(self) -> int:
        """Model chunks per pipeline rank (VPP > 1 interleaves layers across chunks)."""
        return self.vpp or 1


def infer_layout(world_size: int, tp: int, pp: int, vpp: int | None, cp: int) -> Layout:
    """The layout that uses all `world_size` ranks; DP is what remains after TP×PP×CP."""
    for key, value in (("parallel.tp", tp), ("parallel.pp", pp), ("parallel.cp", cp)):
        if value < 1:
            raise ConfigError(key, f"must be >= 1, got {value}")
    if vpp is not None and vpp < 1:
        raise ConfigError("parallel.vpp", f"must be >= 1 or null, got {vpp}")
    if vpp is not None and vpp > 1 and pp < 2:
        raise ConfigError("parallel.vpp", f"virtual pipeline stages need parallel.pp >= 2, got pp={pp}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ConfigError(
            "parallel.tp", f"world size {world_size} is not divisible by tp×pp×cp = "
            f"{tp}×{pp}×{cp} = {model_parallel} (world = tp×pp×dp×cp)")
    return Layout(tp=tp, pp=pp, vpp=vpp if vpp and vpp > 1 else None, cp=cp,
                  dp=world_size // model_parallel)


def check_model_fits(layout: Layout, *, num_layers: int, num_attention_heads: int,
                     num_query_groups: int, seq_length: int, sequence_parallel: bool) -> None:
    """Raise `ConfigError` naming the key when the model cannot be split this way."""
    if num_attention_heads % layout.tp:
        raise ConfigError("parallel.tp", f"model.num_attention_heads={num_attention_heads} is not "
                          f"divisible by tp={layout.tp}")
    if num_query_groups % layout.tp:
        raise ConfigError("parallel.tp", f"model.num_query_groups={num_query_groups} (KV heads) "
                          f"is not divisible by tp={layout.tp}")
    stages = layout.pp * layout.model_chunks
    if num_layers % stages:
        raise ConfigError("parallel.pp", f"model.num_layers={num_layers} is not divisible by "
                          f"pp×vpp = {layout.pp}×{layout.model_chunks} = {stages}")
    if sequence_parallel and layout.tp == 1:
        raise ConfigError("parallel.sequence_parallel", "needs parallel.tp > 1")
    split = layout.tp if sequence_parallel else 1
    if seq_length % (split * 2 * layout.cp if layout.cp > 1 else split):
        raise ConfigError("train.seq_length", f"{seq_length} must be divisible by "
                          f"{'tp' if sequence_parallel else ''}{'×2cp' if layout.cp > 1 else ''} "
                          "for sequence/context parallelism")


def micro_batches_per_step(layout: Layout, *, global_batch_size: int, micro_batch_size: int) -> int:
    """Gradient-accumulation steps: global batch = micro batch × DP × accumulation."""
    if micro_batch_size < 1:
        raise ConfigError("train.micro_batch_size", f"must be >= 1, got {micro_batch_size}")
    per_step = micro_batch_size * layout.dp
    if global_batch_size % per_step:
        raise ConfigError(
            "train.global_batch_size", f"{global_batch_size} is not divisible by "
            f"micro_batch_size×dp = {micro_batch_size}×{layout.dp} = {per_step}")
    micro = global_batch_size // per_step
    if layout.vpp and micro % layout.pp:
        # megatron's interleaved schedule runs micro-batches in groups of PP
        raise ConfigError(
            "train.global_batch_size", f"{global_batch_size} gives {micro} micro-batches per "
            f"step (global / (micro_batch_size×dp = {per_step})); interleaved pipelining "
            f"(vpp={layout.vpp}) needs a multiple of pp={layout.pp}")
    return micro
