"""Tokenizers behind one small interface: sentencepiece models trained by llmkiln (fixed special
ids) or adopted from a base model (sentencepiece `.model` or a Hugging Face directory).

The fingerprint is the sha256 of the serialized model (the sentencepiece proto, or the HF
`tokenizer.json`): every shard made with a tokenizer records it, and the trainer refuses shards
whose fingerprint differs from its config.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from dataprep import special_tokens as st
from kiln.errors import DataError, UsageError

MODEL_FILE = "tokenizer.model"
VOCAB_FILE = "tokenizer.vocab"
FINGERPRINT_FILE = "fingerprint.txt"


class Tokenizer(Protocol):
    """What the data jobs need from a tokenizer."""

    name: str
    fingerprint: str
    vocab_size: int
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def control(self, token: str) -> list[int]:
        """Ids for a chat control token (`dataprep.special_tokens`): one id when the vocabulary
        has it as a piece, else the ids of its text."""
        ...


def fingerprint_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SentencePieceTokenizer:
    """A sentencepiece model; thread-safe encode, batch encode with sentencepiece's threads."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece") -> None:
        import sentencepiece as spm

        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.name = name
        self.fingerprint = fingerprint_bytes(model_proto)
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self._control = {tok: self._piece_ids(tok) for tok in st.CHAT_TOKENS}

    @classmethod
    def load(cls, path: str) -> SentencePieceTokenizer:
        from kiln.paths import read_bytes

        return cls(read_bytes(path), name=os.path.basename(os.path.dirname(path)) or path)

    def _piece_ids(self, token: str) -> list[int]:
        pid = self.sp.piece_to_id(token)
        if pid != self.sp.unk_id() and self.sp.id_to_piece(pid) == token:
            return [pid]
        return self.sp.encode(token)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(list(ids))

    def control(self, token: str) -> list[int]:
        return self._control[token]

    @property
    def special_ids(self) -> dict[str, int | None]:
        """pad/unk/bos/eos and each chat token's id (None where it is not a single piece)."""
        ids: dict[str, int | None] = {"pad": self.pad_id, "unk": self.sp.unk_id(),
                                      "bos": self.bos_id, "eos": self.eos_id}
        for token, ctl in self._control.items():
            single = len(ctl) == 1 and self.sp.id_to_piece(ctl[0]) == token
            ids[token] = ctl[0] if single else None
        return ids

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "name": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["name"])


@dataclass
class TrainSpec:
    """Settings for training a sentencepiece model with llmkiln's fixed special ids."""

    vocab_size: int = 4096
    model_type: str = "bpe"  # or "unigram"
    byte_fallback: bool = True
    character_coverage: float = 0.9995
    max_sentence_length: int = 16384
    num_threads: int = 1  # one thread keeps training deterministic
    split_digits: bool = True
    # Lossless for pretraining text and code (as Llama's tokenizer): no NFKC, keep whitespace.
    normalization: str = "identity"
    remove_extra_whitespaces: bool = False


def train_sentencepiece(texts: Iterable[str], spec: TrainSpec) -> bytes:
    """Train on `texts` and return the model proto. Ids: pad 0, unk 1, bos 2, eos 3, then the
    chat control tokens 4..7 (`dataprep.special_tokens.FIXED_IDS`)."""
    import sentencepiece as spm

    if spec.model_type not in ("bpe", "unigram"):
        raise UsageError(f"tokenizer model_type must be bpe or unigram, got {spec.model_type!r}")
    buf = io.BytesIO()
    try:
        _train(spm, texts, spec, buf)
    except RuntimeError as exc:  # sentencepiece reports bad settings (vocab too small) this way
        raise UsageError(f"sentencepiece training failed: {str(exc).split('] ')[-1]}") from None
    proto = buf.getvalue()
    check_fixed_ids(SentencePieceTokenizer(proto))
    return proto


def _train(spm, texts: Iterable[str], spec: TrainSpec, buf: io.BytesIO) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=spec.vocab_size,
        model_type=spec.model_type, byte_fallback=spec.byte_fallback,
        character_coverage=spec.character_coverage, max_sentence_length=spec.max_sentence_length,
        num_threads=spec.num_threads, split_digits=spec.split_digits,
        normalization_rule_name=spec.normalization,
        remove_extra_whitespaces=spec.remove_extra_whitespaces, allow_whitespace_only_pieces=True,
        pad_id=st.PAD_ID, unk_id=st.UNK_ID, bos_id=st.BOS_ID, eos_id=st.EOS_ID,
        pad_piece=st.PAD, unk_piece=st.UNK, bos_piece=st.BOS, eos_piece=st.EOS,
        user_defined_symbols=list(st.CHAT_TOKENS), hard_vocab_limit=False,
        shuffle_input_sentence=False, minloglevel=2,
    )


def training_lines(text: str, max_bytes: int) -> Iterator[str]:
    """A document as sentencepiece training sentences: its non-blank lines, long ones cut into
    pieces sentencepiece will not skip (it drops sentences over `max_sentence_length` bytes)."""
    step = max(1, max_bytes // 4)  # a UTF-8 character is at most 4 bytes
    for line in text.split("\n"):
        if line.strip():
            for i in range(0, len(line), step):
                yield line[i:i + step]


def check_fixed_ids(tok: SentencePieceTokenizer) -> None:
    for piece, expected in st.FIXED_IDS.items():
        got = tok.sp.piece_to_id(piece)
        if got != expected or tok.sp.id_to_piece(got) != piece:
            raise DataError(f"special token {piece!r} has id {got}, expected {expected}")


def save_tokenizer_dir(out_dir: str, tok: SentencePieceTokenizer) -> None:
    """Write `tokenizer.model`, a readable `tokenizer.vocab` and `fingerprint.txt`."""
    from kiln.paths import makedirs, write_bytes, write_text

    makedirs(out_dir)
    write_bytes(os.path.join(out_dir, MODEL_FILE), tok.model_proto)
    lines = [f"{i}\t{tok.sp.id_to_piece(i)}\t{tok.sp.get_score(i):.4f}"
             for i in range(tok.vocab_size)]
    write_text(os.path.join(out_dir, VOCAB_FILE), "\n".join(lines) + "\n")
    write_text(os.path.join(out_dir, FINGERPRINT_FILE), tok.fingerprint + "\n")


def load_tokenizer(path: str) -> Tokenizer:
    """A tokenizer from a llmkiln TOK_DIR, a sentencepiece `.model` file, or a Hugging Face
    model directory (`tokenizer.json`). A directory with both `tokenizer.json` +
    `tokenizer_config.json` and a `.model` (as Llama's) is read as Hugging Face: its config
    names the special tokens the model was trained with."""
    from kiln.paths import exists, join

    if path.endswith(".model") and exists(path):
        return SentencePieceTokenizer.load(path)
    is_hf = exists(join(path, "tokenizer.json"))
    if exists(join(path, MODEL_FILE)) and not (is_hf and exists(join(path,
                                                                      "tokenizer_config.json"))):
        return SentencePieceTokenizer.load(join(path, MODEL_FILE))
    if is_hf:
        from dataprep.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(path)
    raise UsageError(f"tokenizer '{path}': no {MODEL_FILE} or tokenizer.json found")
