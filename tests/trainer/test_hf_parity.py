"""Imported Llama 3 / Mistral / Qwen2 models give transformers' logits (fp32, within 1e-4) through
megatron at TP=1, TP=2 and PP=2, each loaded by the trainer's own `init.checkpoint` path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.cli import run_main
from tests.trainer.hf_util import TOKENS, hf_logits, make_model, run_driver
from trainer.hf import import_hf

pytestmark = pytest.mark.slow

FAMILIES = ("llama", "mistral", "qwen2")
LAYOUTS = {"tp1_dp2": ["parallel.tp=1"], "tp2": ["parallel.tp=2"],
           "pp2": ["parallel.tp=1", "parallel.pp=2"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("parity")
    jobs = {}
    for family in FAMILIES:
        make_model(family, root / family)
        assert run_main(import_hf.main, [str(root / family), "--out", str(root / f"{family}.ckpt")]) == 0
        for layout, overrides in LAYOUTS.items():
            jobs[f"{family}_{layout}"] = {"config": str(root / f"{family}.ckpt" / "model.yaml"),
                                          "checkpoint": str(root / f"{family}.ckpt"),
                                          "set": overrides}
    # bf16 weights in sharded safetensors, loaded into the fp32 model (cast on load)
    make_model("llama", root / "llama_bf16", dtype=torch.bfloat16, max_shard_size="40KB")
    assert run_main(import_hf.main, [str(root / "llama_bf16"), "--out", str(root / "bf16.ckpt")]) == 0
    jobs["llama_bf16_tp2"] = {"config": str(root / "bf16.ckpt" / "model.yaml"),
                              "checkpoint": str(root / "bf16.ckpt"), "set": ["parallel.tp=2"]}
    run_driver(jobs, root, nproc=2)  # one launch for every (model, layout) pair
    return root


@pytest.fixture(scope="module")
def reference(runs: Path) -> dict[str, torch.Tensor]:
    return {name: hf_logits(runs / name, TOKENS) for name in (*FAMILIES, "llama_bf16")}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_equal_transformers(runs: Path, reference: dict, family: str,
                                            layout: str) -> None:
    ours = torch.load(runs / f"{family}_{layout}.pt")["logits"]
    want = reference[family]
    assert ours.shape == want.shape == (2, 64, 300)  # vocabulary padding sliced off
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=0)


def test_bf16_sharded_source_loads_into_the_fp32_model(runs: Path, reference: dict) -> None:
    ours = torch.load(runs / "llama_bf16_tp2.pt")["logits"]
    torch.testing.assert_close(ours, reference["llama_bf16"], atol=1e-4, rtol=0)


def test_the_comparison_sees_a_rope_scaling_mistake(runs: Path, reference: dict) -> None:
    """Without Llama 3 scaling, transformers' logits move 100x beyond the tolerance: the parity
    above checks the scaling, not only the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(runs / "llama"))
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500000.0}
    model = AutoModelForCausalLM.from_pretrained(str(runs / "llama"), config=cfg).eval()
    with torch.no_grad():
        unscaled = model(torch.tensor(TOKENS)).logits
    ours = torch.load(runs / "llama_tp1_dp2.pt")["logits"]
    assert (ours - unscaled).abs().max() > 1e-2
