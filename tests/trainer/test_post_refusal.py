"""The trainer refuses post-training shards made for another contract version or another
tokenizer: exit 1, one line saying which and how to fix it, no traceback (the shard-set checks
themselves, wrong contract included, are unit-tested in test_chat_data.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.trainer.conftest import ROOT, child_env
from tests.trainer.post_helpers import DATA, config

pytestmark = pytest.mark.slow


def train(tmp_path, stage: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "trainer" / "main.py"), "--config", config(stage), "--set",
           f"run_dir={tmp_path / 'run'}", "train.steps=1", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_refuses_another_tokenizer(tmp_path) -> None:
    line = error_line(train(tmp_path, "dpo", "dpo.tokenizer=0123abcd"))
    assert "kiln.tokenizer_fingerprint" in line and "0123abcd" in line
    assert "re-tokenize" in line and "dpo.tokenizer" in line
    # what `kiln import-hf`'s model.yaml sets: the run's tokenizer for every stage
    line = error_line(train(tmp_path, "dpo", "dpo.tokenizer=null",
                            "data.tokenizer_fingerprint=0123abcd"))
    assert "0123abcd" in line and "data.tokenizer_fingerprint" in line


def test_refuses_another_contract_version(tmp_path) -> None:
    data = tmp_path / "preference"
    shutil.copytree(DATA / "sample-preference", data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["schema"]["version"] = 99
    (data / "manifest.json").write_text(json.dumps(manifest))
    line = error_line(train(tmp_path, "rm", f"data.manifests=[{data}]"))
    assert "schema.version" in line and "version 99" in line and "re-run the data job" in line



def test_grpo_refuses_context_parallelism(tmp_path) -> None:
    """Sampling decodes whole sequences on one rank."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "trainer" / "main.py"), "--config", config("grpo"), "--set",
           f"run_dir={tmp_path / 'run'}", "train.steps=1", "parallel.cp=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "config key 'parallel.cp': stage grpo decodes whole sequences on one rank" in proc.stderr
    # each rank exits 1 with the one-line error (the launcher then reports the failed children)
    assert "[rank0]: Traceback" not in proc.stderr and "[rank1]: Traceback" not in proc.stderr


def test_rows_cut_to_nothing_are_left_out_and_said(tmp_path) -> None:
    """At train.seq_length=32 a fifth of the sample pairs keep no response token. ORPO's odds of
    an empty response are undefined (every step was NaN and the run stopped); now those rows
    are left out, the run says how many, and every step trains."""
    proc = train(tmp_path, "orpo", "train.steps=3", "train.seq_length=32",
                 "checkpoint.save=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.seq_length=32 cuts 222 of 239 chosen responses" in proc.stderr
    assert "52 rows keep no trained token and are left out: 50 of 215 train" in proc.stderr
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")
               if x]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 3 and all(r["skipped_steps"] == 0 for r in steps), steps
    proc = train(tmp_path, "orpo", "train.seq_length=4")  # every prompt has 5 tokens or more
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error: config key 'train.seq_length': 4 leaves no training row with a trained " \
        "token" in proc.stderr


def config_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    return line


def test_refuses_a_starting_checkpoint_of_another_model(tmp_path) -> None:
    """megatron pads or cuts an embedding of another size without a word (its vocabulary
    tensors allow shape mismatches), and a changed RoPE base or tying loads as if nothing
    differed: the checkpoint's own run config is compared first."""
    pre, rm = tmp_path / "pre", tmp_path / "rm"
    # the SFT model's shape over the byte-level pretraining sample (257 ids, not 512)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "main.py"), "--config",
         str(ROOT / "trainer" / "configs" / "tiny-pretrain.yaml"), "--set", f"run_dir={pre}",
         "train.steps=1", "model.hidden_size=64", "model.ffn_hidden_size=176",
         "checkpoint.save=true"], cwd=ROOT, env=child_env(), capture_output=True, text=True,
        timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train(tmp_path / "r", "rm", f"run_dir={rm}", "checkpoint.save=true").returncode == 0
    line = config_error(train(tmp_path / "a", "sft", f"init.checkpoint={pre}/checkpoints"))
    assert "'init.checkpoint'" in line and "trained over 257 token ids, this run has 512" in line
    line = config_error(train(tmp_path / "b", "dpo", f"init.checkpoint={rm}/checkpoints"))
    assert "is a reward model (stage: rm)" in line
    for override, key in [("model.rotary_base=500000", "model.rotary_base"),
                          ("model.tie_embeddings=true", "model.tie_embeddings"),
                          ("model.ffn_hidden_size=128", "model.ffn_hidden_size")]:
        line = config_error(train(tmp_path / "c", "rm", f"init.checkpoint={rm}/checkpoints",
                                  override))
        assert f"'{key}'" in line and "was trained with" in line
