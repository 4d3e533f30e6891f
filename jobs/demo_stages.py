"""The demo's stages, in order: each runs the command a user would and returns what it produced."""

from __future__ import annotations

import gzip
import json
import os

from jobs.demo import SAMPLE_DATA, Demo, StageResult


def crawl(demo: Demo) -> StageResult:
    """Serve the Node.js API docs on loopback and crawl them politely into WARC."""
    from jobs.serve_site import serve_sample_site

    base_url, stop = serve_sample_site()
    try:
        seeds = os.path.join(demo.out, "seeds.txt")
        with open(seeds, "w", encoding="utf-8") as f:
            f.write(f"{base_url}/index.html\n")
        demo.kiln("crawl", ["--seeds", seeds, "--out", demo.path("crawl"), "--allow-private",
                            "--max-pages", str(demo.max_pages), "--max-depth", "3",
                            "--delay", "0", "--no-progress"])
    finally:
        stop()
    with open(os.path.join(demo.path("crawl"), "crawl-report.json"), encoding="utf-8") as f:
        crawl_report = json.load(f)
    fetched = crawl_report.get("fetched", 0)
    return StageResult("crawl", 0.0, metrics={"pages": fetched,
                                             "errors": sum(crawl_report.get("errors", {}).values())},
                       outputs=[demo.path("crawl")])


def corpus(demo: Demo) -> StageResult:
    """Clean the crawl plus the real sample WARC files (some deliberately broken); dedup."""
    inputs = [os.path.join(demo.path("crawl"), "*.warc.gz"),
              os.path.join(SAMPLE_DATA, "warc", "*")]
    config = os.path.join(os.path.dirname(SAMPLE_DATA), "configs", "demo-corpus.yaml")
    demo.kiln("corpus", ["--input", *inputs, "--out", demo.path("corpus"), "--overwrite",
                         "--config", config, *demo.beam_args()])
    return _dataset_result("corpus", demo.path("corpus"))


def tokenizer(demo: Demo) -> StageResult:
    """Train a sentencepiece BPE tokenizer on the cleaned web text and the chat transcripts."""
    chat_text = os.path.join(demo.out, "chat-text.jsonl")
    with gzip.open(os.path.join(SAMPLE_DATA, "hh-rlhf-harmless-base-test.jsonl.gz"), "rt",
                   encoding="utf-8") as src, open(chat_text, "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            dst.write(json.dumps({"id": f"hh-{i}", "text": json.loads(line)["chosen"]}) + "\n")
    demo.kiln("tokenizer", ["--input", f"web={demo.path('corpus')}", f"chat={chat_text}",
                            "--vocab-size", str(demo.vocab_size), "--out", demo.path("tokenizer")])
    with open(os.path.join(demo.path("tokenizer"), "fingerprint.txt"), encoding="utf-8") as f:
        fingerprint = f.read().strip()
    return StageResult("tokenizer", 0.0, metrics={"vocab": demo.vocab_size,
                                                  "fingerprint": fingerprint[:12]})


def tokenize(demo: Demo) -> StageResult:
    """Cleaned documents -> Megatron .bin/.idx shards for pretraining."""
    demo.kiln("tokenize", ["--input", f"web={demo.path('corpus')}", "--tokenizer",
                           demo.path("tokenizer"), "--out", demo.path("pretrain-shards"),
                           "--overwrite", *demo.beam_args()])
    return _dataset_result("tokenize", demo.path("pretrain-shards"))


def sft_data(demo: Demo) -> StageResult:
    """HH-RLHF chosen conversations -> packed SFT shards."""
    demo.kiln("sft", ["--input", os.path.join(SAMPLE_DATA, "hh-rlhf-chosen-messages.jsonl"),
                      "--tokenizer", demo.path("tokenizer"), "--out", demo.path("sft-shards"),
                      "--max-seq-len", "256", *demo.beam_args()])
    return _dataset_result("sft data", demo.path("sft-shards"))


def preference_data(demo: Demo) -> StageResult:
    """HH-RLHF chosen/rejected transcripts -> preference shards (prompt/chosen/rejected ids)."""
    demo.kiln("preference", ["--input", os.path.join(SAMPLE_DATA,
                                                     "hh-rlhf-harmless-base-test.jsonl.gz"),
                             "--tokenizer", demo.path("tokenizer"),
                             "--out", demo.path("preference-shards"), "--format", "hh",
                             "--set", "length.max_total_tokens=256", *demo.beam_args()])
    return _dataset_result("preference data", demo.path("preference-shards"))


def validate(demo: Demo) -> StageResult:
    """`kiln validate` on every dataset before any training step is spent on it."""
    datasets = [demo.path(n) for n in ("corpus", "pretrain-shards", "sft-shards",
                                       "preference-shards")]
    demo.kiln("validate", datasets)
    return StageResult("validate", 0.0, metrics={"datasets": len(datasets)})


def _dataset_result(name: str, directory: str) -> StageResult:
    with open(os.path.join(directory, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    metrics = {"rows": manifest.get("rows", 0)}
    if manifest.get("tokens"):
        metrics["tokens"] = manifest["tokens"]
    return StageResult(name, 0.0, ledger=manifest["ledger"]["stages"], metrics=metrics,
                       outputs=[directory])


STAGES = [
    ("crawl", crawl),
    ("corpus", corpus),
    ("tokenizer", tokenizer),
    ("tokenize", tokenize),
    ("sft-data", sft_data),
    ("preference-data", preference_data),
    ("validate", validate),
]
