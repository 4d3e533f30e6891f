"""The CPU backend: megatron's CUDA assumptions redirected to the CPU, and nothing else changed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tensor_parallel.cpu_backend import CpuRNGStatesTracker

ROOT = Path(__file__).resolve().parents[2]


def test_tracker_fork_uses_its_own_stream_and_restores_the_default() -> None:
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    outside = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside)  # default stream untouched
    with tracker.fork():
        second = torch.rand(3)
    expected = torch.rand(6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.cat([first, second]), expected)  # the forked stream continued


def test_tracker_refuses_duplicate_seeds_and_unknown_names() -> None:
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    for call in (lambda: tracker.add("b", 1), lambda: tracker.add("a", 2)):
        try:
            call()
        except RuntimeError:
            continue
        raise AssertionError("duplicate accepted")
    try:
        with tracker.fork("missing"):
            pass
    except RuntimeError:
        return
    raise AssertionError("unknown state forked")


SCRIPT = textwrap.dedent("""
    import torch
    from kiln.log import setup_logging
    from tensor_parallel import runtime
    setup_logging("INFO")
    runtime.init(tp=1, seed=5)
    from megatron.core import tensor_parallel as mp
    t = torch.zeros(2, device="cuda")
    assert t.device.type == "cpu", t.device
    assert t.cuda() is t
    assert t.type() == "torch.cuda.FloatTensor", t.type()
    assert torch.empty(1, device=torch.cuda.current_device()).device.type == "cpu"
    tracker = mp.get_cuda_rng_tracker()
    with tracker.fork():
        a = torch.rand(2)
    with tracker.fork("data-parallel-rng"):
        b = torch.rand(2)
    assert not torch.equal(a, b)
    # collectives over a group of one rank are answered in place
    import torch.distributed as dist
    from megatron.core.distributed import param_and_grad_buffer
    x = torch.arange(4.0)
    assert dist.all_reduce(x) is None and torch.equal(x, torch.arange(4.0))
    assert dist.all_reduce(x, op=dist.ReduceOp.MAX, async_op=True).wait()
    out = torch.zeros(4)
    dist.reduce_scatter_tensor(out, x * 2)
    assert torch.equal(out, x * 2)
    param_and_grad_buffer.dist_all_gather_func(out, x, group=dist.group.WORLD, async_op=True).wait()
    assert torch.equal(out, x)
    # the schedules' forward and backward steps run without the device mapping, the rest with it
    from types import SimpleNamespace
    from megatron.core.pipeline_parallel import schedules
    from tensor_parallel.cpu_backend import device_mapping_active
    assert device_mapping_active()
    seen = []
    class Model(torch.nn.Module):
        def set_input_tensor(self, tensor):
            pass
    def forward_step_func(data, model):
        seen.append(("forward", device_mapping_active()))
        w = torch.ones(3, requires_grad=True, device=torch.cuda.current_device())
        w.register_hook(lambda g: seen.append(("backward", device_mapping_active())))
        return (w * 2).sum(), lambda out: (out, torch.tensor(1), {"loss": out.detach()})
    config = SimpleNamespace(timers=None, enable_autocast=False, calculate_per_token_loss=False,
                             grad_scale_func=None, deallocate_pipeline_outputs=False)
    loss, _ = schedules.forward_step(forward_step_func, None, Model(), 1, None, [], config,
                                     cp_group_size=1, is_last_stage=True)
    schedules.backward_step(None, loss, None, None, config)
    assert seen == [("forward", False), ("backward", False)], seen
    assert device_mapping_active()
    runtime.shutdown()
    print("ok")
""")


def test_backend_maps_cuda_to_cpu_in_a_child_process() -> None:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")
    assert "CPU backend" in proc.stderr
