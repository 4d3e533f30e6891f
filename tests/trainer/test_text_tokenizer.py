"""The tokenizer the trainer encodes prompts and decodes completions with (`kiln generate`, RL
reward texts): a `kiln tokenizer` directory or a Hugging Face one, told apart by their files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.errors import UsageError
from tests.trainer.hf_util import make_tokenizer
from trainer.text_tokenizer import TextTokenizer

KILN = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "data" / "tokenizer-hh"
TEXT = "Hello there,\n  how are you?"


def test_kiln_tokenizer_uses_llmkiln_chat_layout() -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(KILN / "tokenizer.model"))
    tok = TextTokenizer(str(KILN))
    assert not tok.hf and tok.vocab_size == sp.get_piece_size()
    assert tok.encode(TEXT) == [sp.bos_id(), *sp.encode(TEXT)]
    controls = [sp.piece_to_id(p) for p in ("<|user|>", "<|end|>", "<|assistant|>")]
    assert tok.encode(TEXT, chat=True) == [sp.bos_id(), controls[0], *sp.encode(TEXT),
                                          controls[1], controls[2]]
    assert tok.stop_ids() == [sp.eos_id()] and tok.stop_ids(chat=True) == [sp.eos_id(), controls[1]]
    assert tok.decode(tok.encode(TEXT)[1:]) == TEXT


def test_hugging_face_tokenizer_as_transformers_reads_it(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    make_tokenizer(tmp_path / "tokenizer")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    tok = TextTokenizer(str(tmp_path / "tokenizer"))
    assert tok.hf and tok.vocab_size == len(theirs)
    assert tok.encode(TEXT) == theirs(TEXT).input_ids
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.stop_ids() == [theirs.eos_token_id] and tok.pad_id == theirs.pad_token_id
    # an import keeps generation_config.json beside the tokenizer: its end-of-turn ids stop too
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert tok.stop_ids() == sorted({theirs.eos_token_id, 7, 9})
    with pytest.raises(UsageError, match="no chat template"):
        tok.encode(TEXT, chat=True)


def test_a_hugging_face_directory_with_a_sentencepiece_model_is_read_as_hugging_face(
        tmp_path: Path) -> None:
    """Llama 2 repositories ship tokenizer.model beside tokenizer.json; only `kiln tokenizer`
    directories have fingerprint.txt."""
    make_tokenizer(tmp_path)
    shutil.copy(KILN / "tokenizer.model", tmp_path / "tokenizer.model")
    assert TextTokenizer(str(tmp_path)).hf
    assert not TextTokenizer(str(KILN)).hf
    with pytest.raises(UsageError, match="neither tokenizer.model"):
        TextTokenizer(str(tmp_path / "nothing"))
