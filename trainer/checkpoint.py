"""Checkpoints with megatron `dist_checkpointing`: atomic, resumable, loadable under a new layout.

Layout on disk: `<dir>/step-00000042/` (one dist checkpoint) and `<dir>/latest` (its name). A save
writes `<dir>/.partial-step-…/`, renames it into place and only then moves `latest`, so a crash at
any moment leaves the previous checkpoint and `latest` intact. Tensors are stored by global name
and offset, so a run with another TP/PP/VPP/DP layout loads the same weights. Resuming restores
weights, optimizer, LR schedule, data position, RNG and the stage's own state
(`Stage.sharded_state_dict`: PPO's adaptive β, the rollout in training). Adam's moments (and fp32
master weights) are stored like the weights, one tensor per parameter under the parameter's global
name (megatron's `fully_reshardable` format for the distributed optimizer; the plain optimizer's
own format), so a resume under any other TP/PP/VPP/DP layout continues exactly; the per-rank RNG
state (and a stage's per-rank state) is restored only under the same layout. Moments restart (with
a warning) only when `distributed_optimizer` was switched, or for an older checkpoint whose
distributed optimizer state is per DP rank (`dp_reshardable`) resumed under a new TP/PP/VPP/CP
split.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import TYPE_CHECKING, Any

import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

from kiln.config import dump_yaml, to_dict
from kiln.errors import ConfigError, DataError
from kiln.log import get_logger
from kiln.paths import write_text
from tensor_parallel import runtime

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = get_logger(__name__)

LATEST = "latest"
# How the optimizer state is laid out (Megatron-LM's choice with --dist-ckpt-optim-fully-reshardable):
# the distributed optimizer gathers its DP shards and stores each parameter's state as a tensor of
# the parameter's shape; no `chained_` key prefix. Stored as the checkpoint's content metadata, so
# a load builds the state dict the checkpoint was written with.
_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True,
             "singleton_local_shards": False}
# Checkpoints without content metadata (before the format above): per-DP-rank optimizer buffers.
_LEGACY_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_root(cfg: Any) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")


def latest_checkpoint(root: str) -> str | None:
    """The directory `latest` names, or None when there is no checkpoint yet. A `latest` naming
    a directory that is gone is an error: starting again from step 0 would prune and overwrite
    what the run has."""
    marker = os.path.join(root, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not name or not os.path.exists(os.path.join(path, "metadata.json")):
        others = sorted(d for d in os.listdir(root) if d.startswith("step-")
                        and os.path.exists(os.path.join(root, d, "metadata.json")))
        raise DataError(f"{LATEST} names {name or 'nothing'}, which is missing or not a complete "
                        f"checkpoint; the checkpoints there: "
                        f"{', '.join(others) or 'none'}. Write the one to resume from into "
                        f"{marker}, or remove it to start again", path=marker)
    return path


def resolve(path: str, key: str = "init.checkpoint") -> str:
    """A checkpoint directory, or a checkpoints root (then its `latest`); `key` is the setting
    that named it."""
    if os.path.exists(os.path.join(path, LATEST)):
        found = latest_checkpoint(path)
        if found is not None:
            return found
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise ConfigError(key, f"{path} is not a checkpoint (no metadata.json/latest)")
    return path


def _layout_key() -> list[int]:
    layout = runtime.layout()
    return [layout.tp, layout.pp, layout.vpp or 1, layout.cp, layout.dp]


def _rng_object() -> ShardedObject:
    """This rank's RNG streams, one object per (pp, tp, [cp,] dp) rank (the cp axis only when
    there is one, so checkpoints of runs without CP keep their keys)."""
    layout = runtime.layout()
    shape = (layout.pp, layout.tp, layout.dp)
    ranks = (ps.get_pipeline_model_parallel_rank(), runtime.tp_rank(), runtime.dp_rank())
    if layout.cp > 1:
        shape, ranks = (*shape[:2], layout.cp, shape[2]), (*ranks[:2], runtime.cp_rank(), ranks[2])
    return ShardedObject("rng_state", runtime.rng_state(), shape, ranks, replica_id=0)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / Float16Module: checkpoint keys must not depend on wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_state(model: list[torch.nn.Module]) -> dict[str, Any]:
    return {f"chunk{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _state_dict(t: Trainer, *, optimizer: dict | None, rng: bool, is_loading: bool) -> dict:
    """Model (+ optimizer in the format `optimizer` names, + this rank's RNG) as sharded state."""
    model_sd = _model_state(t.model)
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer is not None:
        sd["optimizer"] = t.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=optimizer)
    if rng:
        sd["rng_state"] = _rng_object()
    return sd


class Saver:
    """Writes a run's checkpoints (`save`), as Megatron-LM does with `--ckpt-format torch_dist`:

    - fully parallel (`checkpoint.fully_parallel_save`, default on): tensors that data-parallel
      (and context-parallel) ranks hold alike are written by one of them each, spread evenly,
      instead of all by DP rank 0 (megatron's `FullyParallelSaveStrategyWrapper`; the spread is
      computed at the first save and reused);
    - asynchronous (`checkpoint.async_save`, default off): a save captures the state (a copy to
      host memory on GPU; on CPU the forked writer's own copy of memory) and training goes on
      while a background process writes it. The checkpoint is renamed into place and `latest`
      moved only once every rank's writer is done (`poll` at each step boundary, `wait` before
      the next save and at the end), so a crash at any moment still leaves the previous one.

    Every method is called on every rank."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._strategy = None
        self._queue = None
        if cfg.checkpoint.async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

            self._queue = AsyncCallsQueue()

    def _sharded_strategy(self):
        if self._strategy is None:
            from megatron.core.dist_checkpointing.serialization import (
                get_default_save_sharded_strategy,
            )
            from megatron.core.dist_checkpointing.strategies.fully_parallel import (
                FullyParallelSaveStrategyWrapper,
            )

            self._strategy = get_default_save_sharded_strategy()
            group = ps.get_data_parallel_group(with_context_parallel=True)
            if self.cfg.checkpoint.fully_parallel_save and group.size() > 1:
                self._strategy = FullyParallelSaveStrategyWrapper(
                    self._strategy, group, do_cache_distribution=True)
        return self._strategy

    def save(self, t: Trainer) -> str:
        """Save everything a resume needs; returns the checkpoint directory (with async saves,
        where it will be once written)."""
        self.wait()
        root = checkpoint_root(t.cfg)
        name = f"step-{t.state.step:08d}"
        final = os.path.join(root, name)
        partial = os.path.join(root, f".partial-{name}")
        if runtime.rank() == 0:
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
        runtime.barrier()
        sd = _state_dict(t, optimizer=_METADATA, rng=True, is_loading=False)
        sd.update(stage=t.stage.sharded_state_dict(), scheduler=t.scheduler.state_dict(),
                  train_state=dataclasses.asdict(t.state), layout=_layout_key(),
                  config=dump_yaml(t.cfg), vocab_size=t.stage.vocab_size())
        keep = t.cfg.checkpoint.keep_last

        def publish() -> None:  # the previous checkpoint stays `latest` until this one is whole
            runtime.barrier()
            if runtime.rank() == 0:
                shutil.rmtree(final, ignore_errors=True)
                os.replace(partial, final)
                write_text(os.path.join(root, LATEST), name + "\n")
                _prune(root, keep=keep, current=name)
            runtime.barrier()
            log.info("checkpoint saved: %s", final)

        request = dist_checkpointing.save(sd, partial, self._sharded_strategy(),
                                          async_sharded_save=self._queue is not None,
                                          content_metadata=_METADATA)
        if request is None:
            publish()
        else:
            request.add_finalize_fn(publish)
            self._queue.schedule_async_request(request)
            log.info("checkpoint %s: writing in the background", name)
        return final

    def poll(self) -> None:
        """Publish the background saves that every rank has finished writing."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Finish and publish every background save."""
        if self._queue is not None and self._queue.get_num_unfinalized_calls():
            self._queue.maybe_finalize_async_calls(blocking=True)

    def close(self, abort: bool = False) -> None:
        """`wait`, or on an error stop the writers (the unfinished save stays unpublished)."""
        if self._queue is None:
            return
        if not abort:
            self.wait()
            return
        while self._queue.async_calls:  # megatron's queue.close(abort=True) spares these
            self._queue.async_calls.popleft().async_caller.close(abort=True)


def _prune(root: str, keep: int, current: str) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    for old in steps[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for d in os.listdir(root):  # leftovers of saves that crashed
        if d.startswith(".partial-") and d != f".partial-{current}":
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


# model settings a checkpoint's weights only mean something under: the shapes, and what the
# weights were trained to expect (RoPE base, norm epsilon); layout, precision, kernels, dropout
# and the initialisation may change between runs
SAME_MODEL = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
              "num_query_groups", "tie_embeddings", "qkv_bias", "rotary_base",
              "rope_scaling_factor", "norm_epsilon")


def check_starting_checkpoint(cfg: Any, vocab_size: int, path: str,
                              key: str = "init.checkpoint") -> None:
    """ConfigError when the checkpoint at `path` (its run config in common.pt) holds another
    model than `cfg.model` over `vocab_size` tokens. dist_checkpointing would fail on some shapes
    with a traceback, and pads or cuts a vocabulary of another size without a word."""
    from trainer.config import ModelConfig

    common = dist_checkpointing.load_common_state_dict(path)
    if "config" not in common:  # not written by this trainer or `kiln import-hf`
        return
    run = yaml.safe_load(common["config"]) or {}
    if run.get("stage") == "rm" and cfg.stage != "rm":
        raise ConfigError(key, f"{path} is a reward model (stage: rm): its head scores text, "
                          f"stage {cfg.stage} needs a language model")
    defaults = to_dict(ModelConfig())

    def value(model: dict[str, Any], name: str) -> Any:
        v = model.get(name, defaults[name])
        if name == "num_query_groups" and v is None:  # None: one group per head
            return model.get("num_attention_heads", defaults["num_attention_heads"])
        return v

    mine, saved = to_dict(cfg.model), run.get("model") or {}
    for name in SAME_MODEL:
        if value(mine, name) != value(saved, name):
            raise ConfigError(f"model.{name}", f"{value(mine, name)!r}, but {key} {path} was "
                              f"trained with {value(saved, name)!r}: set it to match, or start "
                              "from a checkpoint of this model")
    check_vocabulary(common, path, vocab_size, cfg.model.make_vocab_size_divisible_by, key)


def check_vocabulary(common: dict[str, Any], path: str, vocab_size: int, divisible_by: int,
                     key: str) -> None:
    """ConfigError naming `key` when the checkpoint at `path` (`common`: its common.pt) was
    trained over another number of token ids than this run's `vocab_size`."""
    saved = (yaml.safe_load(common.get("config") or "") or {}).get("model") or {}
    theirs = common.get("vocab_size") or saved.get("vocab_size")
    if theirs is None:  # saved before the vocabulary was recorded: its padded rows
        from trainer.model import padded_vocab_size

        rows = dist_checkpointing.load_tensors_metadata(path)[
            "embedding.word_embeddings.weight"].global_shape[0]
        padded = padded_vocab_size(vocab_size, divisible_by, runtime.layout().tp)
        theirs = rows if rows != padded else None
    if theirs is not None and theirs != vocab_size:
        hint = (f"; if the data was tokenized with its tokenizer (an imported model's embedding "
                f"may have spare rows), set model.vocab_size={theirs}" if theirs > vocab_size
                else "")
        raise ConfigError(key, f"{path} was trained over {theirs} token ids, this run has "
                          f"{vocab_size} (model.vocab_size, else the data's tokenizer): the ids "
                          f"would mean other tokens; tokenize the data with the checkpoint's "
                          f"tokenizer{hint}")


@torch.no_grad()
def load_weights(model: list[torch.nn.Module], path: str, new: tuple[str, ...] = ()) -> None:
    """Only the model weights (e.g. `init.checkpoint`, evaluation under another layout).

    Tensors that the checkpoint lacks and whose dotted name has a component starting with one
    of `new` (`"reward_head."`) keep their initialisation (a reward head on a language-model
    checkpoint); anything else missing fails.
    """
    sd = {"model": _model_state(model)}
    fresh: list[set[str]] = [set() for _ in model]
    if new:
        stored = dist_checkpointing.load_tensors_metadata(path)
        for i, chunk_sd in enumerate(sd["model"].values()):
            for name, value in list(chunk_sd.items()):
                key = getattr(value, "key", "")
                if any(f".{p}" in f".{key}" for p in new) and key not in stored:
                    del chunk_sd[name]
                    fresh[i].add(name)
    loaded = dist_checkpointing.load(sd, path)
    for i, chunk in enumerate(model):
        # dist_checkpointing has already failed on anything else missing from the checkpoint
        unwrap(chunk).load_state_dict(loaded["model"][f"chunk{i}"], strict=not fresh[i])
        if fresh[i]:
            log.info("new weights, not in %s: %s", path, ", ".join(sorted(fresh[i])))


def _allocate_optimizer_state(optimizer: Any) -> None:
    """Give a fresh distributed optimizer its Adam state tensors, for the load to fill in.

    megatron's loading path reads the optimizer's step count from its state, which torch's Adam
    only creates on its first step; Megatron-LM takes the same dummy step before loading.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(sub, "_init_optimizer_states_with_dummy_values") and not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def _set_adam_steps(optimizer: Any, updates: int) -> None:
    """Give every parameter its own Adam step count (the number of applied updates).

    megatron 0.16.1's loader (without apex/TE) assigns one shared `step` tensor to all
    parameters; torch's Adam increments each parameter's step in place, so the shared count
    would advance once per parameter per step and skew the bias correction after a resume.
    """
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in sub.optimizer.state.values():
            if "step" in state:
                state["step"] = torch.tensor(float(updates))


def _load_optimizer(optimizer: Any, loaded: Any, updates: int) -> None:
    """Load the optimizer state `dist_checkpointing` read (in the format it was saved in).

    A distributed optimizer's fully reshardable state is loaded in megatron's two parts (param
    groups, then per-parameter tensors) with torch Adam's per-parameter `step` set aside in
    between: megatron 0.16.1 (without apex/TE) copies every entry of the live per-parameter state
    from the loaded tensors, `step` included, but these formats keep the step in the param groups
    only, so its own `load_state_dict` fails with a KeyError on 'step'. Every step count is then
    re-derived from the number of applied updates.
    """
    subs = getattr(optimizer, "chained_optimizers", [optimizer])
    parts = [loaded] if len(subs) == 1 else [loaded[i] for i in range(len(subs))]
    for sub, sd in zip(subs, parts, strict=True):
        if not (isinstance(sub, DistributedOptimizer)
                and sd.get("param_state_sharding_type") == "fully_reshardable"):
            sub.load_state_dict(sd)
            continue
        param_state = sd.pop("param_state")
        del sd["param_state_sharding_type"]
        sub.load_state_dict(sd)  # param groups, grad scaler and the shared step
        steps = {p: s.pop("step") for p, s in sub.optimizer.state.items() if "step" in s}
        sub.load_parameter_state_from_fully_reshardable(param_state)
        for p, step in steps.items():
            sub.optimizer.state[p]["step"] = step
    _set_adam_steps(optimizer, updates)


def _why_moments_restart(t: Trainer, common: dict, metadata: dict, same_split: bool) -> str | None:
    """Why the checkpoint's optimizer state cannot be loaded into this run; None when it can."""
    saved = yaml.safe_load(common["config"])["parallel"].get("distributed_optimizer", True)
    now = t.cfg.parallel.distributed_optimizer
    if saved != now:
        return f"parallel.distributed_optimizer was {saved}, now {now} (different state layouts)"
    kind = metadata.get("distrib_optim_sharding_type")
    if now and not same_split and kind != "fully_reshardable":
        return (f"its distributed optimizer state ({kind}, an older format) is stored per "
                "DP rank of the TP/PP/VPP/CP split it was saved under")
    return None


def _load_strategy(cfg: Any, path: str) -> Any:
    """`checkpoint.fully_parallel_load`: the DP×CP ranks that need the same tensors each read a
    share from storage and exchange the rest (Megatron-LM's --ckpt-fully-parallel-load), instead
    of every one of them reading everything; None: megatron's default reader."""
    group = ps.get_data_parallel_group(with_context_parallel=True)
    if not cfg.checkpoint.fully_parallel_load or group.size() == 1:
        return None
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(path), group)


def resume_position(cfg: Any) -> tuple[int, int] | None:
    """(step, consumed samples) of the checkpoint this run will resume from, None when it
    starts afresh: data is built before the weights are restored, and must reach as far."""
    path = latest_checkpoint(checkpoint_root(cfg)) if cfg.checkpoint.resume else None
    if path is None:
        return None
    state = dist_checkpointing.load_common_state_dict(path)["train_state"]
    return state["step"], state["consumed_samples"]


def _log_schedule_change(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """The learning-rate schedule follows the config on resume: say what differs from the one
    the checkpoint was trained under."""
    changed = [f"{k} {saved[k]} -> {now[k]}" for k in sorted(now)
               if k != "num_steps" and k in saved and saved[k] != now[k]]
    if changed:
        log.warning("the learning-rate schedule differs from the checkpoint's; it follows the "
                    "config from step %d on: %s", saved.get("num_steps", 0), ", ".join(changed))


@torch.no_grad()
def restore(t: Trainer) -> None:
    """Resume from `<checkpoint dir>/latest`, else start from `init.checkpoint`, else do nothing."""
    cfg = t.cfg
    root = checkpoint_root(cfg)
    path = latest_checkpoint(root) if cfg.checkpoint.resume else None
    if path is None:
        if cfg.init.checkpoint:
            init = resolve(cfg.init.checkpoint)
            load_weights(t.model, init, new=t.stage.new_weights)
            log.info("initial weights from %s", init)
        return
    common = dist_checkpointing.load_common_state_dict(path)
    metadata = dist_checkpointing.load_content_metadata(preloaded_state_dict=common)
    metadata = metadata or _LEGACY_METADATA
    saved, now = common.get("layout"), _layout_key()
    same_split = saved is not None and saved[:4] == now[:4]  # TP, PP, VPP, CP (DP may differ)
    restart = _why_moments_restart(t, common, metadata, same_split)
    if restart is None:
        _allocate_optimizer_state(t.optimizer)
    else:
        log.warning("resuming %s under TP/PP/VPP/CP/DP %s (saved %s): %s; weights, LR schedule and "
                    "data position carry over, Adam moments restart from zero", path, now, saved,
                    restart)
    sd = _state_dict(t, optimizer=metadata if restart is None else None, rng=saved == now,
                     is_loading=True)
    if "stage" in common:  # absent from checkpoints older than the stage hook
        sd["stage"] = t.stage.sharded_state_dict(per_rank=saved == now)
    loaded = dist_checkpointing.load(sd, path, _load_strategy(cfg, path))
    for i, chunk in enumerate(t.model):
        unwrap(chunk).load_state_dict(loaded["model"][f"chunk{i}"])
    for key, value in common["train_state"].items():
        setattr(t.state, key, value)
    _log_schedule_change(common["scheduler"], t.scheduler.state_dict())
    t.scheduler.load_state_dict(common["scheduler"])
    if restart is None:
        _load_optimizer(t.optimizer, loaded["optimizer"], t.state.step - t.state.skipped_steps)
    if saved == now:  # RNG streams are per rank: meaningful only under the same layout
        runtime.set_rng_state(loaded["rng_state"])
    if "stage" in sd:
        t.stage.load_state_dict(loaded["stage"])
    log.info("resumed from %s at step %d (%d samples consumed)", path, t.state.step,
             t.state.consumed_samples)
