"""Vocab-parallel log-probs, entropy, KL and masked reductions against full-vocabulary references."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tensor_parallel.vocab_parallel import (
    masked_mean,
    masked_sum,
    resolve_group,
    vocab_parallel_entropy,
    vocab_parallel_kl_divergence,
    vocab_parallel_log_probs,
)


def test_tp1_matches_log_softmax_values_and_gradients():
    from tests.tensor_parallel._ops_tp_worker import Checker, check_bf16_logits, check_ops

    checker = Checker(0)
    check_ops(checker, None, 0, 1)
    check_bf16_logits(checker, None, 0, 1)
    assert checker.checks == 68
    assert checker.failures == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tp2_matches_a_single_rank_over_the_full_vocabulary():
    """Two gloo ranks: every op against torch on the full vocabulary, megatron's cross entropy,
    and megatron's sequence-parallel output layer feeding the log-probs; also the planner's
    per-rank parameter count against a TP=2 megatron GPTModel (sharing the costly start-up)."""
    from tests.tensor_parallel._ops_tp_worker import run

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [ctx.Process(target=run, args=(rank, 2, init, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        results = [queue.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    for rank, checks, failures in sorted(results):
        assert failures == [], "\n".join(failures)
        assert checks == 76, f"rank {rank} ran {checks} checks, expected 76"


def test_no_group_and_no_megatron_means_one_rank():
    assert resolve_group(None) is None


def test_extreme_logits_stay_finite_and_exact():
    logits = torch.tensor([[1e30, -1e30, 0.0, 1e30], [-1e4, -1e4 + 1, float("-inf"), -1e4 + 2]],
                          dtype=torch.float32, requires_grad=True)
    targets = torch.tensor([0, 1])
    logp = vocab_parallel_log_probs(logits, targets)
    entropy = vocab_parallel_entropy(logits)
    want = torch.log_softmax(logits.detach(), -1).gather(-1, targets[:, None]).squeeze(-1)
    torch.testing.assert_close(logp, want)
    p = torch.softmax(logits.detach()[1], -1)[[0, 1, 3]]
    torch.testing.assert_close(entropy, torch.stack([torch.log(torch.tensor(2.0)),
                                                     -(p * p.log()).sum()]))
    (logp.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1, 2] == 0  # a banned (-inf) token gets no gradient


def test_ignore_index_targets_give_finite_values_that_masking_removes():
    logits = torch.randn(2, 4, 8, requires_grad=True)
    targets = torch.tensor([[1, 2, -100, -100], [3, 4, 5, -100]])
    mask = targets >= 0
    logp = vocab_parallel_log_probs(logits, targets)
    assert torch.isfinite(logp).all()
    loss = -masked_mean(logp, mask).sum()
    loss.backward()
    assert (logits.grad[~mask] == 0).all() and (logits.grad[mask] != 0).any()
    want = torch.log_softmax(logits.detach(), -1)
    want = want.gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(-masked_mean(logp, mask).sum(), -masked_mean(want, mask).sum())


def test_kl_of_a_distribution_with_itself_is_zero():
    logits = torch.randn(3, 5, 11, dtype=torch.float64)
    kl = vocab_parallel_kl_divergence(logits, logits.clone(), temperature=0.5)
    torch.testing.assert_close(kl, torch.zeros(3, 5, dtype=torch.float64))


def test_masked_sum_and_mean_ignore_padding_even_if_it_is_nan():
    values = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0], [7.0, 8.0, 9.0]],
                          requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 0, 0]])
    torch.testing.assert_close(masked_sum(values, mask), torch.tensor([3.0, 10.0, 0.0]))
    mean = masked_mean(values, mask)
    torch.testing.assert_close(mean, torch.tensor([1.5, 5.0, 0.0]))  # empty row: 0, not NaN
    mean.sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5],
                                                          [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(masked_sum(values.detach(), mask.bool(), dim=(0, 1)),
                               torch.tensor(13.0))
    torch.testing.assert_close(masked_mean(values.detach(), mask, dim=0),
                               torch.tensor([2.5, 2.0, 6.0]))
    torch.testing.assert_close(masked_mean(values.detach(), mask, dim=None), torch.tensor(13 / 4))
    # A mask that broadcasts (one flag per row) counts every position it covers.
    torch.testing.assert_close(masked_mean(values.detach(), torch.tensor([[0], [0], [1]]), dim=None),
                               torch.tensor(8.0))


def test_bad_arguments_are_refused():
    logits = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="does not match"):
        vocab_parallel_log_probs(logits, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_entropy(logits, temperature=0.0)
