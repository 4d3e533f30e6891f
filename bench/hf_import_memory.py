"""Peak memory of `kiln import-hf` on a Llama-shaped bf16 model with random weights written here,
against the model's size (`ratio` = model size / import peak: how many times less than the whole
model the import holds; goal 4) and, for reference, `transformers`' `from_pretrained` (which
Megatron-LM's `tools/checkpoint` loaders start from).

    python bench/hf_import_memory.py [--hidden 1024 --layers 8 --ffn 2816 --vocab 32000]

Memory is the peak of anonymous resident memory (`RssAnon`, sampled every 2 ms) above the
process's level before the conversion starts: pages of the memory-mapped safetensors files are
file-backed page cache the kernel can drop, so they are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python bench/x.py` puts bench/ first on sys.path, where bench/tokenize.py shadows the stdlib
# module torch imports.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(ROOT, "bench")]

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
import torch
from kiln.cli import run_main
from trainer.hf import import_hf

def anon():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
peak, done = [0], []
def sample():
    while not done:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
if {mode!r} != "ours":
    import transformers  # imported before the baseline, like ours
base = anon()
threading.Thread(target=sample, daemon=True).start()
if {mode!r} == "ours":
    assert run_main(import_hf.main, [{src!r}, "--out", {out!r}]) == 0
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained({src!r}, dtype=torch.bfloat16)
    torch.save(model.state_dict(), {out!r})
done.append(1)
time.sleep(0.01)
print(json.dumps({{"peak_bytes": max(peak[0], anon()) - base}}))
"""


def make_model(directory: str, hidden: int, layers: int, ffn: int, vocab: int) -> tuple[int, int]:
    """A Llama config + one bf16 safetensors file; returns (total bytes, largest tensor bytes)."""
    import torch
    from safetensors.torch import save_file

    heads, kv = hidden // 64, max(hidden // 256, 1)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (hidden, hidden),
                       p + "self_attn.k_proj.weight": (kv * 64, hidden),
                       p + "self_attn.v_proj.weight": (kv * 64, hidden),
                       p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (ffn, hidden),
                       p + "mlp.up_proj.weight": (ffn, hidden),
                       p + "mlp.down_proj.weight": (hidden, ffn)})
    tensors = {k: torch.randn(s, dtype=torch.bfloat16) for k, s in shapes.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
              "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    sizes = [t.numel() * t.element_size() for t in tensors.values()]
    return sum(sizes), max(sizes)


def measure(mode: str, src: str, out: str) -> int:
    code = CHILD.format(root=ROOT, mode=mode, src=src, out=out)
    env = dict(os.environ, KILN_LOG_LEVEL="WARNING", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "hf")
        os.makedirs(src)
        total, largest = make_model(src, args.hidden, args.layers, args.ffn, args.vocab)
        ours = measure("ours", src, os.path.join(tmp, "ckpt"))
        whole = measure("whole", src, os.path.join(tmp, "whole.pt"))
    mb = 1e6
    print(f"model {total / mb:.0f} MB (largest tensor {largest / mb:.0f} MB): import-hf peak "
          f"{ours / mb:.0f} MB, from_pretrained peak {whole / mb:.0f} MB")
    print(json.dumps({"model_mb": round(total / mb, 1), "largest_tensor_mb": round(largest / mb, 1),
                      "import_peak_mb": round(ours / mb, 1), "from_pretrained_peak_mb": round(whole / mb, 1),
                      "ratio": round(total / max(ours, 1), 2), "goal": 4.0}))


if __name__ == "__main__":
    main()
