"""`kiln corpus` end to end on the shared (partly broken) WARC files plus a WARC of real Node.js
documentation pages and hand-written prose: ledger, dead letters, contract, determinism, runners."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
import tarfile
import types
from dataclasses import dataclass
from pathlib import Path

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

import dataprep
from dataprep.warc import write_html_warc
from jobs.corpus import CorpusConfig
from kiln.cli import main as kiln
from kiln.config import load_config
from schemas.contracts import arrow_schema, schema_identity
from schemas.manifest import read_manifest
from tests.dataprep.corpus_text import ENGLISH, FRENCH, html

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "jobs" / "sample_data" / "warc"
NODE_TAR = ROOT / "jobs" / "sample_data" / "nodejs-api-html.tar.gz"
NODE_PAGES = ("corepack.html", "index.html", "policy.html", "synopsis.html", "punycode.html")
# a loaded test machine must not turn extraction timeouts into different outputs
STEADY = ["--set", "clean.extract.timeout=120", "--set", "output.num_shards=3"]
PII_LINE = "Questions about this recipe go to baker@bakery.example or the server at 8.8.8.8 today."


def node_pages() -> list[tuple[str, bytes]]:
    with tarfile.open(NODE_TAR) as tar:
        return [(f"https://nodejs.org/api/{name}", tar.extractfile(name).read())
                for name in NODE_PAGES]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    for f in SAMPLES.iterdir():
        shutil.copy(f, folder / f.name)
    pages = node_pages() + [
        ("https://bread.example/loaf", html("Baking bread", ENGLISH)),
        ("https://bread.example/copy-of-loaf", html("Baking bread", ENGLISH)),
        ("https://pain.example/pain", html("Le pain", FRENCH)),
        ("https://casino.example/free-casino-bread", html("Bread", ENGLISH)),
    ]
    write_html_warc(str(folder / "site.warc.gz"), pages,
                    texts=[("https://bread.example/notes", "\n".join([*ENGLISH, PII_LINE]))])
    return folder


def run(inputs: Path, out: Path, *extra: str) -> int:
    return kiln(["corpus", "--input", f"{inputs}/*", "--out", str(out), "--dedup", "none",
                 *STEADY, *extra])


@pytest.fixture(scope="module")
def one_worker(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "docs"
    assert run(inputs, out) == 0
    return out


def documents(out: Path) -> list[dict]:
    rows = []
    for shard in sorted(out.glob("documents-*.parquet")):
        rows += pq.read_table(shard).to_pylist()
    return rows


def dead_letters(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "dead-letter").glob("*.jsonl"))
            for line in f.read_text().splitlines() if line]


def test_ledger_balances_and_names_every_outcome(one_worker):
    manifest = read_manifest(str(one_worker))
    assert manifest.ledger.check() == []
    stages = {s.name: s for s in manifest.ledger.stages}
    assert list(stages) == ["read", "select", "url_filter", "extract", "language", "quality",
                            "pii"]
    assert stages["url_filter"].filtered == {"word:casino": 1}
    assert stages["language"].filtered == {"language:fr": 1}
    assert stages["select"].filtered["record_type:request"] >= 1
    assert any(k.startswith("gopher_") for k in stages["quality"].filtered)
    assert stages["pii"].kept == manifest.rows == len(documents(one_worker))
    assert manifest.extra["pii_redactions"] == {"email": 1, "ip": 1}


def test_every_broken_input_is_read_or_dead_lettered(one_worker):
    manifest = read_manifest(str(one_worker))
    dead = dead_letters(one_worker)
    assert manifest.ledger.stages[0].error == len(dead)
    by_file = {Path(d["source"]).name: d for d in dead}
    assert set(by_file) == {"LICENSE-warcio-test-data"}
    assert "not a WARC or ARC file" in by_file["LICENSE-warcio-test-data"]["reason"]
    assert all(d["stage"] == "read" and d["offset"] is not None for d in dead)
    # the recovered files contribute their records: 5 shared responses reach extraction
    sources = {Path(d["source"]).name for d in documents(one_worker)}
    assert "site.warc.gz" in sources


def test_output_meets_the_documents_contract(one_worker):
    manifest = read_manifest(str(one_worker))
    assert manifest.schema == {"name": "documents", "version": 1}
    for entry in manifest.shards:
        path = one_worker / entry.path
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
        assert path.stat().st_size == entry.bytes
        parquet = pq.ParquetFile(path)
        assert parquet.metadata.num_rows == entry.rows
        assert parquet.metadata.row_group(0).column(0).compression == "ZSTD"
        schema = parquet.schema_arrow
        assert schema_identity(schema)[:2] == ("documents", 1)
        assert schema.equals(arrow_schema("documents"), check_metadata=False)
        ids = parquet.read(columns=["id"]).column("id").to_pylist()
        assert ids == sorted(ids)
    if importlib.util.find_spec("schemas.validate"):
        assert kiln(["validate", str(one_worker)]) == 0


def test_documents_carry_language_filters_and_redactions(one_worker):
    docs = {d["url"]: d for d in documents(one_worker)}
    assert {"https://bread.example/loaf", "https://bread.example/copy-of-loaf",
            "https://bread.example/notes"} <= set(docs)
    loaf = docs["https://bread.example/loaf"]
    assert loaf["language"] == "en" and loaf["language_score"] >= 0.65
    assert loaf["filters"] == ["url_filter", "language", "gopher_repetition", "gopher_quality",
                               "c4_quality", "fineweb_quality"]
    assert loaf["text"].startswith("Bread has been baked") and "Site footer" not in loaf["text"]
    notes = docs["https://bread.example/notes"]["text"]
    assert "<EMAIL_ADDRESS>" in notes and "<IP_ADDRESS>" in notes and "8.8.8.8" not in notes


@pytest.mark.slow
def test_two_workers_write_identical_shards(inputs, one_worker, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))  # worker processes import this checkout
    out = tmp_path / "two"
    assert run(inputs, out, "--direct_running_mode=multi_processing",
               "--direct_num_workers=2") == 0
    one, two = read_manifest(str(one_worker)), read_manifest(str(out))
    assert [(s.path, s.sha256) for s in two.shards] == [(s.path, s.sha256) for s in one.shards]
    assert two.ledger.to_json() == one.ledger.to_json()


@dataclass
class ExactDedupConfig:
    keep: str = "smallest_id"


class ExactDedup(beam.PTransform):
    """A stand-in with the seam's shape (the real one lives in dataprep.dedup): documents with
    the same text -> the smallest id kept, the others as duplicates."""

    def __init__(self, config: ExactDedupConfig) -> None:
        super().__init__()

    def expand(self, docs):
        def split(item):
            _, group = item
            group = sorted(group, key=lambda d: d["id"])
            yield group[0]
            for dup in group[1:]:
                yield beam.pvalue.TaggedOutput("duplicates", {
                    "id": dup["id"], "duplicate_of": group[0]["id"], "stage": "exact_dedup",
                    "similarity": 1.0})

        return (docs | beam.Map(lambda d: (hashlib.sha1(d["text"].encode()).hexdigest(), d))
                | beam.GroupByKey() | beam.FlatMap(split).with_outputs("duplicates", main="kept"))


@pytest.mark.slow
def test_portable_runner_loopback_with_a_dedup_stage(inputs, one_worker, tmp_path, monkeypatch):
    """The portable (Spark/Flink) path, plus the --dedup seam: stage in the ledger, duplicates/."""
    seam = types.ModuleType("dataprep.dedup")
    seam.ExactDedup, seam.ExactDedupConfig = ExactDedup, ExactDedupConfig
    monkeypatch.setitem(sys.modules, "dataprep.dedup", seam)
    monkeypatch.setattr(dataprep, "dedup", seam, raising=False)
    out = tmp_path / "portable"
    assert kiln(["corpus", "--input", f"{inputs}/*", "--out", str(out), "--dedup", "exact",
                 *STEADY, "--runner=PortableRunner", "--job_endpoint=embed",
                 "--environment_type=LOOPBACK"]) == 0
    manifest = read_manifest(str(out))
    assert manifest.ledger.check() == []
    dedup = manifest.ledger.stages[-1]
    assert (dedup.name, dedup.input, dedup.duplicate) == ("exact_dedup", dedup.kept + 1, 1)
    duplicates = [json.loads(line) for f in (out / "duplicates").glob("*.jsonl")
                  for line in f.read_text().splitlines() if line]
    assert len(duplicates) == 1 and duplicates[0]["stage"] == "exact_dedup"
    before = {d["id"]: d for d in documents(one_worker)}
    after = {d["id"]: d for d in documents(out)}
    assert set(before) - set(after) == {duplicates[0]["id"]}
    assert before[duplicates[0]["id"]]["text"] == after[duplicates[0]["duplicate_of"]]["text"]
    assert all(after[i] == before[i] for i in after)


def test_unusable_arguments_exit_2(inputs, tmp_path, capsys):
    out = tmp_path / "x"
    assert kiln(["corpus", "--input", str(tmp_path / "none*.warc"), "--out", str(out),
                 "--dedup", "none"]) == 2
    assert kiln(["corpus", "--input", f"{inputs}/*", "--out", str(out), "--dedup", "none",
                 "--set", "clean.language.min_scor=1"]) == 2
    assert kiln(["corpus", "--input", f"{inputs}/*", "--out", str(out), "--dedup", "bloom"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    assert kiln(["corpus", "--input", f"{inputs}/*", "--out", str(tmp_path / "full"),
                 "--dedup", "none"]) == 2
    err = capsys.readouterr().err
    assert "matches no file" in err and "clean.language.min_scor" in err and "bloom" in err
    assert "not empty" in err


@pytest.mark.skipif(importlib.util.find_spec("dataprep.dedup") is not None,
                    reason="dataprep.dedup is present: dedup runs instead")
def test_dedup_without_the_dedup_module_is_a_clear_usage_error(inputs, tmp_path, capsys):
    assert kiln(["corpus", "--input", f"{inputs}/*", "--out", str(tmp_path / "o")]) == 2
    assert "--dedup none" in capsys.readouterr().err


def test_shipped_config_is_the_defaults():
    assert load_config(CorpusConfig, ROOT / "jobs" / "configs" / "corpus.yaml") == CorpusConfig()
