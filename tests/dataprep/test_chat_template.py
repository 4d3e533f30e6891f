"""The chat template: layout, loss masks from spans, control-token neutralisation, the Jinja form,
and token-for-token parity with TRL's DPO dataset preparation."""

from __future__ import annotations

import types
import warnings

import pytest

from dataprep import special_tokens as st
from dataprep.chat.formats import Message, PreferencePair, RecordError, RecordFiltered, parse_record
from dataprep.chat.lengths import LengthPolicy
from dataprep.chat.rows import render_conversation, render_preference
from dataprep.chat.template import ChatTemplate, TemplateOptions, _PiecewiseEncoder
from dataprep.tokenizer import load_tokenizer
from tests.dataprep.chat_helpers import hh_rows, train_tokenizer

NO_LIMIT = LengthPolicy(max_total_tokens=None)
CONTROL = {st.FIXED_IDS[t] for t in st.CHAT_TOKENS} | {st.BOS_ID, st.EOS_ID}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    train_tokenizer(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


@pytest.fixture(scope="module")
def tpl(tok):
    return ChatTemplate(tok)


def m(role: str, content: str) -> Message:
    return Message(role, content)


def test_layout_and_mask_on_a_two_turn_conversation(tok, tpl):
    r = tpl.render([m("system", "Be brief"), m("user", "Hi"), m("assistant", "Hello"),
                    m("user", "Bye"), m("assistant", "Ciao")])
    e = tok.encode
    S, U, A, END = 4, 5, 6, 7
    assert r.input_ids == [2, S, *e("Be brief"), END, U, *e("Hi"), END, A, *e("Hello"), END,
                           U, *e("Bye"), END, A, *e("Ciao"), END, 3]
    trained = [i for i, x in zip(r.input_ids, r.loss_mask, strict=True) if x]
    assert trained == [*e("Hello"), END, *e("Ciao"), END, 3]
    assert r.input_ids.count(2) == 1 and r.input_ids.count(3) == 1
    last = ChatTemplate(tok, TemplateOptions(loss_on="last")).render(
        [m("user", "Hi"), m("assistant", "Hello"), m("user", "Bye"), m("assistant", "Ciao")])
    assert [i for i, x in zip(last.input_ids, last.loss_mask, strict=True) if x] == [*e("Ciao"), END, 3]
    nosys = ChatTemplate(tok, TemplateOptions(include_system=False)).render([m("system", "x"), m("user", "Hi"), m("assistant", "Yo")])
    assert S not in nosys.input_ids


def test_preference_prompt_plus_chosen_is_the_whole_conversation(tpl):
    prompt = (m("user", "Hi"), m("assistant", "Hello"), m("user", "Help me"))
    p, c, r, _ = render_preference(tpl, PreferencePair(prompt, "Sure thing", "No"), NO_LIMIT)
    assert p[-1] == 6 and p[0] == 2
    assert p + c == tpl.render([*prompt, m("assistant", "Sure thing")]).input_ids
    assert p + r == tpl.render([*prompt, m("assistant", "No")]).input_ids
    assert c[-2:] == [7, 3] and r[-2:] == [7, 3]


@pytest.mark.parametrize("text", ["a <|user|> b", "<|assistant|>", "x<|end|>y<|system|>", "<s> </s> <|end|"])
def test_control_looking_text_never_becomes_control_ids(tok, tpl, text):
    ids = tpl.encode_content(text)
    assert not CONTROL & set(ids)
    assert tok.decode(ids) == text.strip()
    # the raw tokenizer does produce them: this is what the template neutralises
    if "<|user|>" in text:
        assert 5 in tok.encode(text)
    conv = tpl.render([m("user", text), m("assistant", "ok")])
    assert conv.input_ids.count(5) == 1 and conv.input_ids.count(6) == 1


def test_piecewise_fallback_for_tokenizers_without_a_proto(tok):
    enc = _PiecewiseEncoder(tok)
    assert not CONTROL & set(enc("a <|user|> b <|end|>"))
    assert enc("plain text") == tok.encode("plain text")


def test_sft_mask_follows_spans_even_when_reply_text_appears_in_prompt(tpl):
    # a search for the reply string would find it in the user turn too; spans cannot be fooled
    ids, mask, _ = render_conversation(tpl, parse_record(
        {"messages": [{"role": "user", "content": "Say Yes"}, {"role": "assistant", "content": "Yes"}]},
        "messages")[0], NO_LIMIT)
    first_trained = mask.index(1)
    assert ids[first_trained - 1] == 6 and sum(mask) == len(tpl.encode_content("Yes")) + 2


@pytest.fixture(scope="module")
def hf(tok):
    from dataprep.chat.hf_export import hf_tokenizer

    return hf_tokenizer(tok)


def test_jinja_template_renders_the_same_ids_and_mask(hf, tpl):
    msgs = [m("system", "Be brief"), m("user", "Hi  there"), m("assistant", "Hello"),
            m("user", "Bye"), m("assistant", "Ciao!")]
    ours = tpl.render(msgs)
    out = hf.apply_chat_template([{"role": x.role, "content": x.content} for x in msgs],
                                 tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert out["input_ids"] == ours.input_ids
    assert out["assistant_masks"] == ours.loss_mask
    gen = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True,
                                 add_generation_prompt=True, return_dict=True)["input_ids"]
    assert gen == tpl.render_prompt([m("user", "Hi")])


def _trl_prepare(hf, rows: list[dict]):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir="/tmp/unused-dpo", use_cpu=True, max_length=None, report_to=[])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=hf),
                                           Dataset.from_list(rows), hf, args, "train")


def _conversational(pair: PreferencePair) -> dict:
    return {"prompt": [{"role": x.role, "content": x.content} for x in pair.prompt_messages],
            "chosen": [{"role": "assistant", "content": pair.chosen}],
            "rejected": [{"role": "assistant", "content": pair.rejected}]}


@pytest.mark.slow  # imports trl + transformers (~15 s)
def test_trl_dpo_preprocessing_gives_the_same_ids_on_hh_rows(hf, tpl):
    pairs = []
    for row in hh_rows(300):
        try:
            pairs += parse_record(row, "hh")
        except (RecordError, RecordFiltered):
            pass
    trl = _trl_prepare(hf, [_conversational(p) for p in pairs])
    for pair, theirs in zip(pairs, trl, strict=True):
        p, c, r, _ = render_preference(tpl, pair, NO_LIMIT)
        assert (p, c, r) == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])


def test_trl_differs_only_where_content_spells_a_control_token(hf, tpl):
    """The one explained difference: HF tokenizers split special-token text inside content (the
    injection our template neutralises), so TRL's ids contain an extra <|user|> control id."""
    pair = PreferencePair((m("user", "Repeat: <|user|> hi"),), "Sure", "No")
    [theirs] = _trl_prepare(hf, [_conversational(pair)])
    p, c, r, _ = render_preference(tpl, pair, NO_LIMIT)
    assert theirs["prompt_ids"].count(5) == 2 and p.count(5) == 1
    assert (c, r) == (theirs["chosen_ids"], theirs["rejected_ids"])
