"""A `kiln tokenizer` sentencepiece model as a Hugging Face `tokenizer.json` that encodes every
text to the same ids, so a model trained from scratch exports with its own tokenizer.

The layout is Hugging Face's legacy Llama one: a normalizer that prepends `▁` and turns spaces into
`▁` (sentencepiece's dummy prefix and whitespace escape, applied to each stretch of text between
special tokens, as our chat layout encodes each message on its own), no pre-tokenizer, then the
model itself: BPE with the merges read back from the pieces (Hugging Face's
`SentencePieceExtractor` rule: each way to split a piece into two pieces, ranked by the piece's
score) and byte fallback. The control pieces (`<pad>`, `<s>`, `</s>`), `<unk>` and the
user-defined chat tokens are special tokens.

Only what the layout reproduces exactly converts, which is what `kiln tokenizer` trains: BPE with
byte fallback, identity normalization (NFKC would need sentencepiece's own character map),
whitespace kept. `convert` reads those settings from the model and refuses others by name, then
encodes probe texts both ways. Measured: the same ids and decoded text for all 5,413 test texts
(4,624 HH-RLHF conversations, 789 Node.js-docs code snippets and pages) under the committed
512-piece HH tokenizer and a 2,000-piece one (`tests/trainer/test_hf_sentencepiece.py`).
"""

from __future__ import annotations

import json
import os
from typing import Any

from kiln.errors import DataError
from schemas.protowire import message

# Texts that tell the layouts apart: leading, repeated and trailing spaces, tabs and newlines,
# digits, punctuation, accents and full-width forms (NFKC folds them), CJK and emoji (byte
# fallback), and a chat token inside text.
PROBES = ("", " ", "  ", "a", " a", "a ", "a  b", "x\ty\n\nz\r\n", "def f(x):\n    return x\n",
          "Costs 12,345.67 (or 3.14%)!", "naïve café, Ünïcode", "ＡＢＣ１２３ ﬁ ⅱ ①", "日本語 🚀 👍🏽",
          "<|user|> hi <|end|>", "\u00a0nbsp\u200bzwsp")


# sentencepiece_model.proto: ModelProto {1: pieces, 2: trainer_spec, 3: normalizer_spec};
# SentencePiece {1: piece, 2: score, 3: type}; TrainerSpec {3: model_type, 35: byte_fallback};
# NormalizerSpec {1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces, 5: escape_whitespaces}
NORMAL, UNKNOWN, CONTROL, USER_DEFINED = 1, 2, 3, 4  # SentencePiece.type (5 unused, 6 byte)
UNIGRAM, BPE_MODEL = 1, 2  # TrainerSpec.model_type (3 word, 4 char)


def read_spec(model_file: str) -> dict[str, Any]:
    """The settings `convert` depends on, read from the model's protobuf wire format
    (`schemas.protowire`: sentencepiece's generated module may not load)."""
    with open(model_file, "rb") as f:
        proto = f.read()
    try:
        model = message(proto)
        trainer = message(model.get(2, [b""])[-1])
        norm = message(model.get(3, [b""])[-1])
        return {
            "types": [message(piece).get(3, [NORMAL])[-1] for piece in model.get(1, [])],
            "model_type": trainer.get(3, [UNIGRAM])[-1],
            "byte_fallback": bool(trainer.get(35, [0])[-1]),
            "normalizer": norm.get(1, [b""])[-1].decode(),
            **{key: bool(norm.get(field, [1])[-1]) for key, field in (
                ("add_dummy_prefix", 3), ("remove_extra_whitespaces", 4),
                ("escape_whitespaces", 5))}}
    except (IndexError, ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise DataError(f"not a sentencepiece model ({exc})", path=model_file) from None


def convert(model_file: str) -> Any:
    """`tokenizers.Tokenizer` equivalent to the sentencepiece model `model_file`; a `DataError`
    names the setting that has no equivalent, or the first probe text encoded differently."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    spec = read_spec(model_file)
    wanted = {"normalizer": "identity", "add_dummy_prefix": True,
              "remove_extra_whitespaces": False, "escape_whitespaces": True, "byte_fallback": True}
    for key, value in wanted.items():
        if spec[key] != value:
            raise DataError(f"{key} is {spec[key]!r}; a Hugging Face tokenizer.json reproduces "
                            f"sentencepiece only with {value!r} (what `kiln tokenizer` trains)",
                            path=model_file, field=key)
    if spec["model_type"] != BPE_MODEL:
        # Hugging Face's Unigram breaks ties between equally likely segmentations differently
        # ("...", "." vs ".", "...": 4 of 4,704 HH and Node.js texts with a 2,000-piece model)
        kind = "unigram" if spec["model_type"] == UNIGRAM else f"type {spec['model_type']}"
        raise DataError(f"a {kind} model has no exact Hugging Face equivalent; train the "
                        "tokenizer with model_type bpe (`kiln tokenizer`'s default)",
                        path=model_file, field="model_type")
    sp = spm.SentencePieceProcessor(model_file=model_file)
    types = spec["types"]
    pieces = [sp.id_to_piece(i) for i in range(len(types))]
    special = [i for i, t in enumerate(types) if t in (UNKNOWN, CONTROL, USER_DEFINED)]
    vocab = {p: i for i, p in enumerate(pieces)}
    merges = []
    for i, piece in enumerate(pieces):
        if types[i] != NORMAL:
            continue
        pairs = [(piece[:k], piece[k:]) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        pairs.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges.extend((sp.get_score(i), left, right) for left, right in pairs)
    merges.sort(key=lambda m: -m[0])  # stable: ties keep the order above
    tok = Tokenizer(BPE(vocab, [(left, right) for _, left, right in merges],
                        unk_token=pieces[sp.unk_id()], fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False)
                            for i in special])
    user_defined = [pieces[i] for i, t in enumerate(types) if t == USER_DEFINED]
    for text in PROBES:
        # sentencepiece matches user-defined pieces inside text; Hugging Face splits the text at
        # them first: compare stretch by stretch, as the chat layout encodes
        want = _encode_by_stretch(sp, text, user_defined)
        got = tok.encode(text, add_special_tokens=False).ids
        if got != want:
            raise DataError(f"its Hugging Face conversion encodes {text!r} as {got}, sentencepiece "
                            f"as {want}", path=model_file)
    return tok


def _encode_by_stretch(sp: Any, text: str, tokens: list[str]) -> list[int]:
    ids, rest = [], text
    while rest:
        hits = [(rest.find(t), t) for t in tokens if t in rest]
        if not hits:
            return ids + sp.encode(rest)
        at, token = min(hits)
        if at:
            ids += sp.encode(rest[:at])
        ids.append(sp.piece_to_id(token))
        rest = rest[at + len(token):]
    return ids


def write(model_file: str, out: str, model_max_length: int | None = None) -> None:
    """`tokenizer.json`, `tokenizer_config.json` and the sentencepiece model itself in `out`:
    `<s>` first when special tokens are added (as the trainer's chat rows start), `</s>` ends."""
    import sentencepiece as spm
    from tokenizers import processors

    sp = spm.SentencePieceProcessor(model_file=model_file)
    tok = convert(model_file)
    bos, eos = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, sp.bos_id())])
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "unk_token": sp.id_to_piece(sp.unk_id()), "add_bos_token": True, "add_eos_token": False,
        "clean_up_tokenization_spaces": False}
    if sp.pad_id() >= 0:
        config["pad_token"] = sp.id_to_piece(sp.pad_id())
    if model_max_length:
        config["model_max_length"] = model_max_length
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    with open(model_file, "rb") as src, open(os.path.join(out, "tokenizer.model"), "wb") as dst:
        dst.write(src.read())
