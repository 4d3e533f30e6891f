"""Measure the peak memory of real training steps on each rank, next to `kiln plan`'s estimate.

Run as a script, alone or under torchrun (its own processes: the CPU backend changes
process-wide torch state): `_peak_memory_probe.py OUT.json --set key=value ...` trains three
steps of `tiny-pretrain.yaml` with the overrides, the trainer built under torch.profiler with
memory tracking. Every tensor storage the CPU allocator hands out and takes back is an event; the
peak of the bytes live at once, from before the model is built to after the last optimizer step,
is this rank's measured peak (weights, gradients, optimizer states, activations, and everything
transient). Rank 0 writes one JSON list, a record per rank, to OUT.json; the run directory (its
data cache, shared by the ranks) is OUT.json's folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, ROOT)

from kiln.log import setup_logging  # noqa: E402
from tensor_parallel import runtime  # noqa: E402
from trainer.config import load_run_config  # noqa: E402
from trainer.loop import build_trainer, memory_estimate  # noqa: E402

TINY = os.path.join(ROOT, "trainer", "configs", "tiny-pretrain.yaml")


def peak_live_bytes(trace_path: str) -> int:
    """The most bytes live at once among the allocator events of a chrome trace.

    Events are tallied by address: an allocation at an address already live replaces it (its
    free was not recorded in order), so a lost or reordered event cannot make the tally drift.
    """
    with open(trace_path, encoding="utf-8") as f:
        events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    live: dict[int, int] = {}
    current = peak = 0
    for event in events:
        addr, size = event["Addr"], event["Bytes"]
        current -= live.pop(addr, 0)
        if size > 0:
            live[addr] = size
            current += size
        peak = max(peak, current)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--set", nargs="*", default=[])
    args = parser.parse_args()
    setup_logging("WARNING")
    torch.set_num_threads(1)
    run_dir = os.path.dirname(os.path.abspath(args.out))
    cfg = load_run_config(TINY, [*args.set, "checkpoint.save=false", f"run_dir={run_dir}"])
    p = cfg.parallel
    runtime.init(tp=p.tp, pp=p.pp, vpp=p.vpp, cp=p.cp, seed=cfg.train.seed)
    try:
        from megatron.core import parallel_state

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            trainer = build_trainer(cfg)
            iterators = [trainer.stage.train_batches(0) for _ in trainer.model]
            for _ in range(3):
                trainer.train_step(iterators if len(iterators) > 1 else iterators[0])
        trace = os.path.join(run_dir, f"trace-{runtime.rank()}.json")
        prof.export_chrome_trace(trace)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        estimate, _ = memory_estimate(cfg, trainer.stage.vocab_size(), runtime.layout())
        planned = estimate.stages[stage].total(p.distributed_optimizer, cfg.model.recompute)
        record = {"rank": runtime.rank(), "stage": stage, "measured": peak_live_bytes(trace),
                  "planned": planned}
        records = [None] * runtime.world_size()
        dist.all_gather_object(records, record)
        if runtime.rank() == 0:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(records, f)
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    main()
