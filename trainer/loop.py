"""The one training loop every stage shares: megatron schedules, DDP, (distributed) Adam, LR
schedule, clipping, bad-step skipping, evaluation, metrics and checkpoints.

Loss normalisation: stages return loss *sums* and unit counts per micro-batch; megatron's
`calculate_per_token_loss` path divides the summed gradient by the units of the whole global batch
(all micro-batches, all DP ranks), so gradient accumulation is exactly a larger batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
from megatron.core.transformer.module import Float16Module, param_is_not_shared

from kiln.errors import ConfigError, UsageError
from kiln.log import get_logger
from kiln.paths import write_text
from kiln.progress import counter
from tensor_parallel import micro_batches_per_step, runtime
from trainer import checkpoint
from trainer.config import RunConfig, parse_signals
from trainer.forward import forward_only, on_device
from trainer.metrics import MetricsWriter, flops_per_token, peak_memory_gb, peak_tflops
from trainer.model import check_fits_layout, check_model_config, padded_vocab_size
from trainer.preemption import GracefulStop, StopRequested
from trainer.profiling import StepProfiler
from trainer.stages import Stage, stage_class
from trainer.watchdog import HangWatchdog

log = get_logger(__name__)


@dataclass
class TrainState:
    """What besides weights and optimizer a resumed run needs to continue exactly."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0


class BadStepsError(UsageError):
    """Too many consecutive steps with a NaN/Inf loss or gradient."""

    exit_code = 1


@dataclass
class Trainer:
    cfg: RunConfig
    stage: Stage
    model: list[torch.nn.Module]
    optimizer: Any
    scheduler: OptimizerParamScheduler
    state: TrainState
    micro_batches: int

    # ---- one step ---------------------------------------------------------------------------
    def _forward_step(self, data_iterator, model):
        batch = on_device(next(data_iterator))
        output = self.stage.forward(model, batch)
        return output, partial(self._loss, batch)

    def _loss(self, batch, output):
        loss_sum, count, metrics = self.stage.loss(output, batch)
        # The schedule may scale the returned loss in place: report a copy.
        report = {"loss": loss_sum.detach().clone(), "count": count.detach().clone()}
        report.update({k: v.detach().clone() for k, v in metrics.items()})
        return loss_sum, count, report

    def _run_schedule(self, iterators) -> list[dict]:
        cfg = self.cfg
        return get_forward_backward_func()(
            forward_step_func=self._forward_step, data_iterator=iterators, model=self.model,
            num_microbatches=self.micro_batches, seq_length=cfg.train.seq_length,
            micro_batch_size=cfg.train.micro_batch_size * self.stage.sequences_per_sample,
            forward_only=False)

    def _reduce(self, reports: list[dict]) -> dict[str, float] | None:
        """Sum micro-batch reports over DP (last pipeline stage only); per-unit means."""
        if not runtime.is_last_stage():
            return None
        keys = list(reports[0])
        totals = torch.stack([sum(r[k].double() for r in reports) for k in keys])
        runtime.dp_all_reduce(totals)
        values = dict(zip(keys, totals.tolist(), strict=True))
        count = max(values.pop("count"), 1.0)
        return {k: v / count for k, v in values.items()}

    def _grads_finite(self, reduced: dict[str, float] | None) -> bool:
        bad = 0.0
        if reduced is not None and not math.isfinite(reduced["loss"]):
            bad = 1.0
        # A sum is non-finite when any element is NaN/Inf (or the gradient is ~1e38 in size,
        # which deserves a skip too), at a tenth of `isfinite(...).all()`'s cost.
        sums = [buffer.grad_data.sum() for chunk in self.model for buffer in chunk.buffers]
        if sums and not torch.isfinite(torch.stack(sums)).all():
            bad = 1.0
        flag = torch.tensor([bad], device=runtime.device())
        return runtime.all_reduce_max(flag).item() == 0.0

    def train_step(self, iterators) -> tuple[bool, dict[str, float] | None]:
        """One optimizer step; (applied, metrics on the last pipeline stage else None)."""
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        reports = self._run_schedule(iterators)
        reduced = self._reduce(reports)
        self.state.step += 1
        self.state.consumed_samples += self.cfg.train.global_batch_size
        if not self._grads_finite(reduced):
            return False, reduced
        _, grad_norm, _ = self.optimizer.step()
        applied = self.scheduler.get_lr(self.optimizer.param_groups[0])
        self.scheduler.step(increment=1)  # the next step's
        if reduced is not None:
            reduced["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
            reduced["lr"] = applied
        return True, reduced

    def evaluate(self) -> dict[str, float] | None:
        """Validation loss and stage metrics per unit over the fixed validation batches."""
        if self.stage.valid_batches() is None:
            return None
        for chunk in self.model:
            chunk.eval()
        reports = forward_only(
            self.model, self.stage.valid_batches, self.micro_batches * self.cfg.train.eval_batches,
            self.stage.forward, lambda output, batch: self._loss(batch, output)[2],
            seq_length=self.cfg.train.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size * self.stage.sequences_per_sample)
        for chunk in self.model:
            chunk.train()
        return self._reduce(reports)


def _fuse_cpu_adam(optimizer: Any) -> None:
    """Run torch's fused Adam(W) kernel on CPU: one pass over each tensor instead of a dozen
    elementwise ops (megatron falls back to torch's per-tensor loop when TE/apex are absent;
    on GPU those bring their own fused Adam)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                group.update(fused=True, foreach=False)


def build_trainer(cfg: RunConfig) -> Trainer:
    """Stage, model chunks (DDP-wrapped), optimizer and scheduler for an initialised runtime."""
    layout = runtime.layout()
    m = cfg.model
    check_fits_layout(m, cfg.train.seq_length, cfg.parallel.sequence_parallel)
    micro = micro_batches_per_step(layout, global_batch_size=cfg.train.global_batch_size,
                                   micro_batch_size=cfg.train.micro_batch_size)
    check_model_config(cfg)
    stage = stage_class(cfg.stage)(cfg)
    if layout.cp > 1 and not stage.context_parallel:
        raise ConfigError("parallel.cp", f"stage {cfg.stage} decodes whole sequences on one "
                          "rank, which context parallelism would split: use parallel.cp=1")
    stage.setup()
    if cfg.init.checkpoint and not (cfg.checkpoint.resume and checkpoint.latest_checkpoint(
            checkpoint.checkpoint_root(cfg))):
        checkpoint.check_starting_checkpoint(cfg, stage.vocab_size(),
                                             checkpoint.resolve(cfg.init.checkpoint))
    if runtime.is_logging_rank():
        _log_memory_plan(cfg, stage.vocab_size())
    vocab = padded_vocab_size(stage.vocab_size(), m.make_vocab_size_divisible_by, layout.tp)
    chunks = stage.build_model(vocab)
    tcfg = chunks[0].config
    if m.precision == "bf16":
        chunks = [Float16Module(tcfg, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=cfg.parallel.overlap_grad_reduce,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    model = [DistributedDataParallel(tcfg, ddp_config, c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    o = cfg.optimizer
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
        clip_grad=o.clip_grad, bf16=m.precision == "bf16", params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather), model)
    if not runtime.on_gpu():
        _fuse_cpu_adam(optimizer)
    s = cfg.schedule
    decay = s.decay_steps or cfg.train.steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if s.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=s.warmup_steps, lr_decay_steps=max(decay, s.warmup_steps + 1),
        lr_decay_style=s.style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=max(decay, 1), wd_incr_style="constant",
        # the config's schedule, not the checkpoint's, on resume (extending train.steps extends
        # the decay); the checkpoint gives the step count, and a change is logged when restored
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    tcfg.finalize_model_grads_func = finalize_model_grads
    tcfg.grad_scale_func = optimizer.scale_loss

    def per_chunk(fns: list) -> Any:
        # the schedules take one function per model chunk, or the function itself for one
        # chunk (as Megatron-LM's training loop sets them)
        return fns if len(fns) > 1 else fns[0]

    if cfg.parallel.overlap_grad_reduce:
        tcfg.no_sync_func = per_chunk([c.no_sync for c in model])
        tcfg.grad_sync_func = per_chunk([c.start_grad_sync for c in model])
    if cfg.parallel.overlap_param_gather:
        tcfg.param_sync_func = per_chunk([c.start_param_sync for c in model])
    return Trainer(cfg, stage, model, optimizer, scheduler, TrainState(), micro)


def memory_estimate(cfg: RunConfig, vocab_size: int, layout: Any) -> tuple[Any, str] | None:
    """`kiln plan`'s estimate for this run's layout and kernels, and the kernel set's name; None
    for stages other than pretrain and sft (several models, or another head) and for local-spec
    kernel mixes the plan does not model."""
    from tensor_parallel import plan

    m = cfg.model
    if m.transformer_impl == "transformer_engine":
        backend = "te"
    elif m.local_attention == "sdpa" and m.local_fusions:
        backend = "sdpa"
    elif m.local_attention == "megatron" and not m.local_fusions:
        backend = "local"
    else:
        return None
    if cfg.stage not in ("pretrain", "sft"):
        return None
    shape = plan.ModelShape(
        m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
        m.num_query_groups or m.num_attention_heads, vocab_size, cfg.train.seq_length,
        tie_embeddings=m.tie_embeddings, hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by)
    setup = plan.TrainingSetup(cfg.train.seq_length, cfg.train.micro_batch_size,
                               cfg.train.global_batch_size, "fp8" if m.fp8 else m.precision,
                               backend)
    return plan.estimate_memory(shape, plan.Layout(
        layout.tp, layout.pp, layout.dp, layout.vpp, cfg.parallel.sequence_parallel, layout.cp),
        setup), backend


def _log_memory_plan(cfg: RunConfig, vocab_size: int) -> None:
    """The plan's estimate for this run's most loaded GPU, as Megatron-LM reports its
    theoretical memory at start; on a GPU, a warning when it will not fit."""
    try:
        planned = memory_estimate(cfg, vocab_size, runtime.layout())
    except UsageError as e:  # a shape the plan does not model; the run itself was checked
        log.debug("no memory plan: %s", e)
        return
    if planned is None:
        return
    estimate, backend = planned
    log.info("memory plan (kiln plan, %s kernels): %s", backend,
             estimate.summary(cfg.parallel.distributed_optimizer, cfg.model.recompute))
    if runtime.on_gpu():
        capacity = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        warning = memory_warning(estimate, cfg, capacity)
        if warning:
            log.warning(warning)


def memory_warning(estimate: Any, cfg: RunConfig, capacity: int) -> str | None:
    """Why this run will not fit a GPU of `capacity` bytes by the plan's count, else None."""
    peak = estimate.peak(cfg.parallel.distributed_optimizer, cfg.model.recompute)
    if peak <= capacity:
        return None
    gib = 1024**3
    return (f"the memory plan's {peak / gib:.1f} GiB per GPU (before CUDA context, communication "
            f"buffers and transients) exceeds this GPU's {capacity / gib:.1f} GiB: expect out of "
            f"memory; `kiln plan --model <config> --gpus {runtime.world_size()} --gpu-memory-gb "
            f"{capacity / gib:.0f}` lists the layouts and recomputation that fit")


@torch.no_grad()
def params_norm(optimizer: Any) -> float:
    """The L2 norm of the trained weights (Megatron-LM's params-norm), from the optimizer's main
    copies: current right after the step even when the model's copies wait for the overlapped
    parameter all-gather. Each weight counts once (TP-replicated copies and the last stage's tied
    embedding are skipped; the distributed optimizer's shards partition the rest), reduced over the
    group the optimizer reduces its gradient norm over."""
    squares = torch.zeros((), dtype=torch.float64, device=runtime.device())
    for group in optimizer.param_groups:
        for p in group["params"]:
            if param_is_not_shared(p) and param_is_not_tensor_parallel_duplicate(p):
                squares += torch.linalg.vector_norm(p, dtype=torch.float64).square()
    if runtime.world_size() > 1:
        torch.distributed.all_reduce(squares, group=optimizer.get_grad_stats_parallel_group())
    return math.sqrt(squares.item())


def _step_record(t: Trainer, result: dict[str, float] | None, tokens_per_s: float,
                 flops_per_tok: float, peak: float | None) -> dict[str, Any]:
    """One metrics.jsonl line: step, loss (+ stage metrics), lr, grad and weight norms,
    throughput, memory."""
    tflops = tokens_per_s * flops_per_tok / 1e12 / runtime.world_size()
    # `lr` is the rate this step applied (taken before the scheduler moved on; a skipped step
    # applied none and leaves the current one); Megatron-LM and HF log the next step's
    record = {"step": t.state.step, "lr": t.scheduler.get_lr(t.optimizer.param_groups[0]),
              "params_norm": params_norm(t.optimizer),
              "tokens_per_s": tokens_per_s, "tflops_per_rank": tflops,
              # the most loaded rank's (under PP the first stage's, not the logging rank's)
              "peak_memory_gb": runtime.all_reduce_max(torch.tensor(
                  [peak_memory_gb()], device=runtime.device())).item(),
              "skipped_steps": t.state.skipped_steps,
              "consumed_samples": t.state.consumed_samples}
    if peak:
        record["mfu"] = tflops / peak
    record.update(result or {"loss": float("nan")})
    return record


def _train_steps(t: Trainer, cfg: RunConfig, saver: checkpoint.Saver, writer: MetricsWriter,
                 profiler: StepProfiler, flops: float, peak: float | None, started: float) -> None:
    """The steps from `t.state.step` to `train.steps`: metrics, evaluation, checkpoints; raises
    `StopRequested` (after saving) when a signal or the time limit ends the run early."""
    tr = cfg.train
    chunks = len(t.model)
    iters = [t.stage.train_batches(t.state.consumed_samples) for _ in range(chunks)]
    iterator = iters if chunks > 1 else iters[0]
    bad_in_a_row, tokens, window = 0, 0, time.perf_counter()
    stopper = GracefulStop(parse_signals(tr.exit_signals), tr.time_limit_minutes, started)
    with counter(f"{cfg.stage}", total=tr.steps, enabled=runtime.is_logging_rank()) as progress, \
            stopper, HangWatchdog(tr.hang_dump_minutes) as watchdog:
        progress.advance(t.state.step)
        while t.state.step < tr.steps:
            watchdog.step(t.state.step + 1)
            t.stage.before_step(t.state.step, t.model)
            profiler.before(t.state.step + 1)
            applied, result = t.train_step(iterator)
            step = t.state.step
            profiler.after(step)
            tokens += tr.global_batch_size * tr.seq_length
            if not applied:
                t.state.skipped_steps += 1
                bad_in_a_row += 1
                log.warning("step %d: NaN/Inf loss or gradient, update skipped (%d in a row)",
                            step, bad_in_a_row)
            else:
                bad_in_a_row = 0
            last = step == tr.steps
            # a stop asked for now (a signal, the time limit) ends the run after this step: its
            # metrics are written and its checkpoint saved; an evaluation due at this step is
            # skipped, not to spend the time a scheduler grants before it kills
            requested = None if last else stopper.poll()
            evaluate = (bool(tr.eval_every and step % tr.eval_every == 0) or last) \
                and requested is None
            record: dict[str, Any] = {}
            if step % tr.log_every == 0 or last or evaluate or not applied or requested:
                elapsed = time.perf_counter() - window
                record = _step_record(t, result, tokens / max(elapsed, 1e-9), flops, peak)
                if requested is not None:
                    record["stopped"] = requested[0]
            if evaluate:
                val = t.evaluate()
                if val is not None:
                    record.setdefault("step", step)
                    record.update({f"val_{k}": v for k, v in val.items()})
            if record and runtime.is_logging_rank():
                writer.write(record)
                progress.set(**{k: record[k] for k in ("loss", "val_loss") if k in record})
            progress.advance(1)
            if bad_in_a_row >= tr.max_bad_steps:
                raise BadStepsError(f"stopping at step {step}: {bad_in_a_row} consecutive steps "
                                    "had a NaN/Inf loss or gradient")
            saver.poll()
            saved = None
            if cfg.checkpoint.save and ((tr.save_every and step % tr.save_every == 0) or last):
                saved = saver.save(t)
            if record:  # the next window starts after this step's evaluation and save
                tokens, window = 0, time.perf_counter()
            if requested is not None:
                if cfg.checkpoint.save and saved is None:
                    saved = saver.save(t)
                raise StopRequested(step, *requested, saved)


def train(cfg: RunConfig, started: float | None = None) -> TrainState:
    """Train `cfg.train.steps` steps (resuming from the latest checkpoint when there is one).

    Raises `StopRequested` after saving when a signal or `train.time_limit_minutes` (counted from
    `started`, a `time.monotonic()` value; default now) ends the run early."""
    started = time.monotonic() if started is None else started
    t = build_trainer(cfg)
    checkpoint.restore(t)
    writer = MetricsWriter(cfg.run_dir, runtime.is_logging_rank(), start_step=t.state.step)
    m, tr = cfg.model, cfg.train
    flops = flops_per_token(num_layers=m.num_layers, hidden=m.hidden_size, ffn=m.ffn_hidden_size,
                            heads=m.num_attention_heads,
                            kv_heads=m.num_query_groups or m.num_attention_heads,
                            vocab=padded_vocab_size(t.stage.vocab_size(),
                                                    m.make_vocab_size_divisible_by, cfg.parallel.tp),
                            seq_length=tr.seq_length)
    peak = peak_tflops(m.fp8 is not None)
    if t.state.step >= tr.steps:  # nothing to train: evaluate the loaded weights
        t.stage.before_evaluate(t.state.step, t.model)
        val = t.evaluate()
        if runtime.is_logging_rank() and val is not None:
            record = {"step": t.state.step, **{f"val_{k}": v for k, v in val.items()}}
            write_text(os.path.join(cfg.run_dir, "eval.json"), json.dumps(record) + "\n")
        return t.state
    profiler = StepProfiler(cfg.run_dir, tr.profile_steps, tr.profile_ranks,
                            runtime.rank(), runtime.on_gpu())
    stop: StopRequested | None = None
    saver = checkpoint.Saver(cfg)
    try:
        _train_steps(t, cfg, saver, writer, profiler, flops, peak, started)
    except StopRequested as stopped:
        stop = stopped
    except BaseException:
        saver.close(abort=True)
        raise
    saver.close()
    profiler.close()
    writer.close()
    if stop is not None:
        raise stop
    return t.state
__all__ = ["BadStepsError", "TrainState", "Trainer", "build_trainer", "forward_only",
           "memory_estimate", "memory_warning", "train"]
