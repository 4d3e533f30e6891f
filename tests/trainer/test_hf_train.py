"""An imported model fine-tunes with `trainer/main.py` (SFT stage on shards `kiln sft` made with the
imported tokenizer, PP=2, `init.checkpoint` from the import), exports to HF, and transformers then
gives our logits and our greedy continuation."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from kiln.cli import main as kiln
from kiln.cli import run_main
from tests.trainer.conftest import ROOT, child_env, losses
from tests.trainer.hf_util import TOKENS, hf_logits, make_model, run_driver, safetensors_dir
from trainer.hf import export_hf, import_hf
from trainer.launch import command

pytestmark = pytest.mark.slow

PROMPT, STEPS = [2, 10, 50, 77], 8
CHATS = ROOT / "jobs" / "sample_data" / "hh-rlhf-chosen-messages.jsonl"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    make_model("qwen2", root / "source")  # tied embeddings + QKV bias: the delicate export
    assert run_main(import_hf.main, [str(root / "source"), "--out", str(root / "ckpt"),
                                     "--pp", "2"]) == 0
    chats = root / "chats.jsonl"
    chats.write_text("".join(CHATS.read_text().splitlines(keepends=True)[:24]))
    tokenizer = str(root / "ckpt" / "tokenizer")
    assert kiln(["sft", "--input", str(chats), "--tokenizer", tokenizer, "--out",
                 str(root / "sft"), "--set", "length.max_total_tokens=64",
                 "--set", "length.min_completion_tokens=8"]) == 0
    overrides = ["stage=sft", f"data.manifests=[{root / 'sft'}]", f"sft.tokenizer={tokenizer}",
                 "data.split=20,4,0", "train.steps=3", "train.seq_length=64",
                 "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_every=0",
                 "train.log_every=1", "optimizer.lr=1e-4", "optimizer.min_lr=1e-5", "schedule.warmup_steps=0",
                 f"run_dir={root / 'run'}"]
    proc = subprocess.run(command(str(root / "ckpt" / "model.yaml"), overrides, nproc=2),
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert run_main(export_hf.main, [str(root / "run" / "checkpoints"), "--out", str(root / "hf"),
                                     "--chat-template", "source"]) == 0
    run_driver({"trained": {"config": str(root / "ckpt" / "model.yaml"),
                            "checkpoint": str(root / "run" / "checkpoints"),
                            "set": ["parallel.pp=1"]}},
               root, nproc=1, greedy={"prompt": PROMPT, "steps": STEPS})
    return root


def test_training_started_from_the_imported_weights(trained: Path) -> None:
    assert len(losses(trained / "run")) == 3
    before, after = safetensors_dir(trained / "source"), safetensors_dir(trained / "hf")
    assert sorted(before) == sorted(after) and "lm_head.weight" not in after  # tied
    moved = {k: (after[k] - before[k]).abs().max().item() for k in before}
    # Three Adam steps at lr 1e-4 move each weight by at most ~3 * 1e-4: from the imported
    # weights, not from a fresh initialisation.
    assert all(0 < m < 0.02 for m in moved.values()), moved


def test_the_trained_checkpoint_finds_its_tokenizer_through_init(trained: Path) -> None:
    assert export_hf.tokenizer_dir(str(trained / "run" / "checkpoints")) == \
        str(trained / "ckpt" / "tokenizer")


def test_transformers_gives_our_logits_for_the_trained_weights(trained: Path) -> None:
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(str(trained / "hf"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = torch.load(trained / "trained.pt")["logits"]
    torch.testing.assert_close(ours, hf_logits(trained / "hf", TOKENS), atol=1e-4, rtol=0)


def test_greedy_generation_matches_transformers(trained: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(trained / "hf"), dtype=torch.float32).eval()
    out = model.generate(torch.tensor([PROMPT]), max_new_tokens=STEPS, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    theirs = out[0, len(PROMPT):].tolist()
    ours = torch.load(trained / "trained.pt")["greedy"]
    assert len(set(ours)) > 1, ours  # a degenerate continuation would prove little
    assert theirs == ours
