"""Normalised examples -> contract rows (`sft`, `preference`, `unpaired`, `prompts`): render with the
chat template, apply the length policy, report what was truncated."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dataprep.chat.formats import (
    Conversation,
    Example,
    PreferencePair,
    PromptExample,
    UnpairedExample,
)
from dataprep.chat.lengths import Fitted, LengthPolicy, fit
from dataprep.chat.template import ChatTemplate, Turn, join_turns

CONTRACT_OF = {Conversation: "sft", PreferencePair: "preference", UnpairedExample: "unpaired",
               PromptExample: "prompts"}


@dataclass
class Row:
    contract: str
    values: dict[str, Any]
    prompt_truncated: bool = False
    completion_truncated: bool = False


def render_conversation(template: ChatTemplate, conv: Conversation,
                        policy: LengthPolicy) -> tuple[list[int], list[int], Fitted]:
    """(input_ids, loss_mask) of an SFT conversation under the length policy: the final assistant
    reply is the completion, everything before it (with its header) the prompt."""
    turns = template.turns(conv.messages)
    last = turns[-1]
    prompt = [*turns[:-1], Turn(last.head, [], [], False)]
    fitted = fit(prompt, [last.body + last.tail], policy)
    head = join_turns(fitted.prompt)
    completion = fitted.completions[0]
    return head.input_ids + completion, head.loss_mask + [1] * len(completion), fitted


def render_preference(template: ChatTemplate, pair: PreferencePair,
                      policy: LengthPolicy) -> tuple[list[int], list[int], list[int], Fitted]:
    """(prompt_ids, chosen_ids, rejected_ids): prompt up to the assistant header, completions
    content + end-of-turn + eos."""
    fitted = fit(template.prompt_turns(pair.prompt_messages),
                 [template.render_completion(pair.chosen), template.render_completion(pair.rejected)],
                 policy)
    return join_turns(fitted.prompt).input_ids, fitted.completions[0], fitted.completions[1], fitted


def render_unpaired(template: ChatTemplate, ex: UnpairedExample,
                    policy: LengthPolicy) -> tuple[list[int], list[int], Fitted]:
    fitted = fit(template.prompt_turns(ex.prompt_messages),
                 [template.render_completion(ex.completion)], policy)
    return join_turns(fitted.prompt).input_ids, fitted.completions[0], fitted


def render_prompt(template: ChatTemplate, ex: PromptExample,
                  policy: LengthPolicy) -> tuple[list[int], Fitted]:
    fitted = fit(template.prompt_turns(ex.prompt_messages), [], policy)
    return join_turns(fitted.prompt).input_ids, fitted


def example_row(template: ChatTemplate, policy: LengthPolicy, example: Example, id: str,
                source: str) -> Row:
    """The contract row for one example; raises `lengths.TooLong` when the policy drops it."""
    base = {"id": id, "source": source}
    if isinstance(example, Conversation):
        ids, mask, f = render_conversation(template, example, policy)
        values = {**base, "input_ids": ids, "loss_mask": mask}
    elif isinstance(example, PreferencePair):
        p, c, r, f = render_preference(template, example, policy)
        cs, rs = example.scores or (None, None)
        values = {**base, "prompt_ids": p, "chosen_ids": c, "rejected_ids": r,
                  "chosen_score": cs, "rejected_score": rs,
                  "margin": cs - rs if example.scores else None}
    elif isinstance(example, UnpairedExample):
        p, c, f = render_unpaired(template, example, policy)
        values = {**base, "prompt_ids": p, "completion_ids": c, "label": example.label}
    else:
        p, f = render_prompt(template, example, policy)
        values = {**base, "prompt_ids": p, "reference": example.reference}
    return Row(CONTRACT_OF[type(example)], values, f.prompt_truncated, f.completion_truncated)
