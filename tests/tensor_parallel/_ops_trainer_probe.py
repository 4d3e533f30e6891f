"""Measure the trainer's own model on CPU (`trainer.model.build_gpt_chunks`: the local spec with
SDPA attention and the fused ops, under the CPU backend): tensors saved for backward.

Run as a script (its own process: the CPU backend changes process-wide torch state). Reads a JSON
list of {"overrides": [...], "micro_batch_size": b, "seq_length": s, "vocab_size": v} from the file
named by its argument and prints one JSON list of {"params", "activation_bytes"}.

Context parallelism: under `torchrun --nproc-per-node=CP`, with `--cp CP`, each rank feeds its
share of the sequence (megatron's load-balanced split) and rank 0 prints its own measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from kiln.log import setup_logging  # noqa: E402
from tensor_parallel import runtime  # noqa: E402
from tests.tensor_parallel._ops_megatron_probe import saved_for_backward  # noqa: E402
from trainer.config import load_run_config  # noqa: E402
from trainer.model import build_gpt_chunks  # noqa: E402

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "trainer", "configs", "tiny-pretrain.yaml")


def measure(case: dict, cp: int) -> dict:
    cfg = load_run_config(TINY, [*case["overrides"], f"train.seq_length={case['seq_length']}",
                                 f"parallel.cp={cp}"])
    [model] = build_gpt_chunks(cfg, case["vocab_size"])
    if cfg.model.precision == "bf16":
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    s, b = case["seq_length"], case["micro_batch_size"]
    ids = torch.randint(0, case["vocab_size"], (b, s))
    positions = torch.arange(s).expand(b, s)
    if cp > 1:  # this rank's two chunks of every sequence
        from megatron.core.utils import get_batch_on_this_cp_rank

        local = get_batch_on_this_cp_rank({"ids": ids, "positions": positions})
        ids, positions = local["ids"], local["positions"]
    loss, activation_bytes = saved_for_backward(model, lambda: model(
        input_ids=ids, position_ids=positions, attention_mask=None, labels=ids))
    loss.float().sum().backward()  # the graph is a real one
    return {"params": sum(p.numel() for p in model.parameters()),
            "activation_bytes": activation_bytes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cases", help="JSON file of the cases to measure")
    parser.add_argument("--cp", type=int, default=1)
    args = parser.parse_args()
    with open(args.cases, encoding="utf-8") as f:
        cases = json.load(f)
    setup_logging("WARNING")
    runtime.init(tp=1, cp=args.cp, seed=1)
    try:
        results = [measure(case, args.cp) for case in cases]
        if runtime.rank() == 0:
            print(json.dumps(results))
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
