"""Training metrics: model FLOPs and MFU, peak memory, and the three sinks every logged step goes
to (`<run_dir>/metrics.jsonl`, TensorBoard, the console progress line), plus the loss plot."""

from __future__ import annotations

import json
import math
import os
import resource
from typing import Any

import torch

from kiln.log import get_logger

log = get_logger(__name__)

# Dense bf16 tensor-core peak per GPU in TFLOP/s (vendor datasheets); FP8 doubles it.
_PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "GH200": 989.0,
                     "B200": 2250.0, "A100": 312.0, "L40S": 362.0}


def flops_per_token(*, num_layers: int, hidden: int, ffn: int, heads: int, kv_heads: int,
                    vocab: int, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward) for the Llama-style model."""
    head_dim = hidden // heads
    per_layer = hidden * (heads + 2 * kv_heads) * head_dim + hidden * hidden + 3 * hidden * ffn
    attention = 2 * seq_length * hidden  # QK^T and AV, per token per layer (no causal discount)
    forward = 2 * (num_layers * (per_layer + attention) + hidden * vocab)
    return 3.0 * forward


def peak_tflops(fp8: bool) -> float | None:
    """This GPU's peak dense TFLOP/s, or None when unknown (CPU, unlisted GPU)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in _PEAK_BF16_TFLOPS.items():
        if key in name:
            return value * (2 if fp8 else 1)
    return None


def peak_memory_gb() -> float:
    """Peak memory of this process: GPU allocations on CUDA, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class MetricsWriter:
    """JSONL + TensorBoard on the logging rank; a no-op elsewhere."""

    def __init__(self, run_dir: str, enabled: bool, start_step: int = 0) -> None:
        """`start_step`: records after it (from a run that crashed past its checkpoint) go."""
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if enabled:
            os.makedirs(run_dir, exist_ok=True)
            kept = [r for r in read_metrics(self.path) if r["step"] <= start_step] \
                if os.path.exists(self.path) else []
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key, value, record["step"])
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.enabled and os.path.exists(self.path):
            plot_losses(self.path, os.path.join(os.path.dirname(self.path), "loss.png"))


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_losses(metrics_path: str, png_path: str) -> None:
    """Training (and validation) loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    valid = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train")
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if train or valid:
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
