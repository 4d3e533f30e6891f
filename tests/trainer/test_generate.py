"""Generation: top-k/top-p filtering and sampling frequencies on fixed logits, left padding and
masks, and (in a child process on the CPU backend) greedy decoding with megatron's KV cache equal
to decoding without it, batched rows equal to single prompts, stopping at a stop token, and the
same tokens from two pipeline stages (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer.conftest import ROOT, child_env
from trainer.generate import (
    SamplingParams,
    attention_mask,
    filter_logits,
    left_pad,
    position_ids,
    sample_next,
)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0, 1.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log().unsqueeze(0)
    # sorted: 0.5, 0.3 (0.8), 0.1 (0.9), ... -> p=0.75 keeps two, p=0.85 keeps three
    assert torch.isfinite(filter_logits(logits, top_p=0.75)).sum() == 2
    assert torch.isfinite(filter_logits(logits, top_p=0.85)).tolist() == [
        [False, True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=1.0)).all()


def test_sampling_frequencies_follow_the_filtered_distribution():
    probs = torch.tensor([0.05, 0.5, 0.1, 0.3, 0.05])
    logits = probs.log().expand(20000, 5)
    gen = torch.Generator().manual_seed(0)
    ids = sample_next(logits, SamplingParams(top_p=0.85), gen)
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    expected = torch.tensor([0.0, 0.5, 0.1, 0.3, 0.0]) / 0.9
    assert torch.allclose(freq, expected, atol=0.015), freq
    ids = sample_next(logits, SamplingParams(top_k=2, temperature=2.0), gen)
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    tempered = torch.tensor([0.5, 0.3]).sqrt()  # p^(1/T) with T = 2, renormalised over the top 2
    assert freq[[0, 2, 4]].sum() == 0
    assert torch.allclose(freq[[1, 3]], tempered / tempered.sum(), atol=0.015), freq


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 0.2, 5.0], [3.0, 0.0, 0.0]])
    assert sample_next(logits, SamplingParams(greedy=True)).tolist() == [2, 0]


def test_left_padding_masks_and_positions():
    tokens, valid = left_pad([[5, 6, 7], [9]], pad_id=0)
    assert tokens.tolist() == [[5, 6, 7], [0, 0, 9]]
    assert position_ids(valid).tolist() == [[0, 1, 2], [0, 0, 0]]
    mask = attention_mask(valid, 3)  # True = masked
    assert mask.shape == (2, 1, 3, 3)
    assert (~mask[1, 0, 2]).tolist() == [False, False, True]  # the real token sees only itself
    assert (~mask[0, 0]).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    last = attention_mask(valid, 1)  # a decode step: the last query only
    assert (~last[1, 0, 0]).tolist() == [False, False, True]


# ---- megatron GPTModel in a child process -----------------------------------------------------

PROMPTS = [[5, 9, 17, 33], [7, 8], [40, 41, 42, 43, 44, 45], [11]]


def _child(pp: int = 1, out_dir: str | None = None) -> None:
    from tensor_parallel import runtime
    from trainer.config import RunConfig
    from trainer.generate import SamplingParams, generate
    from trainer.model import build_gpt_chunks

    cfg = RunConfig()
    cfg.model.num_query_groups = 2
    cfg.train.seq_length = 64
    cfg.parallel.pp = pp
    runtime.init(pp=pp)
    [model] = build_gpt_chunks(cfg, 128)  # seeded per layer: the same weights under any PP
    kw = {"max_new_tokens": 20, "vocab_size": 100, "pad_id": 0}
    cached = generate(model, PROMPTS, **kw)
    plain = generate(model, PROMPTS, use_cache=False, **kw)
    sampled = generate(model, PROMPTS, sampling=SamplingParams(temperature=1.5, top_k=50),
                       generator=torch.Generator().manual_seed(7), **kw)
    out = {"cached": cached.tokens.tolist(), "plain": plain.tokens.tolist(),
           "sampled": sampled.tokens.tolist(), "sampled_valid": sampled.valid.tolist()}
    if pp > 1:  # each stage writes what it ended with (two ranks' prints would interleave)
        Path(out_dir, f"rank{os.environ['RANK']}.json").write_text(json.dumps(out))
        runtime.shutdown()
        return
    singles = [generate(model, [p], **kw).completion_ids()[0] for p in PROMPTS]
    first = cached.completion_ids()[0]
    stop = next(t for i, t in enumerate(first) if i >= 2 and t not in first[:i])
    stopped = generate(model, PROMPTS, stop_ids=[stop], **kw)
    out |= {"batched": cached.completion_ids(), "singles": singles, "stop": stop,
            "stopped": stopped.completion_ids(), "stopped_valid": stopped.valid.tolist(),
            "training": model.training}
    runtime.shutdown()
    print("RESULT " + json.dumps(out))


@pytest.fixture(scope="module")
def megatron_generations() -> dict:
    proc = subprocess.run([sys.executable, __file__], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_greedy_with_kv_cache_equals_without(megatron_generations):
    g = megatron_generations
    assert g["cached"] == g["plain"]
    assert len(g["cached"][0]) == 6 + 20


@pytest.mark.slow
def test_left_padded_batch_rows_equal_single_prompts(megatron_generations):
    g = megatron_generations
    assert g["batched"] == g["singles"]
    assert all(max(ids) < 100 for ids in g["batched"])  # padded vocabulary never sampled
    assert g["training"]  # generation restores train mode


@pytest.mark.slow
def test_rows_stop_after_a_stop_token(megatron_generations):
    g = megatron_generations
    stop = g["stop"]
    for full, cut in zip(g["batched"], g["stopped"], strict=True):
        end = full.index(stop) + 1 if stop in full else len(full)
        assert cut == full[:end]
    n = len(g["stopped"][0])
    assert g["stopped"][0][-1] == stop and 3 <= n < 20
    assert sum(g["stopped_valid"][0]) == 4 + n  # prompt + generated, the rest padding


@pytest.mark.slow
def test_pipeline_parallel_generation_equals_one_stage(megatron_generations, tmp_path):
    """PP=2 (each forward through the pipeline schedule, the last stage sampling): every stage
    ends with the tokens one process decodes, with and without the KV cache and when sampling."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", __file__, "2", str(tmp_path)],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    stages = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert stages[0] == stages[1]
    one = megatron_generations
    for key in ("cached", "plain", "sampled", "sampled_valid"):
        assert stages[0][key] == one[key], key
    assert one["sampled"] != one["cached"]  # the sampled run is not the greedy one


if __name__ == "__main__":
    _child(*([int(sys.argv[1]), sys.argv[2]] if len(sys.argv) > 1 else []))
