"""Length policy: left truncation of prompts by whole turns then tokens, completion caps, drops."""

from __future__ import annotations

import pytest

from dataprep.chat.formats import Conversation, Message, PreferencePair
from dataprep.chat.lengths import LengthPolicy, TooLong, fit
from dataprep.chat.rows import render_conversation, render_preference
from dataprep.chat.template import ChatTemplate, Turn
from dataprep.tokenizer import load_tokenizer
from tests.dataprep.chat_helpers import train_tokenizer

BOS, U, A, END, EOS = 2, 5, 6, 7, 3


def turn(role_id: int, n: int, trained: bool = False) -> Turn:
    return Turn([role_id], list(range(100, 100 + n)), [END], trained)


def prompt(*turns: Turn) -> list[Turn]:
    return [Turn([BOS], [], [], False), *turns, Turn([A], [], [], False)]


def flat(turns: list[Turn]) -> list[int]:
    return [i for t in turns for i in t.head + t.body + t.tail]


def test_within_limits_nothing_changes():
    p = prompt(turn(U, 5))
    out = fit(p, [[1, 2, 3]], LengthPolicy(max_total_tokens=100))
    assert flat(out.prompt) == flat(p) and not out.prompt_truncated and not out.completion_truncated


def test_whole_turns_dropped_from_the_left_first_and_header_kept():
    p = prompt(turn(U, 10), turn(A, 10), turn(U, 4))  # 1 + 12 + 12 + 6 + 1 = 32 tokens
    out = fit(p, [[9] * 5], LengthPolicy(max_total_tokens=20))
    # the old user turn and the assistant turn after it go; bos + last user turn + header remain
    assert flat(out.prompt) == [BOS, U, 100, 101, 102, 103, END, A]
    assert out.prompt_truncated and out.completions == [[9] * 5]


def test_then_tokens_cut_from_the_left_of_the_last_turn():
    p = prompt(turn(U, 10))  # 1 + 12 + 1 = 14
    out = fit(p, [[9] * 4], LengthPolicy(max_total_tokens=12))
    assert flat(out.prompt) == [BOS, U, 106, 107, 108, 109, END, A]
    assert len(flat(out.prompt)) + 4 == 12


def test_max_prompt_and_max_completion():
    out = fit(prompt(turn(U, 10)), [[9] * 30, [8] * 5],
              LengthPolicy(max_prompt_tokens=8, max_completion_tokens=10, max_total_tokens=None))
    assert len(flat(out.prompt)) == 8 and out.completions == [[9] * 10, [8] * 5]
    assert out.prompt_truncated and out.completion_truncated


def test_completion_cut_but_at_least_n_tokens_kept_else_dropped():
    p = prompt(turn(U, 10))  # shortest valid prompt: bos U x END A = 5
    out = fit(p, [[9] * 20], LengthPolicy(max_total_tokens=15, min_completion_tokens=8))
    assert len(flat(out.prompt)) == 5 and out.completions == [[9] * 10]
    with pytest.raises(TooLong, match="too_long"):
        fit(p, [[9] * 20], LengthPolicy(max_total_tokens=10, min_completion_tokens=8))


@pytest.mark.parametrize("policy, reason", [
    (LengthPolicy(max_total_tokens=10, overflow="drop"), "too_long"),
    (LengthPolicy(max_completion_tokens=5, overflow="drop"), "completion_too_long"),
    (LengthPolicy(max_prompt_tokens=3), "prompt_too_long"),
])
def test_drops_name_their_reason(policy, reason):
    with pytest.raises(TooLong, match=f"^{reason}$"):
        fit(prompt(turn(U, 10)), [[9] * 8], policy)


def test_rendered_sft_and_preference_rows_stay_valid(tmp_path):
    train_tokenizer(str(tmp_path))
    tpl = ChatTemplate(load_tokenizer(str(tmp_path)))
    long = "word " * 80
    msgs = (Message("user", long), Message("assistant", long), Message("user", "short question"))
    ids, mask, f = render_conversation(tpl, Conversation((*msgs, Message("assistant", "an answer"))),
                                       LengthPolicy(max_total_tokens=30))
    assert len(ids) <= 30 and ids[:2] == [BOS, U] and ids[-2:] == [END, EOS] and f.prompt_truncated
    assert mask[ids.index(A) + 1:] == [1] * (len(ids) - ids.index(A) - 1)
    p, c, r, f = render_preference(tpl, PreferencePair(msgs, "yes " * 50, "no"),
                                   LengthPolicy(max_total_tokens=40, max_completion_tokens=20))
    assert p[:2] == [BOS, U] and p[-1] == A and len(p) + len(c) <= 40 and len(c) <= 20
    assert f.completion_truncated and r[-2:] == [END, EOS]
