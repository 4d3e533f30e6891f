"""Tiny Hugging Face models and a tokenizer built locally (no downloads) for the HF tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from tests.trainer.conftest import ROOT, child_env

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXT = ["the cat sat on the mat", "a dog ran in the park", "hello world, how are you?",
        "megatron and transformers agree on every logit", "0123456789 + - * / = ()"]
VOCAB = 300  # model vocabulary >= the tokenizer's (as Qwen2 does); >= the byte sample shards' 257

# Small enough to run in seconds, shaped to exercise GQA (4 heads, 2 groups), SwiGLU and norms;
# std 0.1 makes logits O(1), so a RoPE or norm mistake shows far above the 1e-4 tolerance.
COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=16384, bos_token_id=2, eos_token_id=3,
                              pad_token_id=0, initializer_range=0.1)

FAMILIES: dict[str, dict[str, Any]] = {
    # Llama 3 with its RoPE scaling (megatron's fixed low/high/original values), untied.
    "llama": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Mistral: sliding window far beyond the test sequences.
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=16384,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    # Qwen2: Q/K/V bias, tied embeddings.
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def make_tokenizer(out: Path) -> None:
    """A byte-level BPE tokenizer trained here, saved as an HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=280, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXT * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(out))


def make_model(family: str, out: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32,
               max_shard_size: str | None = None, **overrides: Any) -> Path:
    """A randomly initialised tiny model of `family` saved with `save_pretrained` (+ tokenizer)."""
    import transformers

    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[family]
    config = getattr(transformers, f"{cls}Config")(**{**COMMON, **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, f"{cls}ForCausalLM")(config).to(dtype).eval()
    with torch.no_grad():  # HF initialises norms to 1 and biases to 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out), **kwargs)
    make_tokenizer(out)
    return out


def hf_logits(model_dir: Path, tokens: list[list[int]]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits


def safetensors_dir(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory (single file or shards)."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
             if index.exists() else ["model.safetensors"])
    for name in files:
        out.update(load_file(str(directory / name)))
    return out


DRIVER = str(ROOT / "tests" / "trainer" / "hf_driver.py")
TOKENS = torch.randint(0, 300, (2, 64), generator=torch.Generator().manual_seed(0)).tolist()


def run_driver(jobs: dict, out: Path, nproc: int, greedy: dict | None = None) -> None:
    """Run `hf_driver.py` on `jobs` (see its docstring) in one launch of `nproc` ranks."""
    spec = out / "jobs.json"
    spec.write_text(json.dumps({"out": str(out), "tokens": TOKENS, "greedy": greedy,
                                "jobs": jobs}))
    cmd = [sys.executable, DRIVER, str(spec)] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", DRIVER, str(spec)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
