"""CPU training throughput of one tiny Llama: our megatron-core trainer vs Hugging Face.

Same architecture (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings), batch, sequence length and
fp32 on both sides. Ours runs `trainer/main.py` in a child process (its CPU backend changes
process-wide torch state) and reports steady-state tokens/s from its metrics.jsonl; theirs is
`transformers.LlamaForCausalLM` with a plain `torch.optim.AdamW` loop in this process.

    python bench/train_step.py [--steps 12]

Last line: {"ours_tokens_per_s": ..., "hf_tokens_per_s": ..., "ratio": ..., "goal": 1.0}
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

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=4,
             num_query_groups=2)
VOCAB = 384  # the byte-level sample vocabulary (257) padded as the trainer pads it
SEQ, BATCH = 256, 4


def ours(steps: int, log_every: int) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        sets = [f"model.{k}={v}" for k, v in MODEL.items()] + [
            f"train.steps={steps}", f"train.log_every={log_every}", "train.eval_every=0",
            f"train.seq_length={SEQ}", f"train.micro_batch_size={BATCH}",
            f"train.global_batch_size={BATCH}", "checkpoint.save=false", f"run_dir={run_dir}"]
        cmd = [sys.executable, os.path.join(ROOT, "trainer", "main.py"), "--config",
               os.path.join(ROOT, "trainer", "configs", "tiny-pretrain.yaml"), "--set", *sets]
        env = dict(os.environ, PYTHONPATH=ROOT, KILN_LOG_LEVEL="WARNING")
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    # the first window holds start-up and warm-up
    return statistics.median(r["tokens_per_s"] for r in records[1:])


def hf(steps: int, log_every: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=MODEL["hidden_size"],
                         intermediate_size=MODEL["ffn_hidden_size"],
                         num_hidden_layers=MODEL["num_layers"],
                         num_attention_heads=MODEL["num_attention_heads"],
                         num_key_value_heads=MODEL["num_query_groups"],
                         max_position_embeddings=SEQ, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, betas=(0.9, 0.95), weight_decay=0.01)
    tokens = torch.randint(0, 257, (steps, BATCH, SEQ + 1))
    rates, started = [], time.perf_counter()
    for step in range(steps):
        batch = tokens[step]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss  # HF shifts labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % log_every == 0:
            now = time.perf_counter()
            rates.append(log_every * BATCH * SEQ / (now - started))
            started = now
    return statistics.median(rates[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--log-every", type=int, default=2)
    args = parser.parse_args()
    theirs = hf(args.steps, args.log_every)
    mine = ours(args.steps, args.log_every)
    print(f"tiny Llama {MODEL}, batch {BATCH}×{SEQ}, fp32, {torch.get_num_threads()} threads")
    print(f"ours (megatron-core trainer): {mine:,.0f} tokens/s")
    print(f"Hugging Face LlamaForCausalLM: {theirs:,.0f} tokens/s")
    print(json.dumps({"ours_tokens_per_s": round(mine, 1), "hf_tokens_per_s": round(theirs, 1),
                      "ratio": round(mine / theirs, 3), "goal": 1.0}))


if __name__ == "__main__":
    main()
