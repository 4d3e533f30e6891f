"""Tokenizer training (sentencepiece, fixed ids, deterministic), the bounded hash sample, and
adoption of a Hugging Face tokenizer directory built locally."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import random

import pytest

from dataprep import special_tokens as st
from dataprep.tokenize_transforms import BoundedHashSample
from dataprep.tokenizer import (
    SentencePieceTokenizer,
    TrainSpec,
    load_tokenizer,
    train_sentencepiece,
    training_lines,
)
from kiln.errors import UsageError

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "jobs", "sample_data", "hh-rlhf-harmless-base-test.jsonl.gz")


@pytest.fixture(scope="module")
def hh_texts() -> list[str]:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        return [json.loads(line)["chosen"] for _, line in zip(range(300), f, strict=False)]


def _lines(texts: list[str]) -> list[str]:
    return [line for t in texts for line in training_lines(t, 16384)]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic_with_fixed_ids(hh_texts, model_type):
    spec = TrainSpec(vocab_size=600, model_type=model_type)
    first = train_sentencepiece(_lines(hh_texts), spec)
    second = train_sentencepiece(_lines(hh_texts), spec)
    assert first == second
    tok = SentencePieceTokenizer(first)
    assert tok.vocab_size == 600
    for piece, pid in st.FIXED_IDS.items():
        assert tok.sp.piece_to_id(piece) == pid
    for token in st.CHAT_TOKENS:
        assert tok.control(token) == [st.FIXED_IDS[token]]
        assert tok.encode(f"a {token} b").count(st.FIXED_IDS[token]) == 1
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (st.PAD_ID, st.BOS_ID, st.EOS_ID)


def test_trained_tokenizer_is_lossless_on_whitespace_and_code(hh_texts):
    tok = SentencePieceTokenizer(train_sentencepiece(_lines(hh_texts), TrainSpec(vocab_size=500)))
    text = "def f(x):\n\treturn  x  * 2   # ünïcode ✓ 日本\n\n\nHuman: hi"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "a"]) == [tok.encode(text), tok.encode("a")]
    assert pickle.loads(pickle.dumps(tok)).encode(text) == tok.encode(text)


def test_training_lines_cut_long_lines_and_skip_blank():
    text = "a\n\n   \n" + "x" * 100 + "\nlast"
    assert list(training_lines(text, 80)) == ["a", "x" * 20, "x" * 20, "x" * 20, "x" * 20,
                                              "x" * 20, "last"]


def _item(i: int, size: int) -> tuple[int, str, int, str]:
    key = f"s/{i}"
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
    return (h, key, size, "t" * size)


def test_bounded_hash_sample_is_the_same_however_the_input_is_split():
    rng = random.Random(7)
    items = [_item(i, rng.randint(1, 50)) for i in range(2000)]
    fn = BoundedHashSample(max_bytes=3000)
    expected, total = [], 0
    for it in sorted(items):  # reference: the smallest-hash prefix reaching the budget
        if total >= 3000:
            break
        expected.append(it)
        total += it[2]
    for parts in (1, 3, 17):
        shuffled = items[:]
        rng.shuffle(shuffled)
        accs = []
        for p in range(parts):
            acc = fn.create_accumulator()
            for it in shuffled[p::parts]:
                acc = fn.add_input(acc, it)
            accs.append(acc)
        assert fn.extract_output(fn.merge_accumulators(accs)) == expected
    small = fn.extract_output(fn.add_input(fn.create_accumulator(), items[0]))
    assert small == [items[0]]  # below the budget: everything


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hh_texts) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<unk>", "<bos>",
                                                                 "<eos>", st.USER])
    tk.train_from_iterator(hh_texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    out = str(tmp_path_factory.mktemp("hf"))
    fast.save_pretrained(out)
    return out


def test_hf_tokenizer_matches_transformers(hf_dir, hh_texts):
    from transformers import AutoTokenizer

    tok = load_tokenizer(hf_dir)
    ref = AutoTokenizer.from_pretrained(hf_dir)
    with open(f"{hf_dir}/tokenizer.json", "rb") as f:
        assert tok.fingerprint == hashlib.sha256(f.read()).hexdigest()
    assert tok.vocab_size == len(ref)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                   ref.pad_token_id)
    texts = hh_texts[:20]
    expected = [ref(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in texts] == expected
    assert tok.decode(expected[0]) == texts[0]
    assert tok.control(st.USER) == [ref.convert_tokens_to_ids(st.USER)]  # in the vocabulary
    assert tok.control(st.ASSISTANT) == tok.encode(st.ASSISTANT)  # not: its text
    assert len(tok.control(st.ASSISTANT)) > 1
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(texts[1]) == expected[1] and clone.fingerprint == tok.fingerprint


def test_hf_tokenizer_feeds_the_token_shards(hf_dir, hh_texts, tmp_path):
    from dataprep.token_inputs import InputUnit
    from dataprep.token_shards import EncodeSettings, tokenize_unit
    from schemas.indexed import IndexedReader

    tok = load_tokenizer(hf_dir)
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in hh_texts[:30]))
    res, dead = tokenize_unit(InputUnit("hf", str(path), 0), tok, EncodeSettings(add_bos=True),
                              str(tmp_path / "parts"))
    assert not dead and res.documents == 30
    reader = IndexedReader(res.prefix)
    assert [reader[i].tolist() for i in range(30)] == \
        [[tok.bos_id, *tok.encode(t), tok.eos_id] for t in hh_texts[:30]]


def test_adopt_hf_and_sentencepiece_with_the_job(hf_dir, hh_texts, tmp_path):
    from jobs.tokenizer import INFO_FILE, main

    assert main(["--from", hf_dir, "--out", str(tmp_path / "hf")]) == 0
    adopted = load_tokenizer(str(tmp_path / "hf"))
    assert adopted.fingerprint == load_tokenizer(hf_dir).fingerprint
    info = json.loads((tmp_path / "hf" / INFO_FILE).read_text())
    assert info["kind"] == "huggingface" and info["special_ids"][st.USER] is not None
    assert info["special_ids"][st.SYSTEM] is None

    with pytest.raises(UsageError, match="Vocabulary size is smaller than required_chars"):
        train_sentencepiece(_lines(hh_texts[:100]), TrainSpec(vocab_size=100))
    proto = train_sentencepiece(_lines(hh_texts[:100]), TrainSpec(vocab_size=500))
    (tmp_path / "m.model").write_bytes(proto)
    assert main(["--from", str(tmp_path / "m.model"), "--out", str(tmp_path / "sp")]) == 0
    sp = load_tokenizer(str(tmp_path / "sp"))
    assert sp.fingerprint == hashlib.sha256(proto).hexdigest()
    assert (tmp_path / "sp" / "fingerprint.txt").read_text().strip() == sp.fingerprint
