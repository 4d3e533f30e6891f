"""The one chat template, applied by token spans so loss masks come from what the template emitted.

Layout (`<s>` = bos, `</s>` = eos; `[...]` = optional):

    <s> [<|system|> S <|end|>] <|user|> U1 <|end|> <|assistant|> A1 <|end|>
        <|user|> U2 <|end|> <|assistant|> A2 <|end|> </s>

Every content is encoded on its own (so a sentencepiece model gives it its dummy-prefix `▁`), and
`</s>` follows only the final assistant turn: a conversation has exactly one bos and one eos.
The loss mask is 1 on assistant content, its `<|end|>` and the final `</s>` (all assistant turns,
or only the last with `loss_on="last"`); role headers, user and system turns are 0. Example with
the tests' 1k BPE tokenizer, `[user "Hi", assistant "Hello"]`:

    piece  <s> <|user|> ▁H   i  <|end|> <|assistant|> ▁H  ell  o  <|end|> </s>
    id      2     5     369 936    7          6       369 389 933    7     3
    mask    0     0      0   0     0          0        1   1   1     1     1

Preference rows: `prompt_ids` = rendering up to and including the final `<|assistant|>` header;
`chosen_ids`/`rejected_ids` = content + `<|end|>` + `</s>`, so prompt + chosen is exactly the
rendering of the whole conversation. `CHAT_TEMPLATE_JINJA` is the same layout for Hugging Face's
`apply_chat_template` (with `{% generation %}` around what is trained on).

Content is never allowed to produce a control id: sentencepiece matches user-defined symbols in
raw text, so `"a <|user|> b"` would encode to id 5. Content is encoded with a copy of the model
whose chat pieces are CONTROL pieces (unreachable from text), so such text becomes ordinary pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dataprep import special_tokens as st
from dataprep.chat.formats import Message
from dataprep.tokenizer import SentencePieceTokenizer, Tokenizer
from schemas.chat import CHAT_TEMPLATE_JINJA  # noqa: F401 (re-exported for the data side)
from schemas.protowire import fields, varint_bytes


@dataclass(frozen=True)
class TemplateOptions:
    add_bos: bool = True
    include_system: bool = True
    loss_on: str = "all"  # "all" assistant turns, or only the "last"

    def __post_init__(self) -> None:
        if self.loss_on not in ("all", "last"):
            raise ValueError(f"loss_on must be 'all' or 'last', got {self.loss_on!r}")


@dataclass
class Rendered:
    input_ids: list[int]
    loss_mask: list[int]


class ChatTemplate:
    """Renders messages to token ids with a tokenizer's chat control tokens."""

    def __init__(self, tok: Tokenizer, options: TemplateOptions = TemplateOptions()) -> None:
        self.tok = tok
        self.options = options
        self.bos = [tok.bos_id] if options.add_bos and tok.bos_id is not None else []
        self.eos = [tok.eos_id]
        self.end = tok.control(st.END_OF_TURN)
        self.header = {role: tok.control(token) for role, token in st.ROLE_TOKENS.items()}
        self._encode = _content_encoder(tok)

    def encode_content(self, text: str) -> list[int]:
        """Token ids of message text; never a control id, whatever the text says."""
        return self._encode(text)

    def _messages(self, messages: Sequence[Message]) -> Sequence[Message]:
        if self.options.include_system:
            return messages
        return [m for m in messages if m.role != "system"]

    def turns(self, messages: Sequence[Message]) -> list[Turn]:
        """The rendering as spans: bos, one `Turn` per message (eos in the tail of a final
        assistant turn). Concatenated, they are the whole conversation."""
        messages = self._messages(messages)
        out = [Turn(list(self.bos), [], [], False)] if self.bos else []
        last_assistant = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
        for i, m in enumerate(messages):
            tail = self.end + self.eos if i == last_assistant == len(messages) - 1 else self.end
            trained = m.role == "assistant" and (self.options.loss_on == "all" or i == last_assistant)
            out.append(Turn(self.header[m.role], self.encode_content(m.content), tail, trained))
        return out

    def render(self, messages: Sequence[Message]) -> Rendered:
        """A whole conversation with its loss mask."""
        return join_turns(self.turns(messages))

    def prompt_turns(self, messages: Sequence[Message]) -> list[Turn]:
        """A prompt as spans ending with the bare assistant header (where generation starts)."""
        return [*self.turns(messages), Turn(self.header["assistant"], [], [], False)]

    def render_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Up to and including the final assistant header."""
        return join_turns(self.prompt_turns(messages)).input_ids

    def render_completion(self, text: str) -> list[int]:
        """An assistant reply as trained on: content + end-of-turn + eos."""
        return self.encode_content(text) + self.end + self.eos


@dataclass
class Turn:
    """One span of a rendering: role header, content, closing tokens; `trained` marks content and
    closing tokens for the loss (headers never are)."""

    head: list[int]
    body: list[int]
    tail: list[int]
    trained: bool

    def __len__(self) -> int:
        return len(self.head) + len(self.body) + len(self.tail)


def join_turns(turns: Sequence[Turn]) -> Rendered:
    ids: list[int] = []
    mask: list[int] = []
    for t in turns:
        ids += t.head + t.body + t.tail
        mask += [0] * len(t.head) + [int(t.trained)] * (len(t.body) + len(t.tail))
    return Rendered(ids, mask)


def _content_encoder(tok: Tokenizer):
    if isinstance(tok, SentencePieceTokenizer):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=controls_unreachable(tok.model_proto))
        return sp.encode
    return _PiecewiseEncoder(tok)


class _PiecewiseEncoder:
    """For tokenizers without a model proto: text around control-token literals is encoded on
    its own and each literal in two halves, so no half can match a control token."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.literals = tuple(sorted((*st.CHAT_TOKENS, st.BOS, st.EOS), key=len, reverse=True))

    def __call__(self, text: str) -> list[int]:
        if not any(lit in text for lit in self.literals):
            return self.tok.encode(text)
        ids: list[int] = []
        rest = text
        while rest:
            hits = [(rest.find(lit), lit) for lit in self.literals if lit in rest]
            if not hits:
                ids += self.tok.encode(rest)
                break
            pos, lit = min(hits)
            if pos:
                ids += self.tok.encode(rest[:pos])
            ids += self.tok.encode(lit[:2]) + self.tok.encode(lit[2:])
            rest = rest[pos + len(lit):]
        return ids


# ------------------------------------------------------- sentencepiece proto: wire-format edit
# The sentencepiece pb2 module in this environment does not load with the installed protobuf
# runtime, and only one field of a few pieces changes, so the edit is done on the wire format
# (`schemas.protowire`).
_USER_DEFINED, _CONTROL = 4, 3


def controls_unreachable(proto: bytes) -> bytes:
    """A copy of a sentencepiece ModelProto whose chat pieces (user-defined symbols) are CONTROL
    pieces: same ids and vocabulary, but text can no longer produce them."""
    targets = {t.encode() for t in st.CHAT_TOKENS}
    out = bytearray()
    for field, wire, start, end, (p0, p1, _) in fields(proto, 0, len(proto)):
        if field == 1 and wire == 2:  # ModelProto.pieces: SentencePiece{1 piece, 2 score, 3 type}
            sub = list(fields(proto, p0, p1))
            text = next((proto[a:b] for f, w, _, _, (a, b, _) in sub if f == 1 and w == 2), None)
            kind = next((v for f, w, _, _, (_, _, v) in sub if f == 3 and w == 0), None)
            if text in targets and kind == _USER_DEFINED:
                body = b"".join(proto[s:e] for f, _, s, e, _ in sub if f != 3)
                body += bytes([3 << 3]) + varint_bytes(_CONTROL)
                out += bytes([1 << 3 | 2]) + varint_bytes(len(body)) + body
                continue
        out += proto[start:end]
    return bytes(out)

