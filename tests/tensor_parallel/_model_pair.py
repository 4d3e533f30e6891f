"""Build the tiny GPT twice, under two sets of config overrides, in a child process (the CPU
backend changes process-wide torch state) and check that one forward/backward gives the same loss
and the same gradient for every parameter. Returns, for each model, its module classes and the
autograd nodes its loss went through (which shows a fused path was taken, not fallen back from)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    from tensor_parallel import runtime
    from trainer.config import load_run_config
    from trainer.model import build_gpt_chunks

    runtime.init(tp=1, seed=3)
    tokens = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(32).expand(2, 32)
    def graph_nodes(root):
        seen, todo = set(), [root]
        while todo:
            node = todo.pop()
            if node is not None and node not in seen:
                seen.add(node)
                todo.extend(next_node for next_node, _ in node.next_functions)
        return {type(node).__name__ for node in seen}

    results = []
    for overrides in json.loads(sys.argv[1]):
        cfg = load_run_config("trainer/configs/tiny-pretrain.yaml", ["train.seq_length=32", *overrides])
        [model] = build_gpt_chunks(cfg, 256)
        loss = model(input_ids=tokens, position_ids=positions, attention_mask=None,
                     labels=tokens).sum()
        nodes = graph_nodes(loss.grad_fn)
        loss.backward()
        kinds = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules()}
                       | nodes)
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()], kinds))
    (loss_a, grads_a, _), (loss_b, grads_b, _) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6), (loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    print(json.dumps([kinds for _, _, kinds in results]))
    runtime.shutdown()
""")


def run_child(script: str, *args: str) -> str:
    """Run `script` in a fresh interpreter (repository importable); its stdout."""
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def same_model(overrides_a: list[str], overrides_b: list[str]) -> tuple[set[str], set[str]]:
    """Loss and gradients equal under both overrides; each model's module classes (by qualified
    name) and autograd node names."""
    out = run_child(SCRIPT, json.dumps([overrides_a, overrides_b]))
    kinds_a, kinds_b = json.loads(out.strip().splitlines()[-1])
    return set(kinds_a), set(kinds_b)
