"""A megatron `GPTModel` whose output layer is a scalar reward head: the reward model's network.

The backbone (embedding, decoder, final norm) is the language model's, with the same checkpoint
keys, so a pretraining or SFT checkpoint loads into it under any layout; the head
(`reward_head.weight`, `[1, hidden]`, no bias, as Hugging Face's `*ForSequenceClassification`
score layer) exists on the last pipeline stage only, replicated across tensor-parallel ranks: its
input, the final hidden states, is the same on every TP rank (after a sequence-parallel gather),
so every rank computes the same reward and the same head gradient and nothing needs reducing.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from tensor_parallel import runtime

REWARD_HEAD = "reward_head."


class GPTRewardModel(GPTModel):
    """`forward(...)` returns rewards `[b, s]` (one per position) on the last pipeline stage,
    hidden states elsewhere; the stage picks the position of each sequence's last token."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["share_embeddings_and_output_weights"] = False  # no LM head to tie
        super().__init__(*args, **kwargs)
        if self.post_process:
            del self.output_layer
            self.reward_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False,
                                               dtype=self.config.params_dtype)
            self.config.init_method(self.reward_head.weight)

    def setup_embeddings_and_output_layer(self) -> None:
        if self.pre_process:  # what GPTModel does when nothing is tied; there is no output layer
            self.embedding.word_embeddings.weight.is_embedding_or_output_parameter = True

    def _postprocess(self, hidden_states: torch.Tensor, **_: Any) -> torch.Tensor:
        if not self.post_process:
            return hidden_states
        if self.config.sequence_parallel:
            # each rank holds [s/TP, b, h]: gather, and on the way back keep this rank's slice of
            # a gradient that is already complete on every rank (not a reduce-scatter)
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        return self.reward_head(hidden_states).squeeze(-1).transpose(0, 1).contiguous()

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        # LanguageModule's version post-processes `output_layer.weight`, which is gone here.
        return MegatronModule.sharded_state_dict(self, prefix, sharded_offsets,
                                                 ensure_metadata_has_dp_cp_group(metadata))


def last_token_index(loss_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the input position that predicts the final completion token (the last with loss):
    its hidden state has read the whole prompt and completion but the closing token. `[b]`."""
    positions = torch.arange(loss_mask.shape[1], device=loss_mask.device)
    return torch.where(loss_mask > 0, positions, -1).amax(dim=1).clamp(min=0)


def sequence_rewards(rewards: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """The reward of each sequence `[b]`, read at its last token, from per-position `[b, s]`.

    Under context parallelism each rank holds two chunks of every sequence: the CP ranks agree on
    the last token's position, the rank holding it contributes its reward, and `cp_sum` adds
    them up (differentiably)."""
    if runtime.layout().cp == 1:
        index = last_token_index(loss_mask)
        return rewards.gather(1, index.unsqueeze(1)).squeeze(1)
    positions = runtime.cp_positions(loss_mask.shape[1], loss_mask.device)
    last = runtime.cp_max(torch.where(loss_mask > 0, positions, -1).amax(dim=1)).clamp(min=0)
    held = positions[None, :] == last[:, None]
    return runtime.cp_sum(torch.where(held, rewards, 0).sum(1))
