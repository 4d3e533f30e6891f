"""DPO training throughput (pairs/s) on CPU: our megatron-core trainer vs TRL's `DPOTrainer`.

Same tiny Llama (the `tiny-dpo.yaml` model: RMSNorm, SwiGLU, RoPE, GQA, untied embeddings), the
same HH-RLHF pairs (the committed `sample-preference` shards: TRL gets their exact token ids
through its own `DataCollatorForPreference`), batch 8 pairs, sequences padded to the longest in
the batch (≤ 128 tokens), fp32 (TRL's bf16 autocast default turned off), β = 0.1, sigmoid loss,
the same torch thread count (default 1: on a loaded machine two OpenMP threads per process spend
their time waiting for each other, which hurt TRL's process far more than ours). Ours: one fused
forward of chosen + rejected per step and reference log-probs precomputed once before the first
step (its time is reported separately, not hidden); TRL 1.16: its defaults (a reference model
forward every step, also concatenated chosen + rejected). Steady state: the first steps of each
are dropped. Ours runs `trainer/main.py` in a child process (its CPU backend changes
process-wide torch state); TRL runs in this one.

    python bench/dpo_step.py [--steps 24] [--threads 1]

Last line: {"ours_pairs_per_s": ..., "trl_pairs_per_s": ..., "ratio": ..., "goal": 1.5}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # repo root in place of bench/, whose tokenize.py would shadow the stdlib module

CONFIG = os.path.join(ROOT, "trainer", "configs", "tiny-dpo.yaml")
DATA = os.path.join(ROOT, "trainer", "configs", "data", "sample-preference")
TOKENIZER = os.path.join(ROOT, "trainer", "configs", "data", "tokenizer-hh")
BATCH, SEQ, BETA, LR = 8, 128, 0.1, 1e-3


def ours(steps: int, threads: int) -> tuple[float, float]:
    """(steady pairs/s, seconds of the first logged window: start-up + reference pass)."""
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [f"train.steps={steps}", "train.log_every=2", "train.eval_every=0",
                f"train.micro_batch_size={BATCH}", f"train.global_batch_size={BATCH}",
                f"train.seq_length={SEQ}", "data.split=100,0,0", f"dpo.beta={BETA}",
                f"optimizer.lr={LR}", "schedule.warmup_steps=0", "checkpoint.save=false",
                f"run_dir={run_dir}"]
        env = dict(os.environ, PYTHONPATH=ROOT, KILN_LOG_LEVEL="WARNING",
                   OMP_NUM_THREADS=str(threads))
        started = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "trainer", "main.py"), "--config",
                        CONFIG, "--set", *sets], check=True, env=env, cwd=ROOT,
                       stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    # the loop counts global_batch_size × seq_length tokens per step: pairs/s = tokens/s / SEQ
    rates = [r["tokens_per_s"] / SEQ for r in records[2:]]
    return statistics.median(rates), wall


def trl(steps: int, threads: int) -> float:
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from dataprep.chat.hf_export import hf_tokenizer
    from dataprep.tokenizer import load_tokenizer
    from kiln.config import load_config
    from trainer.chat_data import ShardSet
    from trainer.config import run_config_class
    from trainer.stages.dpo import DpoOptions

    torch.set_num_threads(threads)
    m = load_config(run_config_class(DpoOptions, "dpo"), CONFIG, []).model
    config = LlamaConfig(vocab_size=512, hidden_size=m.hidden_size,
                         intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
                         num_attention_heads=m.num_attention_heads,
                         num_key_value_heads=m.num_query_groups, max_position_embeddings=SEQ,
                         rms_norm_eps=m.norm_epsilon, tie_word_embeddings=False,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    table = ShardSet(DATA, ("preference",), None).table
    tokenized = Dataset.from_dict({k: [list(map(int, x)) for x in table.column(k).to_pylist()]
                                   for k in ("prompt_ids", "chosen_ids", "rejected_ids")})
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(os.path.join(tmp, "model"))
        args = DPOConfig(output_dir=os.path.join(tmp, "out"), use_cpu=True, max_steps=steps,
                         per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                         learning_rate=LR, beta=BETA, loss_type=["sigmoid"], max_length=SEQ,
                         bf16=False,  # TRL defaults to bf16 autocast; both sides run fp32
                         logging_steps=steps, save_strategy="no", report_to=[],
                         dataloader_num_workers=0, seed=1234)
        text = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
        trainer = DPOTrainer(model=os.path.join(tmp, "model"), args=args, train_dataset=text,
                             processing_class=hf_tokenizer(load_tokenizer(TOKENIZER)),
                             callbacks=[Clock()])
        trainer.train_dataset = tokenized  # the same token ids as ours, collated by TRL
        trainer.train()
    gaps = [b - a for a, b in zip(times[2:], times[3:], strict=False)]
    return BATCH / statistics.median(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    theirs = trl(args.steps, args.threads)
    mine, wall = ours(args.steps, args.threads)
    print(f"tiny Llama (tiny-dpo.yaml), {BATCH} HH-RLHF pairs/step, ≤{SEQ} tokens, fp32, "
          f"{args.threads} threads, {args.steps} steps")
    print(f"ours (megatron-core, fused chosen+rejected, precomputed reference): {mine:.1f} pairs/s"
          f" (whole run incl. start-up and the reference pass: {wall:.1f} s)")
    print(f"TRL DPOTrainer: {theirs:.1f} pairs/s")
    print(json.dumps({"ours_pairs_per_s": round(mine, 2), "trl_pairs_per_s": round(theirs, 2),
                      "ratio": round(mine / theirs, 3), "goal": 1.5}))


if __name__ == "__main__":
    main()
