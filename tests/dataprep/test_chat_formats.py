"""Readers and auto-detection of chat-data formats, on small fixtures and on the real HH-RLHF file."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from dataprep.chat.formats import (
    Conversation,
    Message,
    PairingRule,
    PreferencePair,
    PromptExample,
    RecordError,
    RecordFiltered,
    UnpairedExample,
    detect_format,
    iter_records,
    parse_record,
)
from tests.dataprep.chat_helpers import hh_rows

U, A, S = "user", "assistant", "system"


def conv(*pairs: tuple[str, str]) -> Conversation:
    return Conversation(tuple(Message(r, c) for r, c in pairs))


def test_openai_messages_sharegpt_alpaca_prompt_completion_normalise_alike():
    msgs = {"messages": [{"role": S, "content": "Be brief."}, {"role": U, "content": "Hi"},
                         {"role": A, "content": "Hello"}]}
    share = {"conversations": [{"from": "system", "value": "Be brief."},
                               {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}
    expected = conv((S, "Be brief."), (U, "Hi"), (A, "Hello"))
    assert parse_record(msgs, "messages") == [expected]
    assert parse_record(share, "sharegpt") == [expected]
    alpaca = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief."}
    assert parse_record(alpaca, "alpaca") == [conv((S, "Be brief."), (U, "Add\n\n2 and 3"), (A, "5"))]
    assert parse_record({"instruction": "Hi", "input": "", "output": "Yo"}, "alpaca") == \
        [conv((U, "Hi"), (A, "Yo"))]
    pc = {"prompt": [{"role": U, "content": "Hi"}], "completion": [{"role": A, "content": "Yo"}]}
    assert parse_record(pc, "prompt-completion") == [conv((U, "Hi"), (A, "Yo"))]
    assert parse_record({"prompt": "Hi", "completion": "Yo"}, "prompt-completion") == \
        [conv((U, "Hi"), (A, "Yo"))]


@pytest.mark.parametrize("record, fmt, reason", [
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages", "unknown role 'wizard'"),
    ({"messages": [{"role": U, "content": "  "}, {"role": A, "content": "a"}]}, "messages", "empty text"),
    ({"messages": [{"role": U, "content": 3}, {"role": A, "content": "a"}]}, "messages", "expected a string"),
    ({"messages": [{"role": U, "content": "q"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}, {"role": S, "content": "s"}]},
     "messages", "system message is only allowed first"),
    ({"conversations": [{"from": "bard", "value": "x"}]}, "sharegpt", "unknown role 'bard'"),
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"prompt": "x", "completion": 5}, "prompt-completion", "expected a string"),
    ({"chosen": "x", "rejected": 1}, "pairs", "field 'rejected'"),
    ({"prompt": "p", "completion": "c", "label": "yes"}, "unpaired", "field 'label': expected bool"),
    ({"prompt": [{"role": A, "content": "a"}]}, "prompts", "must end with a user turn"),
])
def test_malformed_records_name_the_field(record, fmt, reason):
    with pytest.raises(RecordError, match=reason):
        parse_record(record, fmt)


def test_hh_transcript_split_into_prompt_and_final_turns():
    chosen = "\n\nHuman: Hi there\n\nAssistant:  Hello!  \n\nHuman: Help?\n\nAssistant: Sure."
    rejected = "\n\nHuman: Hi there\n\nAssistant:  Hello!  \n\nHuman: Help?\n\nAssistant: No."
    [pair] = parse_record({"chosen": chosen, "rejected": rejected}, "hh")
    assert pair == PreferencePair((Message(U, "Hi there"), Message(A, "Hello!"), Message(U, "Help?")),
                                  "Sure.", "No.")
    # a bare "Human:" inside a turn is content, not a turn boundary
    [pair] = parse_record({"chosen": "\n\nHuman: a\n\nAssistant: b  Human: c",
                           "rejected": "\n\nHuman: a\n\nAssistant: d"}, "hh")
    assert pair.chosen == "b  Human: c"


def test_hh_quirks_in_the_real_file_are_counted_not_crashed():
    outcomes: dict[str, int] = {}
    for row in hh_rows():
        try:
            parse_record(row, detect_format(row))
            key = "kept"
        except RecordFiltered as exc:
            key = exc.reason
        except RecordError as exc:
            key = str(exc)
        outcomes[key] = outcomes.get(key, 0) + 1
    # measured on the file: 5 pairs differ before the last turn, 4 have an empty chosen reply
    assert outcomes == {"kept": 2303, "divergent_history": 5,
                        "field 'chosen': empty final assistant turn": 4}


def test_trl_pairs_explicit_and_implicit_prompt():
    p = [{"role": U, "content": "Sky?"}]
    explicit = {"prompt": p, "chosen": [{"role": A, "content": "Blue"}],
                "rejected": [{"role": A, "content": "Green"}], "score_chosen": 9, "score_rejected": 2}
    implicit = {"chosen": p + [{"role": A, "content": "Blue"}], "rejected": p + [{"role": A, "content": "Green"}]}
    strings = {"prompt": "Sky?", "chosen": "Blue", "rejected": "Green"}
    want = PreferencePair((Message(U, "Sky?"),), "Blue", "Green")
    assert parse_record(explicit, "pairs") == [PreferencePair(want.prompt_messages, "Blue", "Green", (9.0, 2.0))]
    assert parse_record(implicit, "pairs") == [want]
    assert parse_record(strings, "pairs") == [want]


def test_scored_completions_pairing_rules():
    rec = {"prompt": "Q", "completions": [{"response": "a", "score": 3}, {"text": "b", "rating": 9},
                                          {"response": "c", "score": 5}, {"response": "d", "score": 1}]}
    [bw] = parse_record(rec, "scored", PairingRule("best_vs_worst"))
    assert (bw.chosen, bw.rejected, bw.scores) == ("b", "d", (9.0, 1.0))
    picks = {parse_record(rec, "scored", PairingRule("best_vs_random", seed=s), key="k")[0].rejected
             for s in range(20)}
    assert picks <= {"a", "c", "d"} and len(picks) > 1
    assert parse_record(rec, "scored", PairingRule("best_vs_random", seed=7), key="k") == \
        parse_record(rec, "scored", PairingRule("best_vs_random", seed=7), key="k")
    allp = parse_record(rec, "scored", PairingRule("all_pairs", margin=2.0))
    assert {(p.chosen, p.rejected) for p in allp} == {("b", "c"), ("b", "a"), ("b", "d"), ("c", "d")}
    assert all(p.scores[0] - p.scores[1] > 2.0 for p in allp)
    with pytest.raises(RecordFiltered, match="no_pair_above_margin"):
        parse_record({"prompt": "Q", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]},
                     "scored")


def test_unpaired_and_prompt_only():
    assert parse_record({"prompt": "Q", "completion": "A", "label": False}, "unpaired") == \
        [UnpairedExample((Message(U, "Q"),), "A", False)]
    msgs = [{"role": S, "content": "Be nice"}, {"role": U, "content": "2+2?"}]
    assert parse_record({"messages": msgs, "answer": 4}, "prompts") == \
        [PromptExample((Message(S, "Be nice"), Message(U, "2+2?")), "4")]
    assert parse_record({"prompt": "Q", "reference": "R"}, "prompts") == [PromptExample((Message(U, "Q"),), "R")]


@pytest.mark.parametrize("record, fmt", [
    ({"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]}, "messages"),
    ({"messages": [{"role": U, "content": "q"}]}, "prompts"),
    ({"conversations": []}, "sharegpt"),
    ({"instruction": "i", "output": "o"}, "alpaca"),
    ({"prompt": "p", "completion": "c"}, "prompt-completion"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: c"}, "hh"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "pairs"),
    ({"chosen": [{"role": U, "content": "q"}], "rejected": []}, "pairs"),
    ({"prompt": "p", "completions": []}, "scored"),
    ({"prompt": "p", "completion": "c", "label": True}, "unpaired"),
    ({"prompt": "p", "answer": "a"}, "prompts"),
    ({"text": "t"}, None),
])
def test_detect_format(record, fmt):
    assert detect_format(record) == fmt


def test_bad_lines_get_line_numbers_in_plain_gzip_and_zstd(tmp_path):
    lines = [b'{"prompt": "a", "completion": "b"}', b"", b"{not json", b'\xff\xfe{"a": 1}', b"[1, 2]",
             b'{"prompt": "c", "completion": "d"}']
    data = b"\n".join(lines) + b"\n"
    files = {"x.jsonl": data, "x.jsonl.gz": gzip.compress(data),
             "x.jsonl.zst": zstandard.ZstdCompressor().compress(data)}
    for name, blob in files.items():
        (tmp_path / name).write_bytes(blob)
        got = [(n, type(r).__name__ if isinstance(r, RecordError) else "ok", str(r) if isinstance(r, RecordError) else "")
               for n, r, _ in iter_records(str(tmp_path / name))]
        assert [g[:2] for g in got] == [(1, "ok"), (3, "RecordError"), (4, "RecordError"),
                                        (5, "RecordError"), (6, "ok")], name
        assert "invalid JSON" in got[1][2] and "invalid UTF-8" in got[2][2] and "JSON object" in got[3][2]


def test_parquet_rows_with_nested_messages(tmp_path):
    rows = [{"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]}] * 3
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    got = list(iter_records(str(tmp_path / "c.parquet")))
    assert [n for n, _, _ in got] == [1, 2, 3]
    assert parse_record(got[0][1], detect_format(got[0][1])) == [conv((U, "q"), (A, "a"))]
    assert json.dumps(got[0][1])


def test_prompts_format_takes_the_shared_prompt_of_preference_records():
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: No.",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke\n\nAssistant: Sure."}
    [example] = parse_record(hh, "prompts")
    assert [(m.role, m.content) for m in example.prompt_messages] == [
        ("user", "Hi there"), ("assistant", "Hello!"), ("user", "Tell me a joke")]
    pairs = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}]}
    [example] = parse_record(pairs, "prompts")
    assert [(m.role, m.content) for m in example.prompt_messages] == [("user", "hi")]
