"""PPO's actor-critic network: the policy `GPTModel` with a scalar value head on its final hidden
states (one trunk, two heads, as TRL's `AutoModelForCausalLMWithValueHead` and OpenRLHF's shared
critic), so the loop's one optimizer steps policy and critic together.

The trunk and LM head keep the language model's checkpoint keys, so a pretraining or SFT
checkpoint loads into it under any layout; the head (`value_head.weight`, `[1, hidden]`, no bias)
is new, replicated across tensor-parallel ranks like the reward model's: its input, the final
hidden states, is identical on every TP rank (gathered under sequence parallelism), so are its
output and gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

VALUE_HEAD = "value_head."


class GPTActorCritic(GPTModel):
    """`forward(...)` returns `(logits [b, s, V/TP], values [b, s])` on the last pipeline stage
    in training and scoring, and only the logits when given an `inference_context`
    (generation: megatron's sampler path keeps its one-tensor output)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.post_process:
            self.value_head = torch.nn.Linear(self.config.hidden_size, 1, bias=False,
                                              dtype=self.config.params_dtype)
            self.config.init_method(self.value_head.weight)

    def _postprocess(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        logits = super()._postprocess(hidden_states, *args, **kwargs)
        if not self.post_process or kwargs.get("inference_context") is not None:
            return logits
        if self.config.sequence_parallel:
            # each rank holds [s/TP, b, h]: gather (as the reward head does), and on the way back
            # keep this rank's slice of the gradient, which every TP rank computes whole
            hidden_states = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=False)
        values = self.value_head(hidden_states).squeeze(-1).transpose(0, 1).contiguous()
        return logits, values.float()
