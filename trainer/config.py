"""The typed training config: one dataclass per concern, one section per stage.

A run is `RunConfig` plus, for stages that need one, a section named after the stage (`dpo:`,
`ppo:`...) whose dataclass the stage module declares as `Stage.options`. `load_run_config` reads
`stage` first, builds the combined dataclass and loads the YAML with `kiln.config.load_config`, so
a new stage adds its own section without touching this file.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kiln.config import check_range, load_config, parse_override, read_yaml
from kiln.errors import ConfigError


@dataclass
class ModelConfig:
    """A Llama-style decoder: RMSNorm, SwiGLU, RoPE, grouped-query attention."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int | None = None  # KV heads; None = one per attention head
    vocab_size: int | None = None  # None: from the data manifest's tokenizer
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int | None = None  # None: train.seq_length
    rotary_base: int = 10000
    rope_scaling_factor: float | None = None  # Llama 3.x RoPE scaling (megatron's fixed 1/4/8192)
    qkv_bias: bool = False  # bias on the QKV projection only (Qwen2)
    norm_epsilon: float = 1e-5
    tie_embeddings: bool = False
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    transformer_impl: Literal["local", "transformer_engine"] = "local"
    # Core attention of the local spec: torch SDPA (fused, GQA in place) or megatron's unfused
    # baddbmm/softmax/bmm. Transformer Engine brings its own fused attention.
    local_attention: Literal["sdpa", "megatron"] = "sdpa"
    # Local spec: RMSNorm, SwiGLU and the QKV split + RoPE as single autograd functions
    # (tensor_parallel/fused_ops.py) instead of megatron's chains of torch ops.
    local_fusions: bool = True
    precision: Literal["fp32", "bf16"] = "fp32"
    fp8: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] | None = None
    fp8_format: Literal["hybrid", "e4m3"] = "hybrid"
    recompute: Literal["none", "selective", "full"] = "none"
    # Every weight a function of (seed, its global name, position): identical across TP/PP/DP
    # layouts. Costs one full-tensor draw per layer on each rank: off for large models.
    layout_independent_init: bool = True

    def check_values(self, prefix: str) -> None:
        """Shape arithmetic a Llama-style model needs (the layout's own rules, heads by TP and
        layers by PP, are checked with the layout)."""
        for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                    "make_vocab_size_divisible_by"):
            check_range(f"{prefix}{key}", getattr(self, key), 1)
        heads, groups = self.num_attention_heads, self.num_query_groups or self.num_attention_heads
        if groups < 1 or heads % groups:
            raise ConfigError(f"{prefix}num_query_groups", f"{groups} does not divide "
                              f"{prefix}num_attention_heads {heads}")
        if self.hidden_size % heads or (self.hidden_size // heads) % 2:
            raise ConfigError(f"{prefix}hidden_size", f"{self.hidden_size} / {heads} heads must "
                              "be a whole, even head size (RoPE rotates pairs of dimensions)")
        if self.vocab_size is not None:
            check_range(f"{prefix}vocab_size", self.vocab_size, 1)
        check_range(f"{prefix}norm_epsilon", self.norm_epsilon, 0, open_low=True)
        for key in ("hidden_dropout", "attention_dropout"):
            check_range(f"{prefix}{key}", getattr(self, key), 0, 1, open_high=True)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    # a collective that waits longer fails the run (a hung or dead rank), as Megatron-LM's
    # --distributed-timeout-minutes; leave room for the longest save or evaluation
    timeout_minutes: int = 30

    def __post_init__(self) -> None:
        if self.timeout_minutes < 1:
            raise ConfigError("parallel.timeout_minutes", f"{self.timeout_minutes} is below 1")


@dataclass
class OptimizerConfig:
    """Adam(W) through megatron's (distributed) optimizer."""

    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ConfigError("optimizer.min_lr", f"{self.min_lr} is above optimizer.lr {self.lr}")

    def check_values(self, prefix: str) -> None:
        for key in ("lr", "min_lr", "weight_decay", "clip_grad"):
            check_range(f"{prefix}{key}", getattr(self, key), 0)  # clip_grad 0: no clipping
        for key in ("adam_beta1", "adam_beta2"):
            check_range(f"{prefix}{key}", getattr(self, key), 0, 1, open_high=True)
        check_range(f"{prefix}adam_eps", self.adam_eps, 0, open_low=True)


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (megatron's `OptimizerParamScheduler`)."""

    warmup_steps: int = 0
    decay_steps: int | None = None  # None: train.steps
    style: Literal["cosine", "linear", "constant", "inverse-square-root"] = "cosine"

    def check_values(self, prefix: str) -> None:
        check_range(f"{prefix}warmup_steps", self.warmup_steps, 0)
        if self.decay_steps is not None:
            check_range(f"{prefix}decay_steps", self.decay_steps, 1)


def parse_signals(names: list[str]) -> list[signal.Signals]:
    """`["SIGTERM", "SIGUSR1"]` -> signals; a ConfigError naming `train.exit_signals` otherwise."""
    found = []
    for name in names:
        sig = getattr(signal.Signals, str(name).upper(), None)
        if sig is None or sig in (signal.SIGKILL, signal.SIGSTOP):
            raise ConfigError("train.exit_signals", f"{name!r} is not a signal a process can "
                              "catch (e.g. SIGTERM, SIGUSR1)")
        found.append(sig)
    return found


@dataclass
class TrainConfig:
    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    seq_length: int = 128
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 2  # global batches of the validation split per evaluation
    save_every: int = 0  # 0: only at the end
    max_bad_steps: int = 3  # consecutive NaN/Inf steps before the run stops
    # torch.profiler over steps [first, last] (inclusive) on these ranks: traces and an op table
    # in <run_dir>/profile (trainer/profiling.py)
    profile_steps: list[int] | None = None
    profile_ranks: list[int] = field(default_factory=lambda: [0])
    # stop at the next step boundary with a checkpoint on these signals (exit 128 + signal), or
    # once this much wall time has passed (exit 0): trainer/preemption.py
    exit_signals: list[str] = field(default_factory=lambda: ["SIGTERM"])
    time_limit_minutes: float | None = None
    # a step (with its evaluation and save) that runs longer logs every thread's Python stack,
    # and again each interval (a hung collective shows where it waits): trainer/watchdog.py
    hang_dump_minutes: float | None = None

    def __post_init__(self) -> None:
        parse_signals(self.exit_signals)
        for key in ("time_limit_minutes", "hang_dump_minutes"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ConfigError(f"train.{key}", f"{value} is not a positive number of minutes")
        for key in ("steps", "save_every", "eval_every"):
            check_range(f"train.{key}", getattr(self, key), 0)  # steps 0: evaluate only
        for key in ("micro_batch_size", "global_batch_size", "seq_length", "log_every",
                    "eval_batches", "max_bad_steps"):
            check_range(f"train.{key}", getattr(self, key), 1)
        if self.profile_steps is not None and not (
                len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1]):
            raise ConfigError("train.profile_steps",
                              f"{self.profile_steps} is not [first, last] with 1 <= first <= last")


@dataclass
class DataConfig:
    """Token shards: `manifest.json` files (or their directories), blended by weight."""

    manifests: list[str] = field(default_factory=list)
    weights: list[float] | None = None  # None: by token count
    split: str = "95,5,0"  # train, valid, test
    eod_mask_loss: bool = False
    # When set, every manifest's tokenizer must have this fingerprint (the model's tokenizer).
    tokenizer_fingerprint: str | None = None


@dataclass
class CheckpointConfig:
    save: bool = True  # false: never write checkpoints (quick experiments, tests)
    dir: str | None = None  # None: <run_dir>/checkpoints
    keep_last: int = 2
    resume: bool = True  # continue from <dir>/latest when it exists
    # the writes spread over the data-parallel ranks instead of all on DP rank 0 (Megatron-LM's
    # --ckpt-fully-parallel-save), and written by a background process while training goes on
    # (--async-save); trainer/checkpoint.py `Saver`
    fully_parallel_save: bool = True
    async_save: bool = False
    # a resume's reads spread over the DP×CP ranks, exchanged over the network (Megatron-LM's
    # --ckpt-fully-parallel-load; off there too: it holds an extra copy while exchanging)
    fully_parallel_load: bool = False


@dataclass
class InitConfig:
    checkpoint: str | None = None  # start from these weights (e.g. a pretrained model)


@dataclass
class RunConfig:
    stage: str = "pretrain"
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    init: InitConfig = field(default_factory=InitConfig)


def run_config_class(options: type | None, stage: str) -> type:
    """`RunConfig` plus the stage's own section (named after the stage) when it has one."""
    if options is None:
        return RunConfig
    return dataclasses.make_dataclass(
        f"{stage.capitalize()}RunConfig",
        [(stage, options, field(default_factory=options))], bases=(RunConfig,))


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> Any:
    """Read `stage`, then load the whole file into `RunConfig` + that stage's section."""
    from trainer.stages import stage_class

    stage = "pretrain"
    if path is not None:
        stage = read_yaml(path).get("stage", stage)
    for item in overrides:
        key, value = parse_override(item)
        if key == "stage":
            stage = value
    if not isinstance(stage, str):
        raise ConfigError("stage", f"expected a stage name, got {stage!r}")
    options = stage_class(stage).options
    cfg = load_config(run_config_class(options, stage), path, overrides)
    _absolute_paths(cfg, getattr(cfg, stage, None))
    return cfg


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def locate(path: str) -> str:
    """A relative path from the working directory, else from the repository root (the bundled
    samples are found wherever a run starts); unchanged when neither holds it."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    return in_repo if os.path.exists(in_repo) else path


def _absolute_paths(cfg: Any, options: Any) -> None:
    """The inputs a run names, as absolute paths: the config saved beside every checkpoint
    then finds them from any directory (`kiln export-hf`, `kiln generate`, a later run's
    `init.checkpoint`). Names that are not existing paths (a tokenizer fingerprint) stay."""
    def absolute(path: str | None) -> str | None:
        if path is None:
            return None
        found = locate(path)
        return os.path.abspath(found) if os.path.exists(found) else path

    cfg.init.checkpoint = absolute(cfg.init.checkpoint)
    cfg.data.manifests = [absolute(p) for p in cfg.data.manifests]
    for key in ("tokenizer", "reward_model", "reference_path"):
        if options is not None and isinstance(getattr(options, key, None), str):
            setattr(options, key, absolute(getattr(options, key)))
