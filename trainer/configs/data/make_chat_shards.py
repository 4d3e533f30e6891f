"""Remake the post-training sample shards for `tiny-{sft,rm,dpo,orpo,simpo,kto}.yaml`.

Everything goes through the project's own jobs on the HH-RLHF sample in `jobs/sample_data/`:
a small sentencepiece tokenizer (`dataprep.tokenizer`, llmkiln's fixed special ids), `kiln sft`
(plain and packed), `kiln preference` on HH-RLHF pairs, and `kiln preference --format unpaired`
on the same pairs split into desirable/undesirable completions for KTO. Beam runs locally.

    python trainer/configs/data/make_chat_shards.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)

from dataprep.chat.formats import (  # noqa: E402
    HH_TURN,
    PreferencePair,
    RecordError,
    RecordFiltered,
    parse_record,
)
from dataprep.tokenizer import (  # noqa: E402
    SentencePieceTokenizer,
    TrainSpec,
    save_tokenizer_dir,
    train_sentencepiece,
)
from jobs import preference, sft  # noqa: E402

SAMPLES = os.path.join(ROOT, "jobs", "sample_data")
HH = os.path.join(SAMPLES, "hh-rlhf-harmless-base-test.jsonl.gz")
MESSAGES = os.path.join(SAMPLES, "hh-rlhf-chosen-messages.jsonl")
BEAM: list[str] = []  # jobs pin the offline local runner


def hh_rows(limit: int) -> list[dict]:
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        return [json.loads(line) for _, line in zip(range(limit), f, strict=False)]


def make_tokenizer(out: str, vocab_size: int) -> None:
    texts = [t.strip() for r in hh_rows(600) for t in HH_TURN.split(r["chosen"])
             if t.strip() and t not in ("Human", "Assistant")]
    tok = SentencePieceTokenizer(train_sentencepiece(texts, TrainSpec(vocab_size=vocab_size)))
    save_tokenizer_dir(out, tok)


def hh_prompts(rows: list[dict]) -> Iterator[tuple[list[dict], PreferencePair]]:
    """Each usable HH record's prompt (the turns before the compared replies) as chat messages,
    with its parsed pair; records `kiln preference` would dead-letter are left out."""
    for row in rows:
        try:
            [pair] = parse_record(row, "hh")
        except (RecordError, RecordFiltered):
            continue
        yield [{"role": m.role, "content": m.content} for m in pair.prompt_messages], pair


def unpaired_records(rows: list[dict]) -> list[dict]:
    """Each HH pair as two KTO examples: chosen desirable, rejected undesirable."""
    out = []
    for prompt, pair in hh_prompts(rows):
        out.append({"prompt": prompt, "completion": pair.chosen, "label": True})
        out.append({"prompt": prompt, "completion": pair.rejected, "label": False})
    return out


def write_jsonl(path: str, records: list[dict]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.relpath(HERE, ROOT))
    parser.add_argument("--pairs", type=int, default=240, help="HH-RLHF records to read")
    parser.add_argument("--vocab-size", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=128, help="total tokens per row")
    args = parser.parse_args()
    os.chdir(ROOT)  # relative paths in the manifests and dead letters: the same on every clone
    tok_dir = os.path.join(args.out, "tokenizer-hh")
    shutil.rmtree(tok_dir, ignore_errors=True)
    make_tokenizer(tok_dir, args.vocab_size)
    length = ["--set", f"length.max_total_tokens={args.max_tokens}",
              "--set", "length.min_completion_tokens=8"]
    rows = hh_rows(args.pairs)
    tmp = os.path.join(args.out, "hh-inputs")
    os.makedirs(tmp, exist_ok=True)
    try:
        pairs = write_jsonl(os.path.join(tmp, "hh-pairs.jsonl"), rows)
        unpaired = write_jsonl(os.path.join(tmp, "hh-unpaired.jsonl"), unpaired_records(rows))
        jobs = {
            "sample-sft": (sft, [MESSAGES, "--max-seq-len", str(args.max_tokens)]),
            "sample-sft-packed": (sft, [MESSAGES, "--max-seq-len", str(args.max_tokens), "--pack"]),
            "sample-preference": (preference, [pairs, *length]),
            "sample-unpaired": (preference, [unpaired, "--format", "unpaired", *length]),
        }
        for name, (job, job_args) in jobs.items():
            out = os.path.join(args.out, name)
            shutil.rmtree(out, ignore_errors=True)
            job.main(["--tokenizer", tok_dir, "--out", out, "--input", *job_args, *BEAM])
            shutil.copy(os.path.join(SAMPLES, "hh-rlhf-LICENSE"), os.path.join(out, "LICENSE-hh-rlhf"))
            with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
                print(f"{name}: {json.load(f)['rows']} rows")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
