"""RL rollouts: sample completions for a batch of prompts with the policy being trained, then score
every sequence in the training layout (log-probs of the policy and the reference, values of the
critic, rewards of the reward model).

Layout of a rollout (`[n, S]`, `S = P + N - 1` for prompts left-padded to P and N new tokens):
`tokens = sequence[:, :-1]`, `labels = sequence[:, 1:]`, `loss_mask = 1` where a label is a
generated token (the stop token included), `valid` = False on padding (hidden from attention).
This is the sampler's own buffer, so the log-probs scored here are those of the tokens sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from tensor_parallel import runtime
from tensor_parallel.vocab_parallel import vocab_parallel_log_probs
from trainer.forward import forward_only
from trainer.generate import Generation, attention_mask, position_ids
from trainer.reward_head import sequence_rewards


@dataclass
class RolloutBatch:
    """Per-sequence and per-token tensors of one rollout on this DP rank (all `[n, ...]`)."""

    tokens: torch.Tensor  # [n, S] model input
    labels: torch.Tensor  # [n, S] next token
    loss_mask: torch.Tensor  # [n, S] 1 on generated labels
    valid: torch.Tensor  # [n, S] False on padding
    scores: torch.Tensor  # [n] reward of each completion
    old_logps: torch.Tensor  # [n, S] log π_old(label), the sampling policy
    ref_logps: torch.Tensor  # [n, S] log π_ref(label)
    advantages: torch.Tensor  # [n, S] (PPO) or [n] (GRPO)
    old_values: torch.Tensor | None = None  # [n, S] critic at sampling time (PPO)
    returns: torch.Tensor | None = None  # [n, S] GAE returns (PPO)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """A micro-batch: the rows `rows` of every tensor, by field name."""
        return {f.name: getattr(self, f.name)[rows] for f in fields(self)
                if getattr(self, f.name) is not None}


def from_generation(gen: Generation) -> dict[str, torch.Tensor]:
    """tokens / labels / loss_mask / valid of the sampled sequences (see the module docstring)."""
    p = gen.prompt_length
    # drop the padding columns after the longest completion (every row stopped before them)
    width = int(gen.valid.any(0).nonzero().max()) + 1
    tokens, valid = gen.tokens[:, :width], gen.valid[:, :width]
    loss_mask = valid[:, 1:].clone()
    loss_mask[:, :p - 1] = False
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask.float(),
            "valid": valid[:, :-1]}


def pad_sequences(seqs: dict[str, torch.Tensor], length: int, pad_id: int) -> dict[str, torch.Tensor]:
    """`from_generation`'s tensors right-padded to `length` columns (padding: not valid, no loss),
    for pipeline parallelism, whose stages pass activations of one fixed shape."""
    extra = length - seqs["tokens"].shape[1]
    if extra < 0:
        raise ValueError(f"rollout sequences of {seqs['tokens'].shape[1]} tokens exceed {length}")
    fill = {"tokens": pad_id, "labels": pad_id, "loss_mask": 0.0, "valid": False}
    return {k: torch.nn.functional.pad(v, (0, extra), value=fill[k]) for k, v in seqs.items()}


def forward_sequences(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """The model on full sequences of the rollout layout (training and scoring)."""
    valid = batch["valid"]
    return model(input_ids=batch["tokens"], position_ids=position_ids(valid),
                 attention_mask=attention_mask(valid, valid.shape[1]))


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Vocab-parallel logits `[..., V/TP]` with the output layer's padding ids (>= the tokenizer's
    `vocab_size`) at -inf: the sampler never draws them, so log-probs must not count them."""
    shard = logits.shape[-1]
    start = runtime.tp_rank() * shard
    if start + shard <= vocab_size:
        return logits
    ids = torch.arange(start, start + shard, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))


def policy_logps(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int,
                 temperature: float) -> torch.Tensor:
    """log π(label) `[b, s]` under the sampling distribution softmax(logits / T)."""
    return vocab_parallel_log_probs(mask_padded_vocab(logits, vocab_size), labels,
                                    temperature=temperature)


@torch.no_grad()
def score(model: list[torch.nn.Module], seqs: dict[str, torch.Tensor], micro_batch_size: int,
          read: Callable[[object, dict[str, torch.Tensor]], tuple[torch.Tensor, ...]]
          ) -> list[torch.Tensor]:
    """`read(output, micro_batch)` over forward-only micro-batches of this rank's model chunks,
    concatenated by position, on every pipeline stage. The micro-batches run through megatron's
    pipeline schedule (`read` on the last stage), which passes `[S, micro_batch_size, h]`
    between stages: under pipeline parallelism the rows must fill whole micro-batches.
    Collective over the pipeline."""
    n, width = seqs["tokens"].shape
    if runtime.layout().pp > 1 and n % micro_batch_size:
        raise ValueError(f"{n} sequences do not fill micro-batches of {micro_batch_size}, which "
                         "pipeline parallelism needs")
    micro = [{k: v[start:start + micro_batch_size] for k, v in seqs.items()}
             for start in range(0, n, micro_batch_size)]
    was_training = model[0].training
    for chunk in model:
        chunk.eval()
    try:
        parts = forward_only(model, lambda: iter(micro), len(micro), forward_sequences, read,
                             seq_length=width, micro_batch_size=micro_batch_size)
    finally:
        for chunk in model:
            chunk.train(was_training)
    return runtime.broadcast_from_last_stage(
        [torch.cat(column) for column in zip(*parts, strict=True)] if parts else None)


def reward_model_scores(reward_model: list[torch.nn.Module], seqs: dict[str, torch.Tensor],
                        micro_batch_size: int) -> torch.Tensor:
    """The frozen reward model's score of each sequence `[n]`, read at its last token."""
    [scores] = score(reward_model, seqs, micro_batch_size,
                     lambda out, b: (sequence_rewards(out.float(), b["loss_mask"]),))
    return scores
