"""`kiln demo`: stage selection, the per-stage report and its files (the full lifecycle is what
`bash run.sh demo` runs; each stage's job has its own tests)."""

from __future__ import annotations

import json

from jobs.demo import Demo, StageResult, report
from kiln.cli import main as kiln


def test_report_lists_ledger_stages_and_training_metrics(tmp_path):
    demo = Demo(out=str(tmp_path), max_pages=1, vocab_size=256, workers=1)
    demo.results = [
        StageResult("corpus", 12.0, ledger=[
            {"name": "read", "input": 10, "kept": 9, "filtered": {}, "duplicate": 0, "error": 1},
            {"name": "quality", "input": 9, "kept": 7, "filtered": {"gopher": 2}, "duplicate": 0,
             "error": 0}], metrics={"rows": 7}),
        StageResult("dpo", 30.0, metrics={"reward_accuracy": 0.9375, "steps": 32})]
    text = report(demo)
    assert "corpus" in text and "quality" in text and "rows=7" in text
    assert "reward_accuracy=0.9375" in text and "steps=32" in text


def test_demo_runs_selected_stages_and_writes_its_report(tmp_path):
    out = tmp_path / "demo"
    assert kiln(["demo", "--out", str(out), "--only", "crawl", "--max-pages", "5"]) == 0
    [result] = json.loads((out / "demo-report.json").read_text())
    assert result["name"] == "crawl" and result["metrics"]["pages"] == 5
    assert "crawl" in (out / "demo-report.txt").read_text()
    assert sorted(p.name for p in (out / "crawl").glob("*.warc.gz"))
    assert kiln(["demo", "--bogus"]) == 2
