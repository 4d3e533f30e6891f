"""Length policy: caps on prompt, completion and total tokens; prompts are cut from the left (whole
turns first, then tokens of the oldest remaining turn, always keeping its role header) so the
template stays valid, completions from the right; what cannot fit is dropped with a reason."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from dataprep.chat.template import Turn

OVERFLOW = ("truncate", "drop")


@dataclass(frozen=True)
class LengthPolicy:
    max_prompt_tokens: int | None = None
    max_completion_tokens: int | None = None
    max_total_tokens: int | None = 4096
    # when the prompt cannot shrink further, completions may be cut, but never below this
    min_completion_tokens: int = 16
    overflow: str = "truncate"  # or "drop": anything over a cap is dropped, not cut

    def __post_init__(self) -> None:
        if self.overflow not in OVERFLOW:
            raise ValueError(f"overflow must be 'truncate' or 'drop', got {self.overflow!r}")
        for name in ("max_prompt_tokens", "max_completion_tokens", "max_total_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be positive, got {v}")


@dataclass
class Fitted:
    prompt: list[Turn]
    completions: list[list[int]]
    prompt_truncated: bool = False
    completion_truncated: bool = False


class TooLong(Exception):
    """Dropped by the length policy; `reason` is the ledger's filter name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _pinned(turn: Turn) -> bool:
    """bos and the closing assistant header carry no content and are never removed."""
    return not turn.body and not turn.tail


def _min_prompt(prompt: Sequence[Turn]) -> int:
    """The shortest valid prompt: pinned spans + the last turn with one content token."""
    pinned = sum(len(t) for t in prompt if _pinned(t))
    last = [t for t in prompt if not _pinned(t)][-1:]
    return pinned + sum(len(t.head) + min(1, len(t.body)) + len(t.tail) for t in last)


def _cut_prompt(prompt: list[Turn], budget: int) -> list[Turn]:
    """Drop oldest turns (an assistant turn left leading goes with its user turn), then cut the
    oldest remaining turn's content from the left."""
    turns = list(prompt)
    size = sum(map(len, turns))

    def droppable() -> list[int]:
        return [i for i, t in enumerate(turns) if not _pinned(t)]

    while size > budget and len(droppable()) > 1:
        i = droppable()[0]
        size -= len(turns.pop(i))
        rest = droppable()
        while len(rest) > 1 and turns[rest[0]].head == turns[-1].head:  # an assistant turn first
            size -= len(turns.pop(rest[0]))
            rest = droppable()
    if size > budget:
        i = droppable()[0]
        t = turns[i]
        keep = len(t.body) - (size - budget)
        turns[i] = replace(t, body=t.body[len(t.body) - keep:])
    return turns


def fit(prompt: list[Turn], completions: list[list[int]], policy: LengthPolicy) -> Fitted:
    """Apply the policy to a prompt (spans ending with the assistant header) and its completions
    (one for SFT and KTO, two for a preference pair, none for prompt-only data)."""
    out = Fitted(list(prompt), [list(c) for c in completions])
    drop = policy.overflow == "drop"
    longest = max(map(len, out.completions), default=0)
    cap = policy.max_completion_tokens
    if cap is not None and longest > cap:
        if drop:
            raise TooLong("completion_too_long")
        out.completions = [c[:cap] for c in out.completions]
        out.completion_truncated, longest = True, cap
    prompt_len = sum(map(len, out.prompt))
    budget = policy.max_prompt_tokens if policy.max_prompt_tokens is not None else prompt_len
    if policy.max_total_tokens is not None:
        budget = min(budget, policy.max_total_tokens - longest)
    if prompt_len <= budget:
        return out
    if drop:
        raise TooLong("too_long")
    shortest = _min_prompt(out.prompt)
    if policy.max_prompt_tokens is not None and shortest > policy.max_prompt_tokens:
        raise TooLong("prompt_too_long")
    if budget < shortest:  # the prompt cannot shrink enough: cut completions, keeping N tokens
        room = policy.max_total_tokens - shortest if policy.max_total_tokens is not None else 0
        if room < max(1, min(policy.min_completion_tokens, longest)):
            raise TooLong("too_long")
        out.completions = [c[:room] for c in out.completions]
        out.completion_truncated = out.completion_truncated or room < longest
        budget = shortest
    out.prompt = _cut_prompt(out.prompt, budget)
    out.prompt_truncated = True
    return out
