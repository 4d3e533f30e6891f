"""`kiln preference` end to end on the real HH-RLHF file and on small fixtures of the other formats."""

from __future__ import annotations

import json
import os

import pyarrow.compute as pc
import pytest

from dataprep.tokenizer import load_tokenizer
from jobs.preference import main
from kiln.cli import run_main
from schemas.contracts import contract, schema_identity
from schemas.manifest import read_manifest
from schemas.shards import read_arrow_shard
from schemas.validate import validate_path
from tests.dataprep.chat_helpers import HH, train_tokenizer

BEAM: list[str] = []
ASSISTANT, END, EOS = 6, 7, 3


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(d)
    return d


def table(out: str):
    m = read_manifest(out)
    import pyarrow as pa

    tables = [read_arrow_shard(os.path.join(out, s.path)) for s in m.shards]
    return m, pa.concat_tables(tables) if tables else None


def check_contract(out: str, tok_dir: str) -> None:
    """`kiln validate` passes, and the shards say who they are and are sorted by id."""
    report = validate_path(out)
    assert report.ok, [str(i) for i in report.issues]
    m, t = table(out)
    c = contract(m.schema["name"])
    fp = load_tokenizer(tok_dir).fingerprint
    assert m.tokenizer["fingerprint"] == fp and not m.ledger.check()
    for s in m.shards:
        shard = read_arrow_shard(os.path.join(out, s.path))
        assert schema_identity(shard.schema) == (c.name, c.version, fp)
        assert shard.schema.remove_metadata() == c.schema and shard.num_rows == s.rows
        ids = shard.column("id" if "id" in shard.column_names else "ids").to_pylist()
        assert ids == sorted(ids)
    for col in c.token_columns:
        assert pc.max(pc.list_flatten(t.column(col))).as_py() < m.tokenizer["vocab_size"]
    for col in c.non_empty:
        assert pc.min(pc.list_value_length(t.column(col))).as_py() > 0


def dead_letters(out: str) -> list[dict]:
    with open(os.path.join(out, "dead-letter", "dead-letter.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_hh_rlhf_sample_through_kiln_preference(tmp_path, tok_dir):
    out = str(tmp_path / "hh")
    assert main(["--input", HH, "--tokenizer", tok_dir, "--out", out, *BEAM]) == 0
    m, t = table(out)
    stages = {s.name: s for s in m.ledger.stages}
    assert [s.name for s in m.ledger.stages] == ["read", "parse", "hygiene", "length"]
    assert (stages["read"].input, stages["read"].kept) == (2312, 2312)
    assert (stages["parse"].kept, stages["parse"].error, stages["parse"].filtered) == \
        (2303, 4, {"divergent_history": 5})
    assert stages["hygiene"].input == 2303
    last = m.ledger.stages[-1]
    assert m.rows == t.num_rows == last.kept
    assert last.input == last.kept + sum(last.filtered.values()) + last.duplicate + last.error
    for p, c, r in zip(*(t.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")),
                       strict=True):
        assert p[0] == 2 and p[-1] == ASSISTANT and c != r
        assert c[-2:] == [END, EOS] and r[-2:] == [END, EOS]
    assert [(d["offset"], d["reason"]) for d in dead_letters(out)] == \
        [(n, "field 'chosen': empty final assistant turn") for n in (87, 517, 926, 1104)]
    check_contract(out, tok_dir)


def write_jsonl(path, lines: list) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return str(path)


def test_scored_pairs_hygiene_and_bad_lines(tmp_path, tok_dir):
    good = {"prompt": "Name a colour of the clear daytime sky on Earth please",
            "completions": [{"text": "Blue", "score": 9}, {"text": "Green", "score": 2},
                            {"text": "Red", "score": 5}]}
    src = write_jsonl(tmp_path / "scored.jsonl", [
        good,
        "{broken",
        {"prompt": "What is two plus two", "completions": [{"text": "4", "score": 10}, {"text": "5", "score": 1}]},
        good,  # duplicate
        {"prompt": "Q", "completions": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]},  # tie
        {"prompt": "Q", "completions": [{"text": "a", "score": "high"}]},
        {"prompt": "tell me how many legs a spider has in total please", "completions":
            [{"text": "Eight", "score": 3}, {"text": "Six", "score": 0}]},  # contaminated
        {"prompt": "Same", "completions": [{"text": "Yes", "score": 3}, {"text": "yes ", "score": 0}]},
    ])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"question": "how many legs a spider has"}])
    out = str(tmp_path / "out")
    assert main(["--input", src, "--tokenizer", tok_dir, "--out", out, "--decontaminate", evals,
                 "--set", "hygiene.ngram=5", "--set", "pairing.rule=all_pairs", *BEAM]) == 0
    m, t = table(out)
    s = {x.name: x for x in m.ledger.stages}
    assert (s["read"].input, s["read"].error) == (8, 1)
    assert (s["parse"].kept, s["parse"].error, s["parse"].filtered) == (5, 1, {"no_pair_above_margin": 1})
    # all_pairs: the first record yields 3 pairs (and so does its duplicate): a fan-out stage
    assert (s["pair"].input, s["pair"].kept, s["pair"].filtered) == (9, 9, {})
    assert m.extra["fanout"] == {"stage": "pair", "records": 5, "candidates": 9}
    assert s["hygiene"].filtered == {"decontaminated": 1, "identical_pair": 1}
    assert s["hygiene"].duplicate == 3 and s["hygiene"].kept == 4
    assert sorted(t.column("margin").to_pylist()) == [3.0, 4.0, 7.0, 9.0]
    assert [d["offset"] for d in dead_letters(out)] == [2, 6]
    # the fan-out stage names the 5 records its 9 candidates came from: the chain balances
    assert s["pair"].derived_from == 5
    assert validate_path(out).ok, validate_path(out).issues


def test_unpaired_and_prompts_kinds(tmp_path, tok_dir):
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Hi", "completion": "Hello", "label": True},
                                               {"prompt": "Hi", "completion": "Go away", "label": False},
                                               {"prompt": "Hi", "completion": "x", "label": "no"}])
    out = str(tmp_path / "kto")
    assert main(["--input", kto, "--tokenizer", tok_dir, "--out", out, *BEAM]) == 0
    m, t = table(out)
    assert m.schema["name"] == "unpaired" and t.column("label").to_pylist() == [True, False]
    check_contract(out, tok_dir)
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4"},
        {"prompt": "Capital of France?"},
        {"prompt": "x", "chosen": "a", "rejected": "b"},  # another kind: dead letter
    ])
    out = str(tmp_path / "prompts")
    assert main(["--input", prompts, "--tokenizer", tok_dir, "--out", out, "--format", "auto", *BEAM]) == 0
    m, t = table(out)
    assert m.schema["name"] == "prompts" and t.column("reference").to_pylist() == ["4", None]
    assert all(p[-1] == ASSISTANT for p in t.column("prompt_ids").to_pylist())
    assert "this run writes prompts" in dead_letters(out)[0]["reason"]


def test_usage_errors_exit_2(tmp_path, tok_dir):
    assert run_main(main, ["--input", str(tmp_path / "none*.jsonl"), "--tokenizer", tok_dir,
                           "--out", str(tmp_path / "o")]) == 2
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert run_main(main, ["--input", f, "--tokenizer", tok_dir, "--out", str(tmp_path / "o"),
                           "--set", "pairing.rule=best_of_all"]) == 2
