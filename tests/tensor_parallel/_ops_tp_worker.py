"""One rank of the TP=2 checks of `tensor_parallel.vocab_parallel` (spawned by the tests).

Every rank builds the same full-vocabulary logits, keeps its slice, runs the vocab-parallel op
and compares value and gradient with a single-rank `torch.log_softmax` computation on the full
vocabulary. Failures are collected as strings and put on the result queue, never raised, so the
test reports every mismatch at once.
"""

from __future__ import annotations

import traceback

import torch
import torch.distributed as dist

from tensor_parallel.vocab_parallel import (
    vocab_parallel_entropy,
    vocab_parallel_kl_divergence,
    vocab_parallel_log_probs,
    vocab_parallel_log_softmax,
    vocab_parallel_logsumexp,
)

TOL = {torch.float64: 1e-6, torch.float32: 1e-5}


class Checker:
    def __init__(self, rank: int) -> None:
        self.rank, self.failures, self.checks = rank, [], 0

    def close(self, name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
        self.checks += 1
        got, want = got.detach().double(), want.detach().double()
        if got.shape != want.shape or not torch.isfinite(got).all():
            self.failures.append(f"rank {self.rank} {name}: shape {tuple(got.shape)} vs "
                                 f"{tuple(want.shape)} or non-finite values")
            return
        err = ((got - want).abs() / want.abs().clamp(min=1.0)).max().item()
        if err > tol:
            self.failures.append(f"rank {self.rank} {name}: max error {err:.3g} > {tol:g}")


def _slice(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    shard = full.shape[-1] // tp
    return full[..., rank * shard:(rank + 1) * shard]


def _leaf(full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    return _slice(full, rank, tp).detach().clone().requires_grad_(True)


def check_ops(c: Checker, group: dist.ProcessGroup | None, rank: int, tp: int) -> None:
    for dtype in (torch.float64, torch.float32):
        tol = TOL[dtype]
        for scale, temperature in ((3.0, 1.0), (3.0, 0.7), (1e4, 1.0)):  # 1e4: extreme logits
            gen = torch.Generator().manual_seed(1234)
            full = (torch.randn(5, 3, 16, generator=gen, dtype=torch.float64) * scale).to(dtype)
            ref_full = (torch.randn(5, 3, 16, generator=gen, dtype=torch.float64) * scale).to(dtype)
            targets = torch.randint(0, 16, (5, 3), generator=gen)
            g = torch.randn(5, 3, generator=gen, dtype=torch.float64).to(dtype)
            g_vocab = torch.randn(5, 3, 16, generator=gen, dtype=torch.float64).to(dtype)
            tag = f"{dtype} scale={scale:g} T={temperature}"

            x = full.detach().clone().requires_grad_(True)
            ref_logp = torch.log_softmax(x / temperature, dim=-1)
            ref = ref_logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            (want_grad,) = torch.autograd.grad((ref * g).sum(), x)
            local = _leaf(full, rank, tp)
            got = vocab_parallel_log_probs(local, targets, group, temperature)
            (got_grad,) = torch.autograd.grad((got * g).sum(), local)
            c.close(f"log_probs value {tag}", got, ref, tol)
            c.close(f"log_probs grad {tag}", got_grad, _slice(want_grad, rank, tp), tol)

            ref_logp = torch.log_softmax(x / temperature, dim=-1)
            ref = -(ref_logp.exp() * ref_logp).sum(-1)
            (want_grad,) = torch.autograd.grad((ref * g).sum(), x)
            local = _leaf(full, rank, tp)
            got = vocab_parallel_entropy(local, group, temperature)
            (got_grad,) = torch.autograd.grad((got * g).sum(), local)
            c.close(f"entropy value {tag}", got, ref, tol)
            c.close(f"entropy grad {tag}", got_grad, _slice(want_grad, rank, tp), tol)

            ref = torch.logsumexp(x / temperature, dim=-1)
            (want_grad,) = torch.autograd.grad((ref * g).sum(), x)
            local = _leaf(full, rank, tp)
            got = vocab_parallel_logsumexp(local, group, temperature)
            (got_grad,) = torch.autograd.grad((got * g).sum(), local)
            c.close(f"logsumexp value {tag}", got, ref, tol)
            c.close(f"logsumexp grad {tag}", got_grad, _slice(want_grad, rank, tp), tol)

            ref = torch.log_softmax(x / temperature, dim=-1)
            (want_grad,) = torch.autograd.grad((ref * g_vocab).sum(), x)
            local = _leaf(full, rank, tp)
            got = vocab_parallel_log_softmax(local, group, temperature)
            (got_grad,) = torch.autograd.grad((got * _slice(g_vocab, rank, tp)).sum(), local)
            c.close(f"log_softmax value {tag}", got, _slice(ref, rank, tp), tol)
            c.close(f"log_softmax grad {tag}", got_grad, _slice(want_grad, rank, tp), tol)

            ref_logp = torch.log_softmax(x / temperature, dim=-1)
            y = ref_full.detach().clone().requires_grad_(True)
            log_q = torch.log_softmax(y / temperature, dim=-1)
            ref = (ref_logp.exp() * (ref_logp - log_q)).sum(-1)
            want_gx, want_gy = torch.autograd.grad((ref * g).sum(), (x, y))
            local, local_ref = _leaf(full, rank, tp), _leaf(ref_full, rank, tp)
            got = vocab_parallel_kl_divergence(local, local_ref, group, temperature)
            got_gx, got_gy = torch.autograd.grad((got * g).sum(), (local, local_ref))
            c.close(f"kl value {tag}", got, ref, tol)
            c.close(f"kl grad {tag}", got_gx, _slice(want_gx, rank, tp), tol)
            c.close(f"kl ref grad {tag}", got_gy, _slice(want_gy, rank, tp), tol)


def check_bf16_logits(c: Checker, group: dist.ProcessGroup | None, rank: int, tp: int) -> None:
    """bf16 logits (what the output layer produces on GPU) are reduced in fp32."""
    gen = torch.Generator().manual_seed(7)
    full = (torch.randn(4, 2, 16, generator=gen) * 4).to(torch.bfloat16)
    targets = torch.randint(0, 16, (4, 2), generator=gen)
    ref = torch.log_softmax(full.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    local = _leaf(full, rank, tp)
    got = vocab_parallel_log_probs(local, targets, group)
    got.sum().backward()
    c.close("bf16 log_probs value", got, ref, 1e-5)
    c.checks += 1
    if got.dtype != torch.float32 or local.grad.dtype != torch.bfloat16:
        c.failures.append(f"rank {rank} bf16: output {got.dtype}, grad {local.grad.dtype}")


def run(rank: int, world_size: int, init_method: str, queue) -> None:
    try:
        dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
        c = Checker(rank)
        check_ops(c, dist.group.WORLD, rank, world_size)
        check_bf16_logits(c, dist.group.WORLD, rank, world_size)
        from tests.tensor_parallel._ops_tp_megatron import check_megatron

        check_megatron(c, rank, world_size)
        queue.put((rank, c.checks, c.failures))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # reported to the test, which fails with the traceback
        queue.put((rank, 0, [traceback.format_exc()]))
