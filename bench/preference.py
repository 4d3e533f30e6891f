"""Preference-data preparation throughput: llmkiln (read HH-RLHF JSONL, split transcripts, render
with the chat template) against TRL's own DPO preparation (`DPOTrainer._prepare_dataset`: prompt
extraction + `apply_chat_template` tokenisation through `datasets.map`) with the same tokenizer
and template, on the same file. Both run single-process; rows/s counts output pairs.

    python bench/preference.py [--input FILE] [--tokenizer TOK_DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import types
import warnings

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # repo root in place of bench/, whose tokenize.py would shadow the stdlib module

from dataprep.chat.formats import HH_TURN, RecordError, RecordFiltered, iter_records, parse_record  # noqa: E402
from dataprep.chat.lengths import LengthPolicy  # noqa: E402
from dataprep.chat.rows import render_preference  # noqa: E402
from dataprep.chat.template import ChatTemplate  # noqa: E402
from dataprep.tokenizer import (  # noqa: E402
    SentencePieceTokenizer,
    TrainSpec,
    load_tokenizer,
    save_tokenizer_dir,
    train_sentencepiece,
)

HH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jobs", "sample_data",
                  "hh-rlhf-harmless-base-test.jsonl.gz")


def ours(path: str, tok) -> tuple[int, float, list]:
    start = time.perf_counter()
    template, policy = ChatTemplate(tok), LengthPolicy(max_total_tokens=None)
    out, pairs = [], []
    for _, rec, _ in iter_records(path):
        if not isinstance(rec, dict):
            continue
        try:
            [pair] = parse_record(rec, "hh")
        except (RecordError, RecordFiltered):
            continue
        out.append(render_preference(template, pair, policy)[:3])
        pairs.append(pair)
    return len(out), time.perf_counter() - start, pairs


def trl(pairs: list, tok) -> tuple[int, float]:
    import datasets
    from trl import DPOConfig, DPOTrainer

    from dataprep.chat.hf_export import hf_tokenizer

    datasets.disable_progress_bars()
    hf = hf_tokenizer(tok)
    # TRL's implicit-prompt conversational form: it extracts the shared prompt itself
    rows = []
    for p in pairs:
        prompt = [{"role": m.role, "content": m.content} for m in p.prompt_messages]
        rows.append({"chosen": prompt + [{"role": "assistant", "content": p.chosen}],
                     "rejected": prompt + [{"role": "assistant", "content": p.rejected}]})
    args = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, max_length=None, report_to=[])
    ds = datasets.Dataset.from_list(rows)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=hf), ds, hf, args, "bench")
    return len(out), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--input", default=HH)
    parser.add_argument("--tokenizer", help="tokenizer directory (default: train a 2k BPE on the file)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N runs for each side")
    args = parser.parse_args()
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    else:
        texts = [t.strip() for _, rec, _ in iter_records(args.input) if isinstance(rec, dict)
                 for t in HH_TURN.split(rec["chosen"]) if t.strip() not in ("", "Human", "Assistant")]
        tok = SentencePieceTokenizer(train_sentencepiece(texts, TrainSpec(vocab_size=2000)))
        save_tokenizer_dir(tempfile.mkdtemp(), tok)
    best_ours = best_trl = float("inf")
    for _ in range(args.repeat):
        n_ours, t, pairs = ours(args.input, tok)
        best_ours = min(best_ours, t)
        n_trl, t = trl(pairs, tok)
        best_trl = min(best_trl, t)
    ours_rps, trl_rps = n_ours / best_ours, n_trl / best_trl
    print(f"llmkiln: {n_ours} pairs in {best_ours:.2f} s = {ours_rps:,.0f} rows/s "
          f"(JSON read + HH split + template render)")
    print(f"TRL 1.16 DPOTrainer._prepare_dataset: {n_trl} pairs in {best_trl:.2f} s = "
          f"{trl_rps:,.0f} rows/s (prompt extraction + apply_chat_template x3)")
    print(f"ratio {ours_rps / trl_rps:.1f}x")
    print(json.dumps({"ours_rows_per_s": round(ours_rps, 1), "trl_rows_per_s": round(trl_rps, 1),
                      "ratio": round(ours_rps / trl_rps, 2), "goal": 2.0}))


if __name__ == "__main__":
    main()
