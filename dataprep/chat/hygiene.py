"""Data hygiene for chat examples: a content hash for exact dedup, and decontamination against
evaluation prompts by word n-gram overlap."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from dataprep.chat.formats import (
    Conversation,
    Example,
    Messages,
    PreferencePair,
    PromptExample,
    UnpairedExample,
)

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class HygieneConfig:
    dedup: bool = True
    # files of evaluation prompts (JSONL with prompt/question/messages, or plain text lines)
    decontaminate: list[str] = field(default_factory=list)
    ngram: int = 13


def normalise_text(text: str) -> str:
    """Case and whitespace do not make two examples different."""
    return " ".join(text.split()).casefold()


def _msgs(messages: Messages) -> list[list[str]]:
    return [[m.role, normalise_text(m.content)] for m in messages]


def content_key(example: Example) -> str:
    """sha256 of the normalised content (kind, roles, texts, label); equal keys are duplicates."""
    if isinstance(example, Conversation):
        payload: list = ["conversation", _msgs(example.messages)]
    elif isinstance(example, PreferencePair):
        payload = ["pair", _msgs(example.prompt_messages), normalise_text(example.chosen),
                   normalise_text(example.rejected)]
    elif isinstance(example, UnpairedExample):
        payload = ["unpaired", _msgs(example.prompt_messages), normalise_text(example.completion),
                   example.label]
    else:
        payload = ["prompt", _msgs(example.prompt_messages)]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words is one n-gram of all its words."""
    w = words(text)
    if not w:
        return set()
    if len(w) < n:
        return {tuple(w)}
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


class Decontaminator:
    """Flags an example whose user turns share a word n-gram with any evaluation prompt."""

    def __init__(self, eval_prompts: Iterable[str], n: int = 13) -> None:
        self.n = n
        self.grams: set[tuple[str, ...]] = set()
        self.short: set[tuple[str, ...]] = set()  # eval prompts under n words: match as a whole
        for p in eval_prompts:
            w = tuple(words(p))
            if 0 < len(w) < n:
                self.short.add(w)
            else:
                self.grams |= ngrams(p, n)

    def __len__(self) -> int:
        return len(self.grams) + len(self.short)

    def contaminated(self, example: Example) -> bool:
        for text in _user_texts(example):
            w = words(text)
            if len(w) >= self.n and any(tuple(w[i:i + self.n]) in self.grams
                                        for i in range(len(w) - self.n + 1)):
                return True
            if self.short and any(_contains(w, s) for s in self.short):
                return True
        return False


def _contains(haystack: list[str], needle: tuple[str, ...]) -> bool:
    k = len(needle)
    return any(tuple(haystack[i:i + k]) == needle for i in range(len(haystack) - k + 1))


def _user_texts(example: Example) -> list[str]:
    if isinstance(example, Conversation):
        msgs = example.messages
    elif isinstance(example, (PreferencePair, UnpairedExample, PromptExample)):
        msgs = example.prompt_messages
    else:
        raise TypeError(type(example).__name__)
    return [m.content for m in msgs if m.role == "user"]


def read_eval_prompts(path: str) -> list[str]:
    """Evaluation prompts from a JSONL file (`prompt`, `question`, `input` or user `messages`)
    or a text file with one prompt per line."""
    from kiln.errors import DataError
    from kiln.paths import open_path

    out = []
    with open_path(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            if not line.startswith("{"):
                out.append(line)
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"invalid JSON: {exc.msg}", path=path, row=number) from None
            text = next((obj[k] for k in ("prompt", "question", "input") if isinstance(obj.get(k), str)),
                        None)
            if text is None and isinstance(obj.get("messages"), list):
                text = " ".join(m.get("content", "") for m in obj["messages"]
                                if isinstance(m, dict) and m.get("role") == "user")
            if not text:
                raise DataError("no prompt/question/input/messages", path=path, row=number)
            out.append(text)
    return out
