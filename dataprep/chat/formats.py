"""Readers for the chat-data formats people have (OpenAI messages, ShareGPT, Alpaca,
prompt/completion, HH-RLHF transcripts, TRL preference pairs, scored completions, KTO, prompt-only),
each record normalised to a plain dataclass or rejected with a reason."""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kiln.paths import open_path

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt-completion")
PREFERENCE_FORMATS = ("hh", "pairs", "scored", "unpaired", "prompts")
# which output contract each format fills
KIND = {"messages": "sft", "sharegpt": "sft", "alpaca": "sft", "prompt-completion": "sft",
        "hh": "preference", "pairs": "preference", "scored": "preference",
        "unpaired": "unpaired", "prompts": "prompts"}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system"}
PAIR_RULES = ("best_vs_worst", "best_vs_random", "all_pairs")


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


Messages = tuple[Message, ...]


@dataclass(frozen=True)
class Conversation:
    messages: Messages


@dataclass(frozen=True)
class PreferencePair:
    prompt_messages: Messages  # ends with a user turn
    chosen: str
    rejected: str
    scores: tuple[float, float] | None = None  # (chosen, rejected)


@dataclass(frozen=True)
class UnpairedExample:
    prompt_messages: Messages
    completion: str
    label: bool


@dataclass(frozen=True)
class PromptExample:
    prompt_messages: Messages
    reference: str | None = None


Example = Conversation | PreferencePair | UnpairedExample | PromptExample


class RecordError(ValueError):
    """The record is malformed: it goes to the dead-letter file with this reason."""


class RecordFiltered(Exception):
    """The record is well-formed but cannot be used (e.g. HH pairs that differ before the last
    turn); counted under `reason` in the ledger."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PairingRule:
    """How scored completions become pairs: the best against the worst, the best against one
    other chosen at random (seeded per record), or every pair whose score gap exceeds `margin`."""

    rule: str = "best_vs_worst"
    margin: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rule not in PAIR_RULES:
            raise ValueError(f"pairing rule must be one of {', '.join(PAIR_RULES)}, got {self.rule!r}")


# ---------------------------------------------------------------------------------------- files

def iter_records(path: str) -> Iterator[tuple[int, dict[str, Any] | RecordError, bytes | None]]:
    """(line or row number from 1, the record or why it is unreadable, the raw line) for a JSONL
    file (plain, .gz, .zst) or a Parquet file; blank JSONL lines are not records."""
    if path.endswith(".parquet"):
        yield from _iter_parquet(path)
        return
    with open_path(path, "rb") as f:
        for number, raw in enumerate(_lines(f), start=1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield number, RecordError(f"invalid UTF-8 at byte {exc.start}"), raw
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                yield number, RecordError(f"invalid JSON: {exc.msg} at column {exc.colno}"), raw
                continue
            if not isinstance(obj, dict):
                yield number, RecordError(f"expected a JSON object, got {type(obj).__name__}"), raw
                continue
            yield number, obj, raw


def _lines(f: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Lines of a binary stream; some decompressors (zstd) do not implement readline."""
    tail = b""
    while block := f.read(chunk):
        parts = (tail + block).split(b"\n")
        tail = parts.pop()
        yield from parts
    if tail:
        yield tail


def _iter_parquet(path: str) -> Iterator[tuple[int, dict[str, Any], None]]:
    import pyarrow.parquet as pq

    with open_path(path, "rb") as f, pq.ParquetFile(f) as pf:
        number = 0
        for batch in pf.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None


# ----------------------------------------------------------------------------------- detection

def detect_format(record: dict[str, Any]) -> str | None:
    """The format a record looks like, from its keys (None when nothing fits)."""
    keys = record.keys()
    if "chosen" in keys and "rejected" in keys:
        if "prompt" not in keys and isinstance(record["chosen"], str) \
                and HH_TURN.search(record["chosen"]):
            return "hh"
        return "pairs"
    if "completions" in keys:
        return "scored"
    if "label" in keys and "completion" in keys:
        return "unpaired"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt-completion"
    if "messages" in keys:
        msgs = record["messages"]
        if isinstance(msgs, list) and msgs and isinstance(msgs[-1], dict) \
                and msgs[-1].get("role") == "assistant":
            return "messages"
        return "prompts"
    if "prompt" in keys:
        return "prompts"
    return None


def parse_record(record: dict[str, Any], fmt: str, rule: PairingRule = PairingRule(),
                 key: str = "") -> list[Example]:
    """Normalise one record of format `fmt`; `key` seeds random pairing. Raises RecordError or
    RecordFiltered."""
    try:
        parser = _PARSERS[fmt]
    except KeyError:
        raise RecordError(f"unknown format {fmt!r}") from None
    if fmt == "scored":
        return _scored(record, rule, key)
    return [parser(record)]


# ------------------------------------------------------------------------------------- helpers

def _field(record: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record or record[name] is None:
        raise RecordError(f"missing field '{name}'")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RecordError(f"field '{name}': expected {want}, got {type(value).__name__}")
    return value


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecordError(f"{where}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RecordError(f"{where}: empty text")
    return value


def _messages(value: Any, where: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> Messages:
    if not isinstance(value, list) or not value:
        raise RecordError(f"field '{where}': expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise RecordError(f"{where}[{i}]: expected an object, got {type(m).__name__}")
        if role_key not in m:
            raise RecordError(f"{where}[{i}]: missing field '{role_key}'")
        raw_role = m[role_key]
        role = (roles or {r: r for r in ROLES}).get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise RecordError(f"{where}[{i}].{role_key}: unknown role {raw_role!r}")
        if content_key not in m:
            raise RecordError(f"{where}[{i}]: missing field '{content_key}'")
        out.append(Message(role, _text(m[content_key], f"{where}[{i}].{content_key}")))
    for i, m in enumerate(out):
        if m.role == "system" and i != 0:
            raise RecordError(f"{where}[{i}]: a system message is only allowed first")
    return tuple(out)


def _prompt(value: Any, where: str = "prompt") -> Messages:
    """A prompt as a string (one user turn) or a message list ending with a user turn."""
    msgs = (Message("user", _text(value, f"field '{where}'")),) if isinstance(value, str) \
        else _messages(value, where)
    if msgs[-1].role != "user":
        raise RecordError(f"field '{where}': must end with a user turn, ends with {msgs[-1].role}")
    return msgs


def _completion(value: Any, where: str) -> str:
    """A completion as a string or a one-message assistant list (TRL's conversational form)."""
    if isinstance(value, list):
        msgs = _messages(value, where)
        if len(msgs) != 1 or msgs[0].role != "assistant":
            raise RecordError(f"field '{where}': expected exactly one assistant message")
        return msgs[0].content
    return _text(value, f"field '{where}'")


def _conversation(msgs: Messages, where: str) -> Conversation:
    if not any(m.role == "assistant" for m in msgs):
        raise RecordError(f"field '{where}': no assistant turn")
    if msgs[-1].role != "assistant":
        raise RecordError(f"field '{where}': last turn is from {msgs[-1].role}, not the assistant")
    return Conversation(msgs)


# ------------------------------------------------------------------------------------------ SFT

def _parse_messages(r: dict[str, Any]) -> Conversation:
    return _conversation(_messages(r.get("messages"), "messages"), "messages")


def _parse_sharegpt(r: dict[str, Any]) -> Conversation:
    msgs = _messages(r.get("conversations"), "conversations", "from", "value", SHAREGPT_ROLES)
    return _conversation(msgs, "conversations")


def _parse_alpaca(r: dict[str, Any]) -> Conversation:
    instruction = _text(_field(r, "instruction", str), "field 'instruction'")
    extra = r.get("input") or ""
    if not isinstance(extra, str):
        raise RecordError(f"field 'input': expected str, got {type(extra).__name__}")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = r.get("system")
    head = (Message("system", _text(system, "field 'system'")),) if system else ()
    return Conversation((*head, Message("user", user),
                         Message("assistant", _text(_field(r, "output", str), "field 'output'"))))


def _parse_prompt_completion(r: dict[str, Any]) -> Conversation:
    prompt = _prompt(_field(r, "prompt", (str, list)))
    return Conversation((*prompt, Message("assistant", _completion(r.get("completion"), "completion"))))


# ----------------------------------------------------------------------------------- preference

HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_turns(transcript: str, where: str) -> Messages:
    """Split an HH-RLHF transcript on `\\n\\nHuman:` / `\\n\\nAssistant:` (a bare `Human:` inside a
    turn is content); surrounding whitespace of each turn is a format artefact and is stripped.
    An empty turn is kept here so that the caller can say which side is empty."""
    parts = HH_TURN.split(transcript)
    if parts[0].strip():
        raise RecordError(f"field '{where}': text before the first Human/Assistant turn")
    turns = [Message(_HH_ROLES[parts[i]], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if not turns:
        raise RecordError(f"field '{where}': no '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    return tuple(turns)


def _split_pair(chosen: Messages, rejected: Messages, where: str) -> PreferencePair:
    """Shared prefix -> prompt; the pair must differ in exactly one final assistant turn."""
    common = sum(1 for _ in itertools.takewhile(lambda ab: ab[0] == ab[1], zip(chosen, rejected, strict=False)))
    if common == len(chosen) == len(rejected):
        raise RecordFiltered("identical_pair")
    tail_c, tail_r = chosen[common:], rejected[common:]
    if not (len(tail_c) == len(tail_r) == 1 and tail_c[0].role == tail_r[0].role == "assistant"):
        raise RecordFiltered("divergent_history")
    prompt = chosen[:common]
    if not prompt or prompt[-1].role != "user":
        raise RecordError(f"{where}: the shared prompt does not end with a user turn")
    for i, m in enumerate(prompt):
        if not m.content.strip():
            raise RecordError(f"{where}: empty {m.role} turn {i} in the prompt")
    for side, m in (("chosen", tail_c[0]), ("rejected", tail_r[0])):
        if not m.content.strip():
            raise RecordError(f"field '{side}': empty final assistant turn")
    return PreferencePair(prompt, tail_c[0].content, tail_r[0].content)


def _parse_hh(r: dict[str, Any]) -> PreferencePair:
    chosen = hh_turns(_field(r, "chosen", str), "chosen")
    rejected = hh_turns(_field(r, "rejected", str), "rejected")
    return _split_pair(chosen, rejected, "chosen/rejected")


def _parse_pairs(r: dict[str, Any]) -> PreferencePair:
    """TRL's preference conventions: explicit prompt (string or messages) with string or
    one-message completions, or implicit prompt inside two full conversations."""
    chosen, rejected = _field(r, "chosen", (str, list)), _field(r, "rejected", (str, list))
    if "prompt" in r and r["prompt"] is not None:
        prompt = _prompt(r["prompt"])
        implicit = isinstance(chosen, list) and len(chosen) > 1
        if not implicit:
            return _scored_pair(prompt, _completion(chosen, "chosen"),
                                _completion(rejected, "rejected"), r)
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise RecordError("implicit-prompt pairs need 'chosen' and 'rejected' as message lists")
    pair = _split_pair(_messages(chosen, "chosen"), _messages(rejected, "rejected"), "chosen/rejected")
    return _scored_pair(pair.prompt_messages, pair.chosen, pair.rejected, r)


def _scored_pair(prompt: Messages, chosen: str, rejected: str, r: dict[str, Any]) -> PreferencePair:
    cs, rs = r.get("score_chosen"), r.get("score_rejected")
    scores = (float(cs), float(rs)) if _is_number(cs) and _is_number(rs) else None
    return PreferencePair(prompt, chosen, rejected, scores)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_TEXT_KEYS = ("response", "text", "completion", "content")
_SCORE_KEYS = ("score", "rating", "overall_score")


def _scored(r: dict[str, Any], rule: PairingRule, key: str) -> list[PreferencePair]:
    prompt = _prompt(_field(r, "prompt", (str, list)))
    items = _field(r, "completions", list)
    cands: list[tuple[str, float]] = []
    for i, c in enumerate(items):
        if not isinstance(c, dict):
            raise RecordError(f"completions[{i}]: expected an object")
        tk = next((k for k in _TEXT_KEYS if k in c), None)
        sk = next((k for k in _SCORE_KEYS if k in c), None)
        if tk is None or sk is None:
            raise RecordError(f"completions[{i}]: needs one of {'/'.join(_TEXT_KEYS)} and one of "
                              f"{'/'.join(_SCORE_KEYS)}")
        if not _is_number(c[sk]):
            raise RecordError(f"completions[{i}].{sk}: expected a number, got {c[sk]!r}")
        cands.append((_text(c[tk], f"completions[{i}].{tk}"), float(c[sk])))
    # stable order: score descending, then input position
    order = sorted(range(len(cands)), key=lambda i: (-cands[i][1], i))
    if len(order) < 2:
        raise RecordFiltered("single_completion")
    best = order[0]
    if rule.rule == "best_vs_worst":
        picks = [(best, order[-1])]
    elif rule.rule == "best_vs_random":
        others = [i for i in order[1:] if cands[i][1] < cands[best][1]]
        seed = int.from_bytes(hashlib.sha256(f"{rule.seed}:{key}".encode()).digest()[:8], "big")
        picks = [(best, random.Random(seed).choice(others))] if others else []
    else:
        picks = [(a, b) for ai, a in enumerate(order) for b in order[ai + 1:]]
    pairs = [PreferencePair(prompt, cands[a][0], cands[b][0], (cands[a][1], cands[b][1]))
             for a, b in picks
             if cands[a][1] - cands[b][1] > rule.margin and cands[a][0] != cands[b][0]]
    if not pairs:
        raise RecordFiltered("no_pair_above_margin")
    return pairs


def _parse_unpaired(r: dict[str, Any]) -> UnpairedExample:
    return UnpairedExample(_prompt(_field(r, "prompt", (str, list))),
                           _completion(r.get("completion"), "completion"),
                           _field(r, "label", bool))


def _parse_prompts(r: dict[str, Any]) -> PromptExample:
    if "prompt" not in r and "messages" not in r and "chosen" in r:
        # a preference record (HH transcripts or pairs): its prompt is the shared conversation
        pair = (_parse_hh if isinstance(r.get("chosen"), str) and HH_TURN.search(r["chosen"])
                else _parse_pairs)(r)
        return PromptExample(pair.prompt_messages, None)
    prompt = _prompt(r["messages"], "messages") if "messages" in r and "prompt" not in r \
        else _prompt(_field(r, "prompt", (str, list)))
    ref = r.get("reference", r.get("answer"))
    if ref is not None and not isinstance(ref, str):
        if not _is_number(ref):  # numeric answers (GSM8K-style) are kept as their JSON text
            raise RecordError(f"field 'reference': expected a string or number, got {ref!r:.40}")
        ref = json.dumps(ref)
    return PromptExample(prompt, ref)


_PARSERS = {"messages": _parse_messages, "sharegpt": _parse_sharegpt, "alpaca": _parse_alpaca,
            "prompt-completion": _parse_prompt_completion, "hh": _parse_hh, "pairs": _parse_pairs,
            "scored": _scored, "unpaired": _parse_unpaired, "prompts": _parse_prompts}
