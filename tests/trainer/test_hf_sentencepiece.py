"""A model trained from scratch exports with its own `kiln tokenizer` sentencepiece model, converted
to a `tokenizer.json` that gives the same ids: on every HH-RLHF and Node.js-docs text, and through
transformers' chat template on the SFT conversations; settings without an exact equivalent are
refused by name. End to end: tiny SFT -> `kiln export-hf` (no --tokenizer) -> transformers gives
our logits."""

from __future__ import annotations

import gzip
import json
import re
import tarfile
from pathlib import Path

import pytest
import torch

from kiln.cli import run_main
from kiln.errors import DataError
from tests.trainer.conftest import ROOT, train_in_this_process
from tests.trainer.hf_util import TOKENS, hf_logits, run_driver
from trainer.hf import export_hf
from trainer.hf.sentencepiece_hf import convert, read_spec

HH = ROOT / "jobs" / "sample_data" / "hh-rlhf-harmless-base-test.jsonl.gz"
HH_TOKENIZER = ROOT / "trainer" / "configs" / "data" / "tokenizer-hh"
CHATS = ROOT / "jobs" / "sample_data" / "hh-rlhf-chosen-messages.jsonl"


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Both sides of every sample HH-RLHF pair, and code and prose of the Node.js docs site
    that `kiln demo` crawls."""
    out = []
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            out += [row["chosen"], row["rejected"]]
    with tarfile.open(ROOT / "jobs" / "sample_data" / "nodejs-api-html.tar.gz") as tar:
        pages = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".html")][:40]
        for member in pages:
            html = tar.extractfile(member).read().decode("utf-8", "replace")
            out += re.findall(r"<code[^>]*>(.*?)</code>", html, re.S)[:20]
            out.append(re.sub(r"<[^>]+>", "", html)[:4000])
    return out


def _train(texts: list[str], path: Path, **spec) -> str:
    from dataprep.tokenizer import TrainSpec, train_sentencepiece

    path.write_bytes(train_sentencepiece(texts, TrainSpec(**spec)))
    return str(path)


def _assert_same_ids(model_file: str, texts: list[str]) -> None:
    import sentencepiece as spm

    sp, tok = spm.SentencePieceProcessor(model_file=model_file), convert(model_file)
    for text in texts:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == ids, text[:80]
        assert tok.decode(ids) == sp.decode(ids), text[:80]


def test_the_committed_hh_tokenizer_converts_exactly(texts):
    _assert_same_ids(str(HH_TOKENIZER / "tokenizer.model"), texts)


def test_a_larger_tokenizer_with_code_pieces_converts_exactly(texts, tmp_path):
    model = _train(texts[::2], tmp_path / "bpe.model", vocab_size=2000)
    _assert_same_ids(model, texts)  # half of them unseen in training


@pytest.mark.parametrize(("spec", "field"), [
    ({"model_type": "unigram"}, "model_type"),  # Viterbi ties break differently
    ({"normalization": "nmt_nfkc"}, "normalizer"),
    ({"remove_extra_whitespaces": True}, "remove_extra_whitespaces"),
    ({"byte_fallback": False}, "byte_fallback"),
])
def test_settings_without_an_exact_equivalent_are_refused_by_name(texts, tmp_path, spec, field):
    model = _train(texts[:400], tmp_path / "other.model", vocab_size=600, **spec)
    with pytest.raises(DataError, match=f"field '{field}'"):
        convert(model)


def test_a_file_that_is_not_a_sentencepiece_model_is_refused(tmp_path):
    (tmp_path / "x.model").write_bytes(b"\x0bnot a model")
    with pytest.raises(DataError, match="not a sentencepiece model"):
        read_spec(str(tmp_path / "x.model"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("spm-export")
    train_in_this_process([(str(ROOT / "trainer" / "configs" / "tiny-sft.yaml"),
                            ["train.steps=2", "checkpoint.save=true", f"run_dir={root / 'run'}"])])
    assert run_main(export_hf.main, [str(root / "run" / "checkpoints"), "--out",
                                     str(root / "hf")]) == 0
    return root


@pytest.mark.slow
def test_the_export_records_the_trained_context(exported):
    config = json.loads((exported / "hf" / "config.json").read_text())
    assert config["max_position_embeddings"] == 128  # tiny-sft's train.seq_length, not 4096


@pytest.mark.slow
def test_transformers_renders_our_chat_layout_with_the_exported_tokenizer(exported):
    from transformers import AutoTokenizer

    from dataprep.chat.formats import Message
    from dataprep.chat.template import ChatTemplate
    from dataprep.tokenizer import load_tokenizer

    hf = AutoTokenizer.from_pretrained(str(exported / "hf"))
    ours = ChatTemplate(load_tokenizer(str(HH_TOKENIZER)))
    conversations = [json.loads(line)["messages"] for line in CHATS.read_text().splitlines()]
    for messages in conversations[:200]:
        want = ours.render([Message(m["role"], m["content"]) for m in messages]).input_ids
        got = hf.apply_chat_template(messages, tokenize=True)
        assert list(getattr(got, "input_ids", got)) == want
    prompt = conversations[0][:1]
    assert list(getattr(p := hf.apply_chat_template(prompt, add_generation_prompt=True),
                        "input_ids", p)) == ours.render_prompt(
        [Message(m["role"], m["content"]) for m in prompt])


@pytest.mark.slow
def test_transformers_gives_our_logits_for_a_model_trained_from_scratch(exported):
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(exported / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    run_driver({"scratch": {"config": str(ROOT / "trainer" / "configs" / "tiny-sft.yaml"),
                            "checkpoint": str(exported / "run" / "checkpoints"),
                            "set": ["model.vocab_size=512"]}},  # the SFT shards' tokenizer
               exported, nproc=1)
    ours = torch.load(exported / "scratch.pt")["logits"]
    torch.testing.assert_close(ours, hf_logits(exported / "hf", TOKENS), atol=1e-4, rtol=0)
