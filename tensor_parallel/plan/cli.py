"""`kiln plan` command line: the ranked table (rich) or JSON."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from kiln.config import from_dict, read_yaml
from kiln.errors import UsageError
from tensor_parallel.plan.memory import (
    GIB,
    NAMED_MODELS,
    RECOMPUTE_MODES,
    ModelShape,
    TrainingSetup,
    count_parameters,
)
from tensor_parallel.plan.ranking import Plan, context_parallel_sizes, plan_layouts

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# what a command line leaves unset and the config does not say
DEFAULTS = {"micro_batch_size": 1, "global_batch_size": 512, "dtype": "bf16", "backend": "te"}


def load_model(spec: str, vocab_size: int | None = None) -> tuple[ModelShape, dict[str, Any]]:
    """A named size (`llama-8b`), or a trainer YAML: the shape from its `model:` section (a
    vocabulary it leaves to the data from its first manifest's tokenizer, unless `vocab_size`),
    and the sequence length, batch sizes, dtype and kernels it trains with."""
    if spec in NAMED_MODELS:
        return NAMED_MODELS[spec], {}
    if not spec.endswith((".yaml", ".yml")):
        raise UsageError(f"--model '{spec}' is neither a known size "
                         f"({', '.join(NAMED_MODELS)}) nor a .yaml config")
    doc = read_yaml(spec)
    section, train = doc.get("model"), doc.get("train") or {}
    if not isinstance(section, dict):
        raise UsageError(f"{spec}: no 'model:' section")
    section = dict(section)
    if section.get("num_query_groups") is None:  # the trainer's None: one group per head
        section["num_query_groups"] = section.get("num_attention_heads")
    if vocab_size is not None:
        section["vocab_size"] = vocab_size
    elif section.get("vocab_size") is None:
        section["vocab_size"] = _data_vocab_size(spec, doc)
    if "seq_length" not in section and "seq_length" in train:
        section["seq_length"] = train["seq_length"]
    known = {f.name for f in dataclasses.fields(ModelShape)}
    # The trainer's model section has more keys (rope base, init...): take the ones shapes need.
    shape = from_dict(ModelShape, {k: v for k, v in section.items() if k in known}, prefix="model")
    te = section.get("transformer_impl") == "transformer_engine"
    megatron_kernels = (section.get("local_attention") == "megatron"
                        and section.get("local_fusions") is False)
    trained = {"micro_batch_size": train.get("micro_batch_size"),
               "global_batch_size": train.get("global_batch_size"),
               "dtype": "fp8" if section.get("fp8") else section.get("precision", "fp32"),
               "backend": "te" if te else "local" if megatron_kernels else "sdpa"}
    return dataclasses.replace(shape, name=spec), {k: v for k, v in trained.items() if v}


def _data_vocab_size(spec: str, doc: dict[str, Any]) -> int:
    """The vocabulary of the tokenizer in the config's first data manifest (`manifest.json`'s
    `tokenizer.vocab_size`, the one field read here), found as the trainer finds it."""
    manifests = (doc.get("data") or {}).get("manifests") or []
    for path in manifests[:1]:
        for base in ("", REPO_ROOT):
            candidate = os.path.join(base, path)
            file = os.path.join(candidate, "manifest.json") if os.path.isdir(candidate) else candidate
            if os.path.isfile(file):
                with open(file, encoding="utf-8") as f:
                    vocab = (json.load(f).get("tokenizer") or {}).get("vocab_size")
                if isinstance(vocab, int):
                    return vocab
    raise UsageError(f"{spec}: model.vocab_size is left to the data, and no data manifest "
                     "gives tokenizer.vocab_size; pass --vocab-size")


def _gib(n: int) -> str:
    """GiB to one decimal; below 0.1 GiB (toy models) three significant digits."""
    return f"{n / GIB:.1f}" if n >= GIB / 10 or n == 0 else f"{n / GIB:.3g}"


def _count(n: int) -> str:
    """1.24B, 8.03B; 3.05M for a toy model (not 0.00B)."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def plan_rows(plans: Sequence[Plan]) -> list[dict]:
    """Machine-readable view of ranked plans (what `--json` prints)."""
    rows = []
    for rank, plan in enumerate(plans, 1):
        est, stage = plan.estimate, plan.estimate.heaviest
        rows.append({
            "rank": rank, "tp": plan.layout.tp, "pp": plan.layout.pp, "vpp": plan.layout.vpp,
            "cp": plan.layout.cp, "dp": plan.layout.dp, "sequence_parallel": plan.layout.sequence_parallel,
            "num_microbatches": est.num_microbatches, "params_per_gpu": stage.params,
            "weights_bytes": stage.weights, "gradients_bytes": stage.gradients,
            "optimizer_bytes": stage.optimizer,
            "optimizer_distributed_bytes": stage.optimizer_distributed,
            "activations_bytes": {r: est.activations(r) for r in RECOMPUTE_MODES},
            "distributed_optimizer": plan.distributed_optimizer, "recompute": plan.recompute,
            "peak_bytes": plan.peak_bytes, "fits": plan.fits,
            "throughput_proxy": round(plan.throughput, 4),
        })
    return rows


def print_table(plans: Sequence[Plan], title: str, top: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name in ("#", "layout", "m", "params/GPU", "weights", "grads", "optim", "optim ZeRO-1",
                 "act none", "act sel", "act full", "setting", "peak GiB", "fits", "speed"):
        table.add_column(name, justify="left" if name in ("layout", "setting") else "right",
                         no_wrap=name == "layout")
    for row, plan in zip(plan_rows(plans)[:top], plans[:top], strict=False):
        act = row["activations_bytes"]
        setting = ("ZeRO-1" if plan.distributed_optimizer else "Adam") + f" + {plan.recompute}"
        table.add_row(
            str(row["rank"]), str(plan.layout), str(row["num_microbatches"]),
            _count(row["params_per_gpu"]), _gib(row["weights_bytes"]),
            _gib(row["gradients_bytes"]), _gib(row["optimizer_bytes"]),
            _gib(row["optimizer_distributed_bytes"]), _gib(act["none"]), _gib(act["selective"]),
            _gib(act["full"]), setting, _gib(plan.peak_bytes), "yes" if plan.fits else "NO",
            f"{plan.throughput:.3f}",
        )
    Console(width=max(160, Console().width)).print(table)


def _cp_sizes(spec: str, gpus_per_node: int) -> list[int]:
    if spec == "auto":
        return context_parallel_sizes(gpus_per_node)
    try:
        sizes = sorted({int(part) for part in spec.split(",")})
    except ValueError:
        sizes = []
    if not sizes or sizes[0] < 1:
        raise UsageError(f"--cp '{spec}': give auto or positive sizes separated by commas")
    return sizes


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="kiln plan", description="rank TP/PP/CP/DP layouts by estimated memory per GPU")
    parser.add_argument("--model", required=True,
                        help=f"{', '.join(NAMED_MODELS)} or a trainer YAML config with a model: section")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, required=True, help="memory per GPU in GiB (an 80 GB H100 has 79.6 GiB)")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    # unset: a trainer config's own setting, else the default shown
    parser.add_argument("--seq-length", type=int,
                        help="default: the config's train.seq_length, else the model's (4096)")
    parser.add_argument("--micro-batch-size", type=int, help="default: the config's, else 1")
    parser.add_argument("--global-batch-size", type=int, help="default: the config's, else 512")
    parser.add_argument("--vocab-size", type=int,
                        help="default: the config's, else its data manifest's tokenizer")
    parser.add_argument("--dtype", choices=["bf16", "fp8", "fp32"],
                        help="default: the config's precision (fp8 when model.fp8), else bf16")
    parser.add_argument("--backend", choices=["te", "sdpa", "local"],
                        help="te: Transformer Engine kernels (GPU); sdpa: the trainer's local spec "
                             "on CPU (SDPA attention, fused ops); local: megatron's own local spec "
                             "(local_attention=megatron, local_fusions=false). Default: the "
                             "config's kernels, else te")
    parser.add_argument("--cp", default="auto",
                        help="context-parallel sizes to consider, e.g. 1 or 1,2,4,16 (auto: 1 and "
                             "the powers of two up to --gpus-per-node)")
    parser.add_argument("--reserve-gb", type=float, default=4.0,
                        help="GiB kept free for CUDA context, NCCL buffers and fragmentation")
    parser.add_argument("--top", type=int, default=25, help="rows to print (0: all)")
    parser.add_argument("--json", action="store_true", help="print every ranked layout as JSON")
    args = parser.parse_args(argv)

    if args.seq_length is not None and args.seq_length <= 0:
        raise UsageError("--seq-length must be positive")
    model, trained = load_model(args.model, args.vocab_size)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, trained.get(key, default))
    for flag in ("gpus", "gpus_per_node", "micro_batch_size", "global_batch_size"):
        if getattr(args, flag) <= 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive")
    if args.gpu_memory_gb <= args.reserve_gb:
        raise UsageError("--gpu-memory-gb must exceed --reserve-gb")
    cp_sizes = _cp_sizes(args.cp, args.gpus_per_node)
    setup = TrainingSetup(args.seq_length or model.seq_length, args.micro_batch_size,
                          args.global_batch_size, args.dtype, args.backend)
    plans, rejected = plan_layouts(model, args.gpus, args.gpu_memory_gb, setup,
                                   args.gpus_per_node, args.reserve_gb, cp_sizes)
    if not plans:
        reasons = "; ".join(f"{n} x {why}" for why, n in sorted(rejected.items())) or \
            f"--cp {args.cp}: no context-parallel size there divides the GPUs into a layout"
        raise UsageError(f"no valid layout of {model.name} on {args.gpus} GPUs ({reasons})")
    fitting = sum(p.fits for p in plans)
    if args.json:
        print(json.dumps({"model": dataclasses.asdict(model), "setup": dataclasses.asdict(setup),
                          "gpus": args.gpus, "gpu_memory_gb": args.gpu_memory_gb,
                          "parameters": count_parameters(model), "fitting": fitting,
                          "rejected": rejected, "layouts": plan_rows(plans)}, indent=1))
    else:
        title = (f"{model.name}: {_count(count_parameters(model))} parameters on {args.gpus} x "
                 f"{args.gpu_memory_gb:g} GiB, seq {setup.seq_length}, micro-batch "
                 f"{setup.micro_batch_size}, global batch {setup.global_batch_size}, {setup.dtype}, "
                 f"{setup.backend} kernels; GiB per GPU on the most loaded stage; fits: peak <= "
                 f"{args.gpu_memory_gb - args.reserve_gb:g} GiB ({args.reserve_gb:g} reserved)")
        print_table(plans, title, args.top or None)
        if rejected:
            print("invalid layouts skipped: "
                  + "; ".join(f"{n} x {why}" for why, n in sorted(rejected.items())))
    if not fitting:
        best = min(plans, key=lambda p: p.peak_bytes)
        print(f"error: no layout fits in {args.gpu_memory_gb:g} GiB per GPU "
              f"(minus {args.reserve_gb:g} reserved); the smallest, {best.layout} with "
              f"{best.recompute} recomputation, needs {_gib(best.peak_bytes)} GiB", file=sys.stderr)
        return 2
    return 0

