"""Documents/s per core of `kiln corpus`'s cleaning (extract + language + quality filters) against
datatrove's LocalPipelineExecutor running the same blocks with the same settings on the same WARC
files, at equal cores; checks that both keep the same documents with the same text.

    python bench/corpus_clean.py [--workers 1] [--timeout 1.0] [--pages 100] [--repeat 1]

Input: the WARC that `kiln crawl` writes when it crawls the embedded Node.js API documentation
served on loopback (`jobs.serve_site`), plus the readable warcio samples (datatrove's WarcReader
aborts a task on the broken ones, so they are left out here).
Ours runs the whole job (read, select, extract, language, quality; URL filter and PII switched off
because datatrove's side does not do them) with dedup off; the time includes Beam's start-up.
Last line: one JSON object with the figures, `ratio` (ours over datatrove) and `goal`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # repo root in place of bench/, whose tokenize.py would shadow the stdlib module

from datatrove.data import Document  # noqa: E402
from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.extractors import Trafilatura  # noqa: E402
from datatrove.pipeline.filters import LambdaFilter  # noqa: E402
from datatrove.pipeline.readers import WarcReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402

from dataprep.langid import LanguageClassifier, LanguageConfig  # noqa: E402
from dataprep.quality import QualityConfig, build_filters  # noqa: E402
from dataprep.warc import record_uid  # noqa: E402
from jobs.corpus import CorpusConfig  # noqa: E402
from kiln.cli import main as kiln  # noqa: E402
from schemas.manifest import read_manifest  # noqa: E402
from schemas.shards import iter_parquet_rows  # noqa: E402

READABLE_SAMPLES = ("example.warc.gz", "example-iana.org-chunked.warc", "example-resource.warc.gz",
                    "example-wget-bad-target-uri.warc.gz", "example-trunc.warc")


class LanguageStep:
    """py3langid with the job's allowed languages and minimum score, as a datatrove filter."""

    def __init__(self, config: LanguageConfig) -> None:
        self.config = config
        self.classifier: LanguageClassifier | None = None

    def __call__(self, doc: Document) -> bool:
        if self.classifier is None:
            self.classifier = LanguageClassifier.from_config(self.config)
        language, score = self.classifier.classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = language, score
        return self.classifier.reason(language, score) is None


def build_inputs(folder: Path, pages: int) -> None:
    """Crawl the Node.js docs on loopback into `folder`, then add the readable samples."""
    from jobs.serve_site import serve_sample_site

    base_url, stop = serve_sample_site()
    try:
        seeds = folder.parent / "seeds.txt"
        seeds.write_text(f"{base_url}/index.html\n")
        code = kiln(["crawl", "--seeds", str(seeds), "--out", str(folder / "crawl"),
                     "--allow-private", "--max-pages", str(pages), "--max-depth", "3",
                     "--delay", "0", "--no-progress"])
    finally:
        stop()
    if code:
        raise SystemExit(f"kiln crawl failed with exit code {code}")
    for warc in (folder / "crawl").glob("*.warc.gz"):
        shutil.move(warc, folder / warc.name)
    shutil.rmtree(folder / "crawl")
    for name in READABLE_SAMPLES:
        shutil.copy(ROOT / "jobs" / "sample_data" / "warc" / name, folder / name)


def run_ours(inputs: Path, out: Path, workers: int, timeout: float) -> tuple[float, dict, int]:
    beam = (["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
            if workers > 1 else [])
    start = time.perf_counter()
    code = kiln(["corpus", "--input", f"{inputs}/*", "--out", str(out), "--dedup", "none",
                 "--set", "clean.url_filter.enabled=false", "--set", "clean.pii.enabled=false",
                 "--set", f"clean.extract.timeout={timeout}", *beam])
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"kiln corpus failed with exit code {code}")
    manifest = read_manifest(str(out))
    kept = {row["id"]: row["text"] for shard in manifest.shards
            for row in iter_parquet_rows(str(out / shard.path), ["id", "text"])}
    html_docs = next(s.kept for s in manifest.ledger.stages if s.name == "select")
    return seconds, kept, html_docs


def run_datatrove(inputs: Path, out: Path, workers: int, timeout: float) -> tuple[float, dict]:
    config = CorpusConfig()
    pipeline = [
        WarcReader(str(inputs)),
        Trafilatura(favour_precision=config.clean.extract.favour_precision, timeout=timeout,
                    deduplicate=config.clean.extract.deduplicate),
        LambdaFilter(LanguageStep(config.clean.language)),
        *(step for _, step in build_filters(QualityConfig())),
        JsonlWriter(str(out / "docs")),
    ]
    executor = LocalPipelineExecutor(pipeline, tasks=workers, workers=workers,
                                     logging_dir=str(out / "logs"))
    start = time.perf_counter()
    executor.run()
    seconds = time.perf_counter() - start
    kept = {}
    for path in sorted((out / "docs").glob("*.jsonl.gz")):
        with gzip.open(path, "rt") as f:
            for line in f:
                row = json.loads(line)
                kept[record_uid(row["id"], None, None)] = row["text"]
    return seconds, kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1, help="Beam workers = datatrove tasks")
    parser.add_argument("--timeout", type=float, default=1.0, help="extraction timeout (s)")
    parser.add_argument("--pages", type=int, default=100, help="most pages to crawl")
    parser.add_argument("--repeat", type=int, default=1, help="runs per side; best time counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="corpus-bench-") as tmp:
        tmp_path = Path(tmp)
        inputs = tmp_path / "warc"
        inputs.mkdir()
        build_inputs(inputs, args.pages)
        ours_times, theirs_times = [], []
        for i in range(args.repeat):
            # alternate who goes first: on a shared machine the load drifts
            order = ("datatrove", "ours") if i % 2 == 0 else ("ours", "datatrove")
            for side in order:
                if side == "ours":
                    seconds, ours, docs = run_ours(inputs, tmp_path / f"ours-{i}", args.workers,
                                                   args.timeout)
                    ours_times.append(seconds)
                else:
                    seconds, theirs = run_datatrove(inputs, tmp_path / f"datatrove-{i}",
                                                    args.workers, args.timeout)
                    theirs_times.append(seconds)
        ours_s, theirs_s = min(ours_times), min(theirs_times)
    same = ours == theirs
    ours_rate = docs / ours_s / args.workers
    theirs_rate = docs / theirs_s / args.workers
    print(f"HTML documents: {docs}; cores: {args.workers}; extraction timeout {args.timeout}s; "
          f"best of {args.repeat}")
    print(f"ours (Beam FnApiRunner):          {ours_s:7.2f} s  {ours_rate:6.2f} docs/s/core  "
          f"kept {len(ours)}")
    print(f"datatrove (LocalPipelineExecutor): {theirs_s:7.2f} s  {theirs_rate:6.2f} docs/s/core  "
          f"kept {len(theirs)}")
    print(f"same kept documents and texts: {same}"
          + ("" if same else f" (only ours: {len(set(ours) - set(theirs))}, only datatrove: "
                             f"{len(set(theirs) - set(ours))}, text differs: "
                             f"{sum(ours[k] != theirs[k] for k in set(ours) & set(theirs))})"))
    print(json.dumps({"ours_docs_per_s_per_core": round(ours_rate, 3),
                      "datatrove_docs_per_s_per_core": round(theirs_rate, 3),
                      "ratio": round(ours_rate / theirs_rate, 3), "goal": 1.0,
                      "same_kept": same, "documents": docs, "workers": args.workers}))


if __name__ == "__main__":
    main()
