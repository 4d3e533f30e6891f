"""Hygiene: normalised content keys for exact dedup, n-gram decontamination, eval prompt files."""

from __future__ import annotations

import pytest

from dataprep.chat.formats import (
    Conversation,
    Message,
    PreferencePair,
    PromptExample,
    UnpairedExample,
)
from dataprep.chat.hygiene import Decontaminator, content_key, ngrams, read_eval_prompts
from kiln.errors import DataError

Q = (Message("user", "What is the capital of France?"),)


def test_content_key_ignores_case_and_whitespace_but_not_roles_or_labels():
    a = PreferencePair(Q, "Paris.", "Lyon.")
    b = PreferencePair((Message("user", "what  is the capital of\nFrance?"),), "paris.", "LYON.")
    assert content_key(a) == content_key(b)
    assert content_key(a) != content_key(PreferencePair(Q, "Lyon.", "Paris."))
    assert content_key(UnpairedExample(Q, "x", True)) != content_key(UnpairedExample(Q, "x", False))
    assert content_key(Conversation((*Q, Message("assistant", "Paris")))) != \
        content_key(Conversation((Message("system", Q[0].content), Message("assistant", "Paris"))))


def test_decontamination_by_13_gram_overlap_on_user_turns():
    eval_q = "Natalia sold clips to 48 of her friends in April and then she sold half as many in May"
    d = Decontaminator([eval_q, "short prompt"], n=13)
    hit = "Please solve: natalia sold clips to 48 of her friends in April and then she sold half"
    near = "Natalia sold clips to 48 of her friends in June and then she sold half as many"
    assert d.contaminated(PromptExample((Message("user", hit),)))
    assert not d.contaminated(PromptExample((Message("user", near),)))
    # assistant text is not checked: only prompts are evaluation inputs
    assert not d.contaminated(Conversation((Message("user", "hi"), Message("assistant", hit))))
    assert d.contaminated(PromptExample((Message("user", "a Short  prompt here"),)))
    assert len(ngrams(eval_q, 13)) == len(eval_q.split()) - 12


def test_read_eval_prompts_jsonl_and_text(tmp_path):
    p = tmp_path / "eval.jsonl"
    p.write_text('{"question": "Q1"}\n\n{"messages": [{"role": "user", "content": "Q2"}]}\nplain Q3\n')
    assert read_eval_prompts(str(p)) == ["Q1", "Q2", "plain Q3"]
    p.write_text('{"question": "Q1"}\n{"answer": 3}\n')
    with pytest.raises(DataError, match="row 2"):
        read_eval_prompts(str(p))
