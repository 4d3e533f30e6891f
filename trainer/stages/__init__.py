"""Training stages: what each one plugs into the one shared loop (`trainer.loop.train`).

A stage `foo` lives in `trainer/stages/foo.py` and exports `STAGE`, a `Stage` subclass; its own
config section (if any) is the dataclass `STAGE.options`, read from the YAML key `foo:`. The loop
owns everything else: parallel layout, megatron schedules, DDP, optimizer, LR schedule, clipping,
bad-step skipping, evaluation, metrics and checkpoints.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch

from kiln.errors import ConfigError

Batch = dict[str, torch.Tensor]
# (sum of the loss over this micro-batch's units, number of units, {metric: sum over the units}).
# "Units" are what the loss averages over: tokens for LM losses, pairs for DPO, sequences for RM.
LossOutput = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class Stage:
    """Base class: data, model and loss of one stage. Subclasses override what differs.

    Call order: `setup()` once (after the distributed runtime is up), `build_model()` once, then
    per step `before_step(step, model)` and, per micro-batch, `forward(model_chunk, batch)` on
    every pipeline stage and `loss(output, batch)` on the last one. A resumed run calls
    `load_state_dict` after `build_model`, before the first step.
    """

    name: ClassVar[str]
    options: ClassVar[type | None] = None
    # Sequences the model sees per sample: 2 when a sample is a (chosen, rejected) pair in one
    # forward. Pipeline p2p buffers are [seq, micro_batch_size × this, hidden].
    sequences_per_sample: ClassVar[int] = 1
    # Parameter-name components an `init.checkpoint` may lack (a new head on a pretrained
    # backbone, e.g. "reward_head."): they keep their initialisation instead of failing the load.
    new_weights: ClassVar[tuple[str, ...]] = ()
    # Context parallelism splits every sequence over the CP ranks: right for losses summed per
    # token (the loop normalises by tokens over DP x CP), wrong for losses of whole sequences
    # (preference pairs, rewards, sampled completions), which stay at parallel.cp=1.
    context_parallel: ClassVar[bool] = False

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        """Open the data (every rank) and anything else the stage needs before the model."""

    def vocab_size(self) -> int:
        """Unpadded vocabulary size of the data's tokenizer (the loop pads it for TP)."""
        raise NotImplementedError

    def build_model(self, padded_vocab_size: int) -> list[torch.nn.Module]:
        """This rank's model chunks; default: the Llama-style GPT of `cfg.model`."""
        from trainer.model import build_gpt_chunks

        return build_gpt_chunks(self.cfg, padded_vocab_size)

    def train_batches(self, start_sample: int) -> Iterator[Batch]:
        """This DP rank's training micro-batches, from global sample `start_sample` on."""
        raise NotImplementedError

    def valid_batches(self) -> Iterator[Batch] | None:
        """This DP rank's validation micro-batches (the same ones at every evaluation)."""
        return None

    def before_step(self, step: int, model: list[torch.nn.Module]) -> None:
        """Hook before each optimizer step (rollouts for PPO/GRPO, reference refresh...)."""

    def before_evaluate(self, step: int, model: list[torch.nn.Module]) -> None:
        """Hook before a run with nothing left to train (`train.steps` reached, or 0) evaluates
        the weights it loaded or started from."""

    def sharded_state_dict(self, per_rank: bool = True) -> dict[str, Any]:
        """What a resume needs of the stage beyond the trainer's checkpoint (weights, optimizer,
        LR schedule, data position, RNG): e.g. PPO's adaptive β and the rollout in training.

        Plain values must be the same on every rank: they are stored once, in the checkpoint's
        common state. State that differs between ranks goes in megatron `ShardedObject`s, asked
        for only when `per_rank` (a load under the layout the checkpoint was saved with).
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `sharded_state_dict` saved (each `ShardedObject` replaced by its value)."""

    def forward(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """One model chunk on one micro-batch. Default: causal LM with per-token loss."""
        return model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                     attention_mask=None, labels=batch["labels"])

    def loss(self, output: torch.Tensor, batch: Batch) -> LossOutput:
        """Last pipeline stage only. Default: token-level cross-entropy under `loss_mask`."""
        mask = batch["loss_mask"]
        loss_sum = (output.float() * mask).sum()
        return loss_sum, mask.sum().to(torch.int), {}


def stage_class(name: str) -> type[Stage]:
    """The `Stage` subclass of `trainer/stages/<name>.py`."""
    if not name.isidentifier():
        raise ConfigError("stage", f"not a stage name: {name!r}")
    try:
        module = importlib.import_module(f"trainer.stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"trainer.stages.{name}":
            raise
        raise ConfigError("stage", f"unknown stage {name!r} (no trainer/stages/{name}.py)") from None
    stage = getattr(module, "STAGE", None)
    if not (isinstance(stage, type) and issubclass(stage, Stage)):
        raise ConfigError("stage", f"trainer/stages/{name}.py defines no STAGE class")
    return stage
