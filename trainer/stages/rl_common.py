"""What PPO and GRPO share: prompts from a `prompts` dataset, rollouts sampled by the policy the
optimizer trains, a frozen reference and reward model, and the loop's steps as PPO mini-batches.

One rollout = `prompts_per_rollout × samples_per_prompt` sequences (split over DP ranks). The
loop then takes `epochs × rollout / train.global_batch_size` optimizer steps on it, one shuffled
mini-batch of `global_batch_size` sequences per step; `before_step` samples the next rollout
when the previous one is used up. Generation runs on the loop's own model chunks (the DDP-wrapped
modules whose parameters the optimizer updates), so no weights are copied between the trainer
and the sampler. TP, PP, VPP and DP all run: under PP the prompt and every decode step pass
through megatron's forward-only pipeline schedule (under VPP through the chunks in turn), the
last stage samples and broadcasts the tokens, and the rollout (padded to `train.seq_length`, the
pipeline's one activation shape) is scored the same way, so every stage holds the same rollout.
Sequence parallelism is switched off while sampling (trainer/generate.py) and on for scoring and
training, with the rollout padded to a multiple of TP. Context parallelism is refused: a
decoding step's one token cannot be split over CP ranks.

Rewards: `reward_function: "module:function"` (see trainer/rewards.py) and/or
`reward_model: CHECKPOINT` (a `stage: rm` checkpoint, any layout); with both they are added.
The reference is the starting policy: `init.checkpoint`, or a copy of the seeded initial weights.

Checkpoints hold the rollout in training (its tensors and the mini-batches left, per DP rank), so
a run resumed in the middle of a rollout continues it exactly. Under another parallel layout, or a
rollout schedule changed by the config, it samples that rollout again with the restored policy.
Nothing else needs saving: prompts, generation seeds and mini-batch orders are functions of
(`train.seed`, rollout index, DP rank), and whitening uses each rollout's own moments.
"""

from __future__ import annotations

import copy
import json
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import yaml
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedObject

from kiln.config import check_range, from_dict
from kiln.errors import ConfigError
from kiln.log import get_logger
from tensor_parallel import runtime
from tensor_parallel.plan.memory import bytes_per_parameter
from trainer.chat_data import DistributedSampler
from trainer.checkpoint import check_vocabulary, resolve
from trainer.config import ModelConfig
from trainer.generate import SamplingParams, generate, load_frozen
from trainer.model import build_gpt_chunks, check_fits_layout
from trainer.reference import frozen_reference
from trainer.reward_head import GPTRewardModel
from trainer.rewards import (
    call_reward_function,
    check_reward_arguments,
    load_reward_function,
    reads_references,
)
from trainer.rollout import (
    RolloutBatch,
    forward_sequences,
    from_generation,
    pad_sequences,
    policy_logps,
    reward_model_scores,
    score,
)
from trainer.stages import Batch
from trainer.stages.chat_common import ChatOptions, ChatStage
from trainer.text_tokenizer import TextTokenizer

log = get_logger(__name__)


@dataclass
class RolloutOptions(ChatOptions):
    prompts_per_rollout: int = 8  # prompts per rollout, over all DP ranks
    samples_per_prompt: int = 1  # completions per prompt (GRPO's group size)
    epochs: int = 1  # optimisation passes over each rollout
    max_new_tokens: int = 32
    greedy: bool = False  # argmax sampling (layout checks); else temperature/top-k/top-p
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    stop_token_ids: list[int] = field(default_factory=lambda: [3])  # llmkiln's </s>
    reward_function: str | None = None  # "module:function", see trainer/rewards.py
    reward_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments to it
    reward_model: str | None = None  # a reward-model checkpoint (stage: rm)

    def check_values(self, prefix: str) -> None:
        if self.reward_function is None and self.reward_model is None:
            raise ConfigError(f"{prefix}reward_function", "set a reward_function and/or a "
                              "reward_model")
        for key in ("prompts_per_rollout", "samples_per_prompt", "epochs", "max_new_tokens"):
            check_range(f"{prefix}{key}", getattr(self, key), 1)
        SamplingParams(self.greedy, self.temperature, self.top_k, self.top_p).check(prefix)


class RLStage(ChatStage):
    """Rollouts and their mini-batches; subclasses score advantages and define the loss."""

    contracts = ("prompts",)
    policy_class: ClassVar[type] = None  # set by subclasses (GPTModel or GPTActorCritic)

    # ---- set-up -----------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        o, tr = self.opts, self.cfg.train
        sec = self.name
        self.rollout_size = o.prompts_per_rollout * o.samples_per_prompt
        if self.rollout_size % tr.global_batch_size:
            raise ConfigError("train.global_batch_size", f"{tr.global_batch_size} does not divide "
                              f"a rollout of {self.rollout_size} sequences ({sec}.prompts_per_"
                              f"rollout × {sec}.samples_per_prompt)")
        if tr.seq_length <= o.max_new_tokens:
            raise ConfigError("train.seq_length", f"must exceed {sec}.max_new_tokens")
        self.steps_per_rollout = o.epochs * self.rollout_size // tr.global_batch_size
        self.reward_fn = (load_reward_function(o.reward_function, f"{sec}.reward_function")
                          if o.reward_function else None)
        if self.reward_fn is not None:
            check_reward_arguments(self.reward_fn, o.reward_kwargs, f"{sec}.reward_kwargs")
            column = self.data.table.column("reference")
            if reads_references(self.reward_fn) and column.null_count == len(column):
                raise ConfigError(f"{sec}.reward_function", f"{o.reward_function} checks "
                                  f"reference answers, and {self.data.directory} has none (every "
                                  "row's is null): every reward would be the same")
        # decodes the texts reward functions read: a `kiln tokenizer` or Hugging Face directory
        self.tokenizer = (TextTokenizer(o.tokenizer) if o.tokenizer and os.path.isdir(o.tokenizer)
                          else None)
        if o.prompts_per_rollout % runtime.dp_size():
            raise ConfigError(f"{sec}.prompts_per_rollout", f"{o.prompts_per_rollout} does not "
                              f"divide over the data-parallel size {runtime.dp_size()}")
        self.sampler = DistributedSampler(len(self.train_rows), o.prompts_per_rollout,
                                          runtime.dp_rank(), runtime.dp_size(), tr.seed)
        self.rollout: RolloutBatch | None = None
        self.rollout_metrics: dict[str, float] = {}
        self._minibatches: deque[torch.Tensor] = deque()  # this DP rank's rows of each step left
        self._step_rows: torch.Tensor | None = None  # ... and of the step in training

    def check_split_sizes(self) -> None:
        """Prompts are drawn a rollout at a time; nothing is validated."""
        n, per = len(self.train_rows), self.opts.prompts_per_rollout
        if n < per:
            raise ConfigError(f"{self.name}.prompts_per_rollout", f"{per} is more than the {n} "
                              f"training prompts (data.split {self.cfg.data.split!r})")

    def valid_batches(self) -> Iterator[Batch] | None:
        return None  # progress is the reward of each rollout

    def build_model(self, padded_vocab_size: int) -> list[torch.nn.Module]:
        """The policy chunks the optimizer trains (one per virtual pipeline stage), plus the
        frozen reference and reward model, split the same way."""
        policy = build_gpt_chunks(self.cfg, padded_vocab_size, model_class=self.policy_class)
        self.reference = frozen_reference(self.cfg, policy, padded_vocab_size,
                                          model_class=self.policy_class, new=self.new_weights)
        self.reward_model = self._frozen_reward_model(padded_vocab_size)
        self._log_memory(policy)
        return policy

    def _frozen_reward_model(self, vocab: int) -> list[torch.nn.Module] | None:
        path = self.opts.reward_model
        if path is None:
            return None
        path = resolve(path)
        common = dist_checkpointing.load_common_state_dict(path)
        saved = common.get("config")
        if saved is None:
            raise ConfigError(f"{self.name}.reward_model", f"{path} holds no run config")
        run = yaml.safe_load(saved)
        if run.get("stage") != "rm":
            raise ConfigError(f"{self.name}.reward_model", f"{path} is a '{run.get('stage')}' "
                              "checkpoint, not a reward model (stage: rm)")
        check_vocabulary(common, path, self.vocab_size(),
                         self.cfg.model.make_vocab_size_divisible_by, f"{self.name}.reward_model")
        rm_cfg = copy.copy(self.cfg)
        rm_cfg.model = from_dict(ModelConfig, run["model"], "model")
        try:  # it runs under this run's layout
            check_fits_layout(rm_cfg.model, self.cfg.train.seq_length, sequence_parallel=False)
        except ConfigError as exc:
            raise ConfigError(f"{self.name}.reward_model", f"{path}: the reward model "
                              f"cannot take this run's layout: {exc}") from None
        log.info("reward model from %s", path)
        return load_frozen(build_gpt_chunks(rm_cfg, vocab, model_class=GPTRewardModel), path)

    def _log_memory(self, policy: list[torch.nn.Module]) -> None:
        """Parameter and optimizer bytes of the four models on this rank (plan's byte costs)."""
        dtype = "bf16" if self.cfg.model.precision == "bf16" else "fp32"
        weight_b, grad_b, optim_b = bytes_per_parameter(dtype)
        dp = runtime.dp_size() if self.cfg.parallel.distributed_optimizer else 1
        critic = any(hasattr(chunk, "value_head") for chunk in policy)
        rows = [("actor+critic" if critic else "actor", policy, True),
                ("reference", self.reference, False), ("reward model", self.reward_model, False)]
        total = 0
        for name, chunks, trained in rows:
            if chunks is None:
                continue
            n = sum(p.numel() for chunk in chunks for p in chunk.parameters())
            cost = n * weight_b + (n * grad_b + -(-n * optim_b // dp) if trained else 0)
            total += cost
            log.info("memory plan: %-12s %9.3fM params, %8.1f MiB weights%s", name, n / 1e6,
                     n * weight_b / 2**20, f", {(cost - n * weight_b) / 2**20:.1f} MiB grads+Adam"
                     if trained else " (frozen)")
        m = self.cfg.model
        kv_heads = m.num_query_groups or m.num_attention_heads
        layers = m.num_layers // self.cfg.parallel.pp  # each stage caches its own layers
        kv = (2 * layers * kv_heads * (m.hidden_size // m.num_attention_heads) * weight_b
              * self.cfg.train.seq_length * self.rollout_size // runtime.dp_size()
              // self.cfg.parallel.tp)
        log.info("memory plan: %.1f MiB for the models, %.1f MiB KV cache per rollout (this rank)",
                 total / 2**20, kv / 2**20)

    # ---- rollouts ---------------------------------------------------------------------------
    def before_step(self, step: int, model: list[torch.nn.Module]) -> None:
        if not self._minibatches:
            index, done = divmod(step, self.steps_per_rollout)
            self._sample_rollout(index, model)
            for _ in range(done):  # resumed mid-rollout: this rollout's remaining steps only
                self._minibatches.popleft()
        self._step_rows = self._minibatches.popleft()

    def _prompts(self, rollout_index: int) -> list[dict]:
        self.sampler.state.consumed_samples = rollout_index * self.opts.prompts_per_rollout
        return self.data.rows(self.train_rows[self.sampler.next_global_batch()])

    def _sample_rollout(self, index: int, policy: list[torch.nn.Module]) -> None:
        o, tr = self.opts, self.cfg.train
        rows = [r for r in self._prompts(index) for _ in range(o.samples_per_prompt)]
        keep = tr.seq_length - o.max_new_tokens  # keep each prompt's end (the assistant header)
        prompts = [r["prompt_ids"][-keep:].tolist() for r in rows]
        seed = np.random.SeedSequence([tr.seed, index, runtime.dp_rank()]).generate_state(1)[0]
        gen = generate(policy, prompts, max_new_tokens=o.max_new_tokens,
                       vocab_size=self.vocab_size(), pad_id=self.pad_id,
                       stop_ids=o.stop_token_ids,
                       sampling=SamplingParams(o.greedy, o.temperature, o.top_k, o.top_p),
                       generator=torch.Generator().manual_seed(int(seed)))
        seqs = from_generation(gen)
        length = self.seq_len()  # one shape for the pipeline's buffers
        if length is None and self.cfg.parallel.sequence_parallel:  # split evenly over TP
            length = -(-seqs["tokens"].shape[1] // runtime.layout().tp) * runtime.layout().tp
        if length is not None:
            seqs = pad_sequences(seqs, length, self.pad_id)
        scores = self._scores(rows, prompts, gen.completion_ids(), seqs)
        mb = tr.micro_batch_size
        old = score(policy, seqs, mb, self._read_policy)
        [ref_logps] = score(self.reference, seqs, mb, lambda out, b: self._read_policy(out, b)[:1])
        self.rollout = self.make_rollout(seqs, scores, old, ref_logps)
        self.rollout_metrics = self.rollout_stats(self.rollout)
        self._schedule_minibatches(index)
        self._record(index, prompts, gen.completion_ids(), scores)

    def _record(self, index: int, prompts: list[list[int]], completions: list[list[int]],
                scores: torch.Tensor) -> None:
        """Append this DP rank's samples to `<run_dir>/rollouts/dp<rank>.jsonl` (to read them)."""
        if runtime.tp_rank() != 0 or not runtime.is_last_stage():
            return
        path = os.path.join(self.cfg.run_dir, "rollouts", f"dp{runtime.dp_rank()}.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for p, c, r in zip(prompts, completions, scores.tolist(), strict=True):
                f.write(json.dumps({"rollout": index, "prompt_ids": p, "completion_ids": c,
                                    "score": r}) + "\n")

    def _read_policy(self, output: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(log-probs of the labels, and values when the model has a critic) of a scoring pass."""
        logits, values = output if isinstance(output, tuple) else (output, None)
        logps = policy_logps(logits, batch["labels"], self.vocab_size(), self.opts.temperature)
        return (logps,) if values is None else (logps, values)

    def _scores(self, rows: list[dict], prompts: list[list[int]],
                completions: list[list[int]], seqs: dict[str, torch.Tensor]) -> torch.Tensor:
        o = self.opts
        total = torch.zeros(len(rows), dtype=torch.float32, device=runtime.device())
        if self.reward_fn is not None:
            decode = self.tokenizer.decode if self.tokenizer is not None else (lambda _: None)
            values = call_reward_function(
                self.reward_fn, len(rows), f"{self.name}.reward_function",
                prompts=[decode(p) for p in prompts], completions=[decode(c) for c in completions],
                prompt_ids=prompts, completion_ids=completions,
                references=[r.get("reference") for r in rows], **o.reward_kwargs)
            total += torch.tensor(values, dtype=torch.float32, device=total.device)
        if self.reward_model is not None:
            total += reward_model_scores(self.reward_model, seqs, self.cfg.train.micro_batch_size)
        return total

    def _schedule_minibatches(self, index: int) -> None:
        """This rank's rows of each remaining step of the rollout: `epochs` shuffled passes."""
        n = len(self.rollout)
        per_step = self.cfg.train.global_batch_size // runtime.dp_size()
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 7919 + index)
        self._minibatches.clear()
        for _ in range(self.opts.epochs):
            order = torch.randperm(n, generator=gen)
            self._minibatches.extend(order[k:k + per_step] for k in range(0, n, per_step))

    def global_mean(self, values: torch.Tensor) -> float:
        """Mean of per-sequence values over every DP rank's rollout."""
        pair = torch.stack([values.double().sum(), torch.tensor(float(values.numel()),
                                                                dtype=torch.float64,
                                                                device=values.device)])
        runtime.dp_all_reduce(pair)
        return float(pair[0] / pair[1])

    def global_moments(self, values: torch.Tensor, mask: torch.Tensor) -> tuple[float, float, float]:
        """(mean, biased variance, count) of `values` where `mask`, over every DP rank's rollout:
        whitening and explained variance then do not depend on how DP splits the rollout."""
        m = mask.double()
        x = values.double() * m
        sums = torch.stack([x.sum(), (x * x).sum(), m.sum()])
        runtime.dp_all_reduce(sums)
        total, squares, count = sums.tolist()
        mean = total / count
        return mean, max(squares / count - mean * mean, 0.0), count

    def rollout_stats(self, r: RolloutBatch) -> dict[str, float]:
        """Rollout-wide metrics (all DP ranks): reward, KL to the reference, completion length."""
        mask = r.loss_mask
        return {"reward_mean": self.global_mean(r.scores),
                "kl": self.global_mean(((r.old_logps - r.ref_logps) * mask).sum(-1)),
                "completion_length": self.global_mean(mask.sum(-1))}

    # ---- checkpoints ------------------------------------------------------------------------
    def _schedule(self) -> list[int]:
        return [self.rollout_size, self.opts.epochs, self.cfg.train.global_batch_size]

    def sharded_state_dict(self, per_rank: bool = True) -> dict[str, Any]:
        """The rollout in training: its rollout-wide metrics (the same on every rank) and, per DP
        rank, its tensors and the mini-batches still to take (one object per DP rank; its TP, PP
        and CP ranks hold the same rollout). An exhausted rollout stores no tensors."""
        state: dict[str, Any] = {"rollout_metrics": dict(self.rollout_metrics),
                                 "steps_left": len(self._minibatches), "schedule": self._schedule()}
        if per_rank:
            left = self.rollout is not None and bool(self._minibatches)
            batch = {k: v.cpu() for k, v in vars(self.rollout).items() if v is not None} \
                if left else None
            state["rollout"] = ShardedObject(
                f"stage.{self.name}.rollout", {"batch": batch, "minibatches": list(self._minibatches)},
                (runtime.dp_size(),), (runtime.dp_rank(),),
                replica_id=(runtime.tp_rank(), runtime.pp_rank(), ps.get_context_parallel_rank()))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollout_metrics = dict(state["rollout_metrics"])
        saved = state.get("rollout")
        if saved is None or saved["batch"] is None:
            return
        if state["schedule"] != self._schedule():
            log.warning("the checkpoint's rollout was cut into mini-batches for (rollout size, "
                        "epochs, train.global_batch_size) = %s, now %s: sampling it again",
                        state["schedule"], self._schedule())
            return
        device = runtime.device()
        self.rollout = RolloutBatch(**{k: v.to(device) for k, v in saved["batch"].items()})
        self._minibatches = deque(saved["minibatches"])

    # ---- training -----------------------------------------------------------------------------
    def train_batches(self, start_sample: int) -> Iterator[Batch]:
        """The micro-batches of the step's rows (`before_step` takes them from the rollout): every
        iterator yields the same ones, as the loop makes one per model chunk."""
        mb = self.cfg.train.micro_batch_size
        while True:
            rows = self._step_rows
            for k in range(0, len(rows), mb):
                yield self.rollout.select(rows[k:k + mb])

    def forward(self, model: torch.nn.Module, batch: Batch) -> Any:
        return forward_sequences(model, batch)

    def with_rollout_metrics(self, metrics: dict[str, torch.Tensor], units: torch.Tensor
                             ) -> dict[str, torch.Tensor]:
        """Per-unit sums for the loop (it divides by all units of the step): rollout-wide values
        come back exactly, the others as means over the mini-batch's units."""
        out = {k: v.detach().double() * units for k, v in metrics.items()}
        out.update({k: torch.tensor(v, dtype=torch.float64, device=units.device) * units
                    for k, v in self.rollout_metrics.items()})
        return out

    def make_rollout(self, seqs: dict[str, torch.Tensor], scores: torch.Tensor,
                     policy: list[torch.Tensor], ref_logps: torch.Tensor) -> RolloutBatch:
        raise NotImplementedError

