"""`trainer/main.py`: argument forms, one-line config errors (exit 2), bad steps stop the run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, TINY, child_env, metrics
from trainer.main import parse_args

MAIN = str(ROOT / "trainer" / "main.py")


def test_set_takes_several_values_and_repeats() -> None:
    args = parse_args(["--config", "x.yaml", "--set", "a=1", "b=2", "--set", "c=3"])
    assert args.set == ["a=1", "b=2", "c=3"]


def run_main(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, MAIN, "--config", TINY, *argv], cwd=ROOT,
                          env=child_env(), capture_output=True, text=True, timeout=300)


def test_unknown_key_exits_2_naming_it_without_traceback() -> None:
    proc = run_main("--set", "model.hiden_size=3")
    assert proc.returncode == 2
    assert "config key 'model.hiden_size'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_impossible_layout_exits_2(tmp_path: Path) -> None:
    proc = run_main("--set", "parallel.tp=2", f"run_dir={tmp_path}")
    assert proc.returncode == 2
    assert "config key 'parallel.tp'" in proc.stderr and "Traceback" not in proc.stderr


def test_start_logs_the_memory_plan_of_its_layout(tmp_path: Path) -> None:
    """`kiln plan`'s estimate for the run, as Megatron-LM logs its theoretical memory."""
    proc = subprocess.run(
        [sys.executable, MAIN, "--config", TINY, "--set", "train.steps=1",
         "model.recompute=selective", "checkpoint.save=false", f"run_dir={tmp_path}"],
        cwd=ROOT, env=child_env() | {"KILN_LOG_LEVEL": "INFO"}, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [x for x in proc.stderr.splitlines() if "memory plan" in x]
    assert "(kiln plan, sdpa kernels): tp1 pp1 dp1, pipeline stage 0, 276,960 parameters" in line
    assert "activations (selective recompute)" in line and line.endswith(" MiB")


def test_memory_warning_names_the_plan_and_the_gpu() -> None:
    """On a GPU the trainer warns at start when the plan's peak exceeds the device's memory."""
    from tensor_parallel.layout import Layout
    from trainer.config import load_run_config
    from trainer.loop import memory_estimate, memory_warning

    cfg = load_run_config(TINY, ["model.recompute=full"])
    estimate, backend = memory_estimate(cfg, 257, Layout())
    assert backend == "sdpa"
    peak = estimate.peak(cfg.parallel.distributed_optimizer, "full")
    assert memory_warning(estimate, cfg, capacity=peak) is None
    warning = memory_warning(estimate, cfg, capacity=peak - 1)
    assert warning is not None and "exceeds this GPU's" in warning and "kiln plan" in warning
    # stages that train several models, or another head, have no single-model plan
    assert memory_estimate(load_run_config(TINY, ["stage=dpo"]), 257, Layout()) is None


@pytest.mark.slow
def test_diverging_run_skips_bad_steps_then_stops_naming_the_step(tmp_path: Path) -> None:
    """An absurd learning rate blows the weights up: NaN steps are skipped, then the run stops."""
    proc = run_main("--set", "optimizer.lr=1e30", "optimizer.min_lr=1e30", "schedule.warmup_steps=0",
                    "train.steps=20", "train.log_every=1", "checkpoint.save=false",
                    f"run_dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "consecutive steps had a NaN/Inf loss or gradient" in proc.stderr
    records = metrics(tmp_path)
    stopped_at = records[-1]["step"]
    assert f"stopping at step {stopped_at}:" in proc.stderr
    assert records[-1]["skipped_steps"] == 3 and stopped_at < 20


@pytest.mark.slow
def test_gpu_benchmark_trains_the_llama_1b_config(tmp_path: Path) -> None:
    """`bench/train_step.py --gpu`'s overrides of `llama-1b.yaml` (the distributed optimizer
    with overlapped grad reduce and param gather, bf16, the sample tokens) train; shrunk for the
    CPU."""
    from bench.train_step import gpu_overrides

    shrink = ["model.fp8=null", "model.num_layers=2",
              "model.hidden_size=64", "model.ffn_hidden_size=128", "model.num_attention_heads=4",
              "model.num_query_groups=2", "train.seq_length=64", "train.log_every=2"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "trainer" / "main.py"), "--config",
         str(ROOT / "trainer" / "configs" / "llama-1b.yaml"), "--set", *gpu_overrides(4, te=False),
         *shrink, "checkpoint.save=false", f"run_dir={tmp_path}"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [2, 4]
    assert records[-1]["consumed_samples"] == 32 and records[-1]["loss"] < records[0]["loss"] + 1


def test_profile_steps_write_a_trace_and_an_op_table(tmp_path: Path) -> None:
    common = ("train.steps=4", "train.log_every=1", "checkpoint.save=false",
              "train.profile_steps=[2,3]")
    proc = run_main("--set", *common, f"run_dir={tmp_path / 'on'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    profile = tmp_path / "on" / "profile"
    [trace] = profile.glob("rank0.*.pt.trace.json")
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "aten::mm" for e in events)
    table = (profile / "ops-rank0.txt").read_text()
    assert table.startswith("steps 2-3, rank 0") and "aten::mm" in table
    # a rank not listed writes nothing, and trains the same
    proc = run_main("--set", *common, "train.profile_ranks=[1]", f"run_dir={tmp_path / 'off'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "off" / "profile").exists()
    assert [r["loss"] for r in metrics(tmp_path / "off")] == [r["loss"] for r in metrics(tmp_path / "on")]


def test_a_slow_step_dumps_every_threads_stack(tmp_path: Path) -> None:
    """train.hang_dump_minutes (here 12 ms, well under a step): the stacks go to stderr while
    the step runs, and the run carries on to the end."""
    proc = run_main("--set", "train.steps=2", "train.log_every=1", "train.hang_dump_minutes=0.0002",
                    "checkpoint.save=false", f"run_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 1 has run for 0.0 min (train.hang_dump_minutes)" in proc.stderr
    assert "thread MainThread:" in proc.stderr and "in _train_steps" in proc.stderr
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]
    quiet = run_main("--set", "train.steps=1", "checkpoint.save=false", f"run_dir={tmp_path / 'off'}")
    assert quiet.returncode == 0 and "has run for" not in quiet.stderr


@pytest.mark.slow
def test_cpu_benchmark_runs_and_ends_with_its_json_line() -> None:
    """`bench/train_step.py` end to end, shrunk (no timing is asserted: the machine is shared)."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_step.py"), "--rounds", "1",
                           "--steps", "6"], cwd=ROOT, env=child_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["ours_tokens_per_s"] > 0 and last["hf_tokens_per_s"] > 0 and last["goal"] == 1.0
    assert last["ratio"] > 0 and last["best_ratio"] > 0


def test_logged_lr_is_the_one_each_step_applied_and_the_config_schedule_wins_on_resume(
        tmp_path: Path) -> None:
    """Megatron's schedule with 2 warm-up steps and cosine decay to step 4: steps 1-4 apply
    0, lr/2, lr, then half-way down. Resumed with train.steps=6 the decay follows the config
    (it used to keep the checkpoint's and sit at min_lr), and the change is said."""
    sched = ["optimizer.lr=1e-3", "optimizer.min_lr=1e-4", "schedule.warmup_steps=2",
             "train.log_every=1", "train.eval_every=0", "checkpoint.save=true",
             f"run_dir={tmp_path}"]
    assert run_main("--set", *sched, "train.steps=4").returncode == 0
    lrs = [r["lr"] for r in metrics(tmp_path) if "loss" in r]
    assert lrs == pytest.approx([0.0, 5e-4, 1e-3, 5.5e-4], abs=1e-12)
    proc = run_main("--set", *sched, "train.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "it follows the config from step 4 on: lr_decay_steps 4 -> 6" in proc.stderr
    lrs = [r["lr"] for r in metrics(tmp_path) if "loss" in r]
    assert lrs[4:] == pytest.approx([5.5e-4, 1e-4 + 9e-4 * 0.5 * (1 + math.cos(math.pi * 3 / 4))],
                                    abs=1e-12)
