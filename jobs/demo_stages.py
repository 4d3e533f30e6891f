"""The demo's stages, in order: each runs the command a user would and returns what it produced."""

from __future__ import annotations

import gzip
import json
import os

from jobs.demo import REPO, SAMPLE_DATA, Demo, StageResult
from kiln.log import get_logger

log = get_logger(__name__)


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
    """HH-RLHF chosen conversations -> SFT shards (assistant-only loss masks)."""
    demo.kiln("sft", ["--input", os.path.join(SAMPLE_DATA, "hh-rlhf-chosen-messages.jsonl"),
                      "--tokenizer", demo.path("tokenizer"), "--out", demo.path("sft-shards"),
                      "--max-seq-len", "256", *demo.beam_args()])
    return _dataset_result("sft data", demo.path("sft-shards"))


def _from_hh(demo: Demo, name: str, fmt: str, length: str) -> StageResult:
    """`kiln preference --format <fmt>` over the embedded HH-RLHF sample into `<name>`."""
    demo.kiln("preference", ["--input", os.path.join(SAMPLE_DATA,
                                                     "hh-rlhf-harmless-base-test.jsonl.gz"),
                             "--tokenizer", demo.path("tokenizer"), "--out", demo.path(name),
                             "--format", fmt, "--set", length, *demo.beam_args()])
    return _dataset_result(name.removesuffix("-shards").replace("-", " ") + " data",
                           demo.path(name))


def preference_data(demo: Demo) -> StageResult:
    """HH-RLHF chosen/rejected transcripts -> preference shards (prompt/chosen/rejected ids)."""
    return _from_hh(demo, "preference-shards", "hh", "length.max_total_tokens=256")


def prompts_data(demo: Demo) -> StageResult:
    """HH-RLHF prompts (up to the assistant header) -> the `prompts` shards GRPO samples from."""
    return _from_hh(demo, "prompt-shards", "prompts", "length.max_prompt_tokens=96")


def validate(demo: Demo) -> StageResult:
    """`kiln validate` on every dataset before any training step is spent on it."""
    datasets = [demo.path(n) for n in ("corpus", "pretrain-shards", "sft-shards",
                                       "preference-shards", "prompt-shards")]
    demo.kiln("validate", datasets)
    return StageResult("validate", 0.0, metrics={"datasets": len(datasets)})


# One model shape for every training stage: each starts from the previous stage's checkpoint.
MODEL = ["model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=352",
         "model.num_attention_heads=4", "model.num_query_groups=2"]


def _train(demo: Demo, name: str, config: str, overrides: list[str],
           keys: tuple[str, ...]) -> StageResult:
    """`trainer/main.py --config trainer/configs/<config> --set ...` in a child process; the
    result carries the first and last logged loss and the stage's own metrics."""
    from trainer.launch import command, run

    run_dir = demo.path(f"run-{name}")
    args = [f"run_dir={run_dir}", *MODEL, *overrides]
    config_path = os.path.join(REPO, "trainer", "configs", config)
    log.info("$ %s", " ".join(command(config_path, args)))
    run(config_path, args)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if "loss" in r]
    metrics: dict[str, object] = {"steps": train[-1]["step"], "loss_first": train[0]["loss"],
                                  "loss_last": train[-1]["loss"]}
    for key in keys:
        values = [r[key] for r in records if key in r]
        if values:
            metrics[key] = values[-1]
    return StageResult(name, 0.0, metrics=metrics, outputs=[run_dir])


def _checkpoint(demo: Demo, name: str) -> str:
    return os.path.join(demo.path(f"run-{name}"), "checkpoints")


def pretrain(demo: Demo) -> StageResult:
    """A tiny Llama-style model on the crawled, cleaned, tokenized Node.js docs."""
    result = _train(demo, "pretrain", "tiny-pretrain.yaml", [
        f"data.manifests=[{demo.path('pretrain-shards')}]", "data.split=98,2,0",
        "train.steps=200", "train.seq_length=256", "train.micro_batch_size=8",
        "train.global_batch_size=16", "train.eval_every=100", "train.log_every=10",
        "optimizer.lr=3e-3", "optimizer.min_lr=3e-4", "schedule.warmup_steps=20"],
        ("val_loss",))
    result.metrics["unigram_entropy"] = unigram_entropy(demo.path("pretrain-shards"))
    return result


def sft(demo: Demo) -> StageResult:
    """Supervised fine-tuning on HH-RLHF conversations (assistant tokens only), from pretrain."""
    return _train(demo, "sft", "tiny-sft.yaml", [
        f"data.manifests=[{demo.path('sft-shards')}]", f"sft.tokenizer={demo.path('tokenizer')}",
        f"init.checkpoint={_checkpoint(demo, 'pretrain')}", "checkpoint.save=true",
        "train.steps=80", "train.seq_length=256", "train.eval_every=40", "train.log_every=5",
        "optimizer.lr=1e-3"], ("val_loss",))


def _on_pairs(demo: Demo, stage: str, steps: int, lr: float) -> StageResult:
    """A preference stage from the SFT checkpoint on the first 32 HH-RLHF pairs, the next 16 held
    out (`data.split` is weights over the rows in order, so the rest goes to the unused test part):
    the issue's learning check is reward accuracy on the training pairs within this budget."""
    with open(os.path.join(demo.path("preference-shards"), "manifest.json"),
              encoding="utf-8") as f:
        rows = json.load(f)["rows"]
    return _train(demo, stage, f"tiny-{stage}.yaml", [
        f"data.manifests=[{demo.path('preference-shards')}]",
        f"{stage}.tokenizer={demo.path('tokenizer')}",
        f"init.checkpoint={_checkpoint(demo, 'sft')}", "checkpoint.save=true",
        f"data.split=32,16,{rows - 48}", f"train.steps={steps}", "train.seq_length=256",
        f"train.eval_every={steps // 2}", "train.log_every=4", f"optimizer.lr={lr}",
        f"optimizer.min_lr={lr}", "schedule.style=constant", "schedule.warmup_steps=0"],
        ("reward_accuracy", "reward_margin", "val_reward_accuracy"))


def reward_model(demo: Demo) -> StageResult:
    """Bradley-Terry reward model (scalar head on the SFT backbone)."""
    return _on_pairs(demo, "rm", 24, 1e-3)


def dpo(demo: Demo) -> StageResult:
    """DPO (sigmoid loss, reference log-probs precomputed in one pass)."""
    return _on_pairs(demo, "dpo", 24, 1e-3)


def grpo(demo: Demo) -> StageResult:
    """GRPO from the DPO policy, rewarded by the demo's reward model, KL to the DPO reference."""
    return _train(demo, "grpo", "tiny-grpo.yaml", [
        f"data.manifests=[{demo.path('prompt-shards')}]",
        f"grpo.tokenizer={demo.path('tokenizer')}", f"init.checkpoint={_checkpoint(demo, 'dpo')}",
        f"grpo.reward_model={_checkpoint(demo, 'rm')}", "grpo.reward_function=null",
        "grpo.stop_token_ids=[3]", "grpo.max_new_tokens=24", "train.seq_length=128",
        "train.steps=12", "optimizer.lr=1e-4", "optimizer.min_lr=1e-4", "checkpoint.save=true"],
        ("reward_mean", "kl"))


def export_hf(demo: Demo) -> StageResult:
    """The final policy as a Hugging Face directory (transformers / vLLM), with the demo's own
    tokenizer converted to a tokenizer.json that gives the same ids and llmkiln's chat template."""
    out = demo.path("hf-model")
    demo.kiln("export-hf", [_checkpoint(demo, "grpo"), "--out", out, "--overwrite"])
    files = sorted(os.listdir(out))
    weights = sum(os.path.getsize(os.path.join(out, f)) for f in files if f.endswith(".safetensors"))
    return StageResult("export-hf", 0.0, metrics={"files": len(files),
                                                  "weights_mb": round(weights / 1e6, 2)},
                       outputs=[out])


def unigram_entropy(shard_dir: str) -> float:
    """Entropy (nats) of the token unigram distribution: the loss of the best context-free model."""
    import numpy as np

    from schemas.indexed import IndexedReader
    from schemas.manifest import read_manifest

    counts = np.zeros(0, dtype=np.int64)
    for shard in read_manifest(shard_dir).shards:
        reader = IndexedReader(os.path.join(shard_dir, shard.path).removesuffix(".bin"))
        c = np.bincount(np.concatenate([reader[i] for i in range(len(reader))]).astype(np.int64))
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[:len(c)] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


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
    ("prompt-data", prompts_data),
    ("validate", validate),
    ("pretrain", pretrain),
    ("sft", sft),
    ("rm", reward_model),
    ("dpo", dpo),
    ("grpo", grpo),
    ("export-hf", export_hf),
]
