"""Checkpoints with megatron `dist_checkpointing`: atomic, resumable, loadable under a new layout.

Layout on disk: `<dir>/step-00000042/` (one dist checkpoint) and `<dir>/latest` (its name). A save
writes `<dir>/.partial-step-…/`, renames it into place and only then moves `latest`, so a crash at
any moment leaves the previous checkpoint and `latest` intact. Tensors are stored by global name
and offset, so a run with another TP/PP/DP layout loads the same weights. Resuming restores
weights, optimizer, LR schedule, data position and RNG; the optimizer state is stored per DP rank,
so under a new TP/PP split a resume keeps weights, schedule and data position and restarts Adam's
moments (with a warning); the per-rank RNG state is restored only under the same layout.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import TYPE_CHECKING, Any

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel as mp
from megatron.core.dist_checkpointing.mapping import ShardedObject

from kiln.config import dump_yaml
from kiln.errors import ConfigError
from kiln.log import get_logger
from kiln.paths import write_text
from tensor_parallel import runtime

if TYPE_CHECKING:
    from trainer.loop import Trainer

log = get_logger(__name__)

LATEST = "latest"
# Optimizer state as raw per-DP-rank buffers: torch Adam keeps a per-parameter `step` that
# megatron 0.16.1's reshardable formats drop on load, so resuming keeps the TP/PP layout.
_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_root(cfg: Any) -> str:
    return cfg.checkpoint.dir or os.path.join(cfg.run_dir, "checkpoints")


def latest_checkpoint(root: str) -> str | None:
    """The directory `latest` names, or None when there is no complete checkpoint."""
    marker = os.path.join(root, LATEST)
    if not os.path.exists(marker):
        return None
    with open(marker, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    return path if os.path.isdir(path) else None


def resolve(path: str) -> str:
    """A checkpoint directory, or a checkpoints root (then its `latest`)."""
    if os.path.exists(os.path.join(path, LATEST)):
        found = latest_checkpoint(path)
        if found is not None:
            return found
    if not os.path.exists(os.path.join(path, "metadata.json")):
        raise ConfigError("init.checkpoint", f"{path} is not a checkpoint (no metadata.json/latest)")
    return path


def _layout_key() -> list[int]:
    layout = runtime.layout()
    return [layout.tp, layout.pp, layout.vpp or 1, layout.cp, layout.dp]


def _rng_object() -> ShardedObject:
    layout = runtime.layout()
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if runtime.on_gpu() else None,
             "tracker": mp.get_cuda_rng_tracker().get_states()}
    return ShardedObject("rng_state", state, (layout.pp, layout.tp, layout.dp),
                         (ps.get_pipeline_model_parallel_rank(), runtime.tp_rank(),
                          runtime.dp_rank()), replica_id=0)


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / Float16Module: checkpoint keys must not depend on wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _model_state(model: list[torch.nn.Module]) -> dict[str, Any]:
    return {f"chunk{i}": unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _state_dict(t: Trainer, *, optimizer: bool, rng: bool, is_loading: bool) -> dict:
    model_sd = _model_state(t.model)
    sd: dict[str, Any] = {"model": model_sd}
    if optimizer:
        sd["optimizer"] = t.optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                       metadata=_METADATA)
    if rng:
        sd["rng_state"] = _rng_object()
    return sd


def save(t: Trainer) -> str:
    """Save everything a resume needs; returns the checkpoint directory."""
    root = checkpoint_root(t.cfg)
    name = f"step-{t.state.step:08d}"
    final = os.path.join(root, name)
    partial = os.path.join(root, f".partial-{name}")
    if runtime.rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    runtime.barrier()
    sd = _state_dict(t, optimizer=True, rng=True, is_loading=False)
    sd.update(scheduler=t.scheduler.state_dict(), train_state=dataclasses.asdict(t.state),
              layout=_layout_key(), config=dump_yaml(t.cfg))
    dist_checkpointing.save(sd, partial)
    runtime.barrier()
    if runtime.rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        write_text(os.path.join(root, LATEST), name + "\n")
        _prune(root, keep=t.cfg.checkpoint.keep_last, current=name)
    runtime.barrier()
    log.info("checkpoint saved: %s", final)
    return final


def _prune(root: str, keep: int, current: str) -> None:
    steps = sorted(d for d in os.listdir(root) if d.startswith("step-"))
    for old in steps[:-keep] if keep > 0 else []:
        if old != current:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    for d in os.listdir(root):  # leftovers of saves that crashed
        if d.startswith(".partial-") and d != f".partial-{current}":
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


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
    saved, now = common.get("layout"), _layout_key()
    same_split = saved is not None and saved[:4] == now[:4]  # TP, PP, VPP, CP (DP may differ)
    if same_split:
        _allocate_optimizer_state(t.optimizer)
    else:
        log.warning("resuming %s under TP/PP/VPP/CP %s (saved %s): weights, LR schedule and data "
                    "position carry over; Adam moments restart from zero", path, now[:4], saved)
    sd = _state_dict(t, optimizer=same_split, rng=saved == now, is_loading=True)
    loaded = dist_checkpointing.load(sd, path)
    for i, chunk in enumerate(t.model):
        unwrap(chunk).load_state_dict(loaded["model"][f"chunk{i}"])
    for key, value in common["train_state"].items():
        setattr(t.state, key, value)
    t.scheduler.load_state_dict(common["scheduler"])
    if same_split:
        t.optimizer.load_state_dict(loaded["optimizer"])
        _set_adam_steps(t.optimizer, t.state.step - t.state.skipped_steps)
    if saved == now:  # RNG streams are per rank: meaningful only under the same layout
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        mp.get_cuda_rng_tracker().set_states(rng["tracker"])
    log.info("resumed from %s at step %d (%d samples consumed)", path, t.state.step,
             t.state.consumed_samples)
