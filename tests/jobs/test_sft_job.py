"""`kiln sft` end to end: formats mixed in one run, bad lines, dedup, packing that unpacks to the
plain rows exactly, and the same bytes on one and two workers."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from dataprep.chat.packing import packed_attention_mask, unpack
from jobs.sft import main
from schemas.manifest import read_manifest
from tests.dataprep.chat_helpers import SFT_SAMPLE, train_tokenizer
from tests.jobs.test_preference_job import BEAM, check_contract, dead_letters, table, write_jsonl


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tok"))
    train_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft-in")
    mixed = write_jsonl(d / "mixed.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]},
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"prompt": "Capital of France?", "completion": "Paris"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello  there"}]},
        {"messages": [{"role": "user", "content": "q"}]},  # ends with the user: not SFT
        '{"messages": [}',
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there"}]},
        {"messages": [{"role": "user", "content": "x" * 5}, {"role": "robot", "content": "y"}]},
    ])
    return [SFT_SAMPLE, mixed]


def test_mixed_formats_bad_lines_and_duplicates(tmp_path, tok_dir, inputs):
    out = str(tmp_path / "plain")
    assert main(["--input", *inputs, "--tokenizer", tok_dir, "--out", out, "--max-seq-len", "256", *BEAM]) == 0
    m, t = table(out)
    s = {x.name: x for x in m.ledger.stages}
    assert s["read"].input == 208 and s["read"].error == 1
    assert s["parse"].error == 2 and s["parse"].kept == 205
    # "hi"/"Hello  there" is the ShareGPT conversation after normalisation; the repeat too
    assert s["hygiene"].duplicate == 2
    assert s["length"].kept + sum(s["length"].filtered.values()) == s["hygiene"].kept
    assert m.rows == s["length"].kept and m.extra["counts"].get("length.prompt_truncated", 0) > 0
    assert {d["offset"] for d in dead_letters(out) if d["source"].endswith("mixed.jsonl")} == {5, 6, 8}
    cut = 0
    for ids, mask in zip(t.column("input_ids").to_pylist(), t.column("loss_mask").to_pylist(), strict=True):
        assert len(ids) <= 256 and ids[0] == 2 and ids[1] in (4, 5) and mask[-1] == 1
        cut += ids[-1] != 3  # a reply cut on the right loses its end-of-turn and eos
    assert cut == m.extra["counts"]["length.completion_truncated"] > 0
    check_contract(out, tok_dir)


@pytest.mark.slow  # two DirectRunner worker processes
def test_packing_unpacks_exactly_and_is_the_same_on_one_and_two_workers(tmp_path, tok_dir, inputs):
    plain = str(tmp_path / "plain")
    assert main(["--input", *inputs, "--tokenizer", tok_dir, "--out", plain, "--max-seq-len", "512", *BEAM]) == 0
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--input", *inputs, "--tokenizer", tok_dir, "--max-seq-len", "512", "--pack",
            "--set", "num_shards=2", "--set", "pack_groups=2"]
    assert main([*args, "--out", one, *BEAM]) == 0
    assert main([*args, "--out", two, *BEAM, "--direct_running_mode=multi_processing",
                 "--direct_num_workers=2"]) == 0
    m1, m2 = read_manifest(one), read_manifest(two)
    assert [(s.path, s.sha256) for s in m1.shards] == [(s.path, s.sha256) for s in m2.shards]
    assert m1.schema["name"] == "sft_packed" and len(m1.shards) == 2
    pack = m1.extra["packing"]
    assert pack["efficiency"] == pack["tokens"] / (pack["rows"] * 512) and pack["efficiency"] > 0.8
    _, packed = table(one)
    _, rows = table(plain)
    want = {r["id"]: (r["input_ids"], r["loss_mask"]) for r in rows.to_pylist()}
    got = {}
    for row in packed.to_pylist():
        att = packed_attention_mask(row["seq_boundaries"], 512)
        b = row["seq_boundaries"]
        for k in range(len(b) - 1):  # nothing in conversation k sees outside it
            assert not att[b[k]:b[k + 1], :b[k]].any() and not att[b[k]:b[k + 1], b[k + 1]:].any()
            assert row["loss_mask"][b[k]] == 0
        got.update({i: (ids, mask) for ids, mask, i in unpack(row)})
    assert got == want
    stages = [s.name for s in m1.ledger.stages]
    assert stages[-1] == "pack" and m1.ledger.stages[-1].kept == len(want) and not m1.ledger.check()
    check_contract(one, tok_dir)
    shutil.rmtree(plain)


def test_config_file_and_format_override(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Hi", "completion": "Yo"},
                                             {"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]}])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("template:\n  add_bos: false\nhygiene:\n  dedup: false\n")
    out = str(tmp_path / "o")
    assert main(["--input", src, "--tokenizer", tok_dir, "--out", out, "--config", str(cfg),
                 "--format", "prompt-completion", *BEAM]) == 0
    m, t = table(out)
    assert t.column("input_ids").to_pylist()[0][0] == 5  # no bos
    assert m.ledger.stages[1].error == 1 and "missing field 'prompt'" in dead_letters(out)[0]["reason"]
    assert json.loads(json.dumps(m.extra["config"]))["template"]["add_bos"] is False
    assert not os.path.exists(os.path.join(out, "_work"))


def test_length_drops_are_counted_per_reason(tmp_path, tok_dir):
    from dataprep.chat.formats import iter_records, parse_record
    from dataprep.chat.template import ChatTemplate
    from dataprep.tokenizer import load_tokenizer

    tpl = ChatTemplate(load_tokenizer(tok_dir))
    lengths = [len(tpl.render(parse_record(rec, "messages")[0].messages).input_ids)
               for _, rec, _ in iter_records(SFT_SAMPLE)]
    out = str(tmp_path / "drop")
    assert main(["--input", SFT_SAMPLE, "--tokenizer", tok_dir, "--out", out, "--max-seq-len", "128",
                 "--set", "length.overflow=drop", "--set", "hygiene.dedup=false", *BEAM]) == 0
    m, t = table(out)
    length = m.ledger.stages[-1]
    assert length.name == "length" and length.input == len(lengths) == 200
    assert length.filtered == {"too_long": sum(n > 128 for n in lengths)}
    assert sorted(map(len, t.column("input_ids").to_pylist())) == sorted(n for n in lengths if n <= 128)
