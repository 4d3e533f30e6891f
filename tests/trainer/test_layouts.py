"""Every parallel layout trains to the same losses as one process (same data, same init)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.trainer.conftest import losses, metrics, run_layouts, val_loss

pytestmark = pytest.mark.slow

STEPS = ["train.steps=5", "train.log_every=1", "train.eval_every=0", "checkpoint.save=false"]
SAVE = "checkpoint.save=true"  # tp2, pp2 and cp2 checkpoints are reloaded on one process below
FOUR_LAYERS = "model.num_layers=4"
TIED = "model.tie_embeddings=true"
OVERLAP = ["parallel.distributed_optimizer=true", "parallel.overlap_grad_reduce=true",
           "parallel.overlap_param_gather=true"]

MEGATRON_KERNELS = ["model.local_attention=megatron", "model.local_fusions=false"]

# name -> (ranks, reference, overrides)
LAYOUTS = {
    "recompute_full": (1, "ref2", ["model.recompute=full"]),
    "recompute_selective": (1, "ref2", ["model.recompute=selective"]),
    "accumulation_4": (1, "ref2", ["train.micro_batch_size=2"]),
    # megatron's own kernels of the local spec (unfused softmax with its causal mask, torch
    # norms, SwiGLU and RoPE as op chains) under megatron's schedule
    "megatron_kernels": (1, "ref2", MEGATRON_KERNELS),
    "tp2_megatron_kernels_selective": (2, "ref2", ["parallel.tp=2", "model.recompute=selective",
                                                   *MEGATRON_KERNELS]),
    "tp2": (2, "ref2", ["parallel.tp=2", SAVE]),
    "tp2_sequence_parallel": (2, "ref2", ["parallel.tp=2", "parallel.sequence_parallel=true"]),
    "pp2_1f1b": (2, "ref2", ["parallel.pp=2", SAVE]),
    "pp2_vpp2": (2, "ref4", ["parallel.pp=2", "parallel.vpp=2", FOUR_LAYERS]),
    "dp2_distributed_optimizer": (2, "ref2", ["parallel.distributed_optimizer=true"]),
    "overlap": (1, "ref2", OVERLAP),
    "dp2_overlap": (2, "ref2", OVERLAP),
    "pp2_tied_embeddings": (2, "ref2_tied", ["parallel.pp=2", TIED]),
    "tp2_pp2": (4, "ref4", ["parallel.tp=2", "parallel.pp=2", FOUR_LAYERS]),
    # context parallelism on the local spec (SDPA with K/V gathered over the CP group)
    "cp2": (2, "ref2", ["parallel.cp=2", SAVE]),
    "tp2_sequence_parallel_cp2": (4, "ref2", ["parallel.tp=2", "parallel.sequence_parallel=true",
                                              "parallel.cp=2"]),
    "cp2_dp2_distributed_optimizer": (4, "ref2", ["parallel.cp=2",
                                                  "parallel.distributed_optimizer=true"]),
}
# The GPU's mixed-precision path (Float16Module, fp32 main params and grads), run on CPU: bf16
# rounding differs with the TP split, so these compare within bf16 tolerance
BF16 = "model.precision=bf16"
BF16_LAYOUTS = {
    "tp2_bf16": (2, "ref2_bf16", ["parallel.tp=2", BF16]),
    "dp2_bf16_overlap": (2, "ref2_bf16", [*OVERLAP, BF16]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("layouts")
    run_layouts(out, {"ref2": [], "ref4": [FOUR_LAYERS], "ref2_tied": [TIED], "ref2_bf16": [BF16],
                      **{name: o for name, (n, _, o) in LAYOUTS.items() if n == 1}}, *STEPS)
    for nproc in (2, 4):
        chosen = {name: o for name, (n, _, o) in {**LAYOUTS, **BF16_LAYOUTS}.items()
                  if n == nproc}
        run_layouts(out, chosen, *STEPS, nproc=nproc)
    return out


@pytest.mark.parametrize("name", list(BF16_LAYOUTS))
def test_bf16_layout_matches_single_process(runs: Path, name: str) -> None:
    _, ref, _ = BF16_LAYOUTS[name]
    expected, got = losses(runs / ref), losses(runs / name)
    assert got == pytest.approx(expected, abs=2e-3, rel=0)
    # and bf16 trains the same model as fp32, within bf16's precision
    assert losses(runs / ref) == pytest.approx(losses(runs / "ref2"), abs=1e-2, rel=0)
    assert losses(runs / ref) != losses(runs / "ref2")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(runs: Path, name: str) -> None:
    _, ref, _ = LAYOUTS[name]
    expected, got = losses(runs / ref), losses(runs / name)
    assert len(got) == len(expected) == 5
    assert got == pytest.approx(expected, abs=1e-5, rel=0)
    assert val_loss(runs / name) == pytest.approx(val_loss(runs / ref), abs=1e-5, rel=0)
    # the weights' norm counts each weight once however it is split or tied across ranks
    norms = [[r["params_norm"] for r in metrics(runs / run)] for run in (name, ref)]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6, abs=0)


def test_losses_differ_between_models(runs: Path) -> None:
    """The comparison can fail: a different model (4 layers) gives different losses."""
    assert losses(runs / "ref2") != pytest.approx(losses(runs / "ref4"), abs=1e-5, rel=0)


def test_checkpoints_load_under_another_layout(runs: Path) -> None:
    """TP=2, PP=2 and CP=2 checkpoints evaluated on one process give the validation loss they
    had."""
    saved = ("tp2", "pp2_1f1b", "cp2")
    evals = {f"from_{name}": [f"init.checkpoint={runs / name / 'checkpoints'}", "train.steps=0",
                              "checkpoint.save=false"]
             for name in saved}
    run_layouts(runs, evals)
    for name in saved:
        got = json.loads((runs / f"from_{name}" / "eval.json").read_text())["val_loss"]
        assert got == pytest.approx(val_loss(runs / name), abs=1e-5, rel=0)
