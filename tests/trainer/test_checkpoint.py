"""Checkpoints: a run killed (-9) after or during a save resumes to exactly the same losses; a run
stopped by SIGTERM or its time limit saves at the step it stopped and resumes exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.trainer.conftest import ROOT, TINY, child_env, losses, metrics, run_layouts, val_loss

pytestmark = pytest.mark.slow

RUN = ["train.steps=30", "train.log_every=1", "train.eval_every=0", "train.save_every=3"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "trainer" / "main.py"), "--config", TINY,
           "--set", *RUN, f"run_dir={run_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    """SIGKILL the run's whole process group as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "timed out waiting to kill the run"
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def resume(run_dir: Path, *extra: str) -> None:
    proc = start(run_dir, *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    run_layouts(out, {"straight": ["checkpoint.save=false"]}, *RUN)
    return out / "straight"


def _latest(ckpt: Path) -> str:
    marker = ckpt / "latest"
    return marker.read_text().strip() if marker.exists() else ""


# checkpoint.async_save: the writes go on in a background process while training continues, and
# a checkpoint becomes `latest` only once written whole
SAVING = pytest.mark.parametrize("saving", [[], ["checkpoint.async_save=true"]],
                                 ids=["sync", "async"])


@SAVING
def test_sigkill_after_checkpoint_resumes_exactly(uninterrupted: Path, tmp_path: Path,
                                                  saving: list[str]) -> None:
    run = tmp_path / "killed"
    proc = start(run, *saving)
    kill_when(proc, lambda: _latest(run / "checkpoints") >= "step-00000006")
    killed_at = int(_latest(run / "checkpoints").removeprefix("step-"))
    assert killed_at < 30
    resume(run, *saving)
    assert [r["step"] for r in metrics(run)] == list(range(1, 31))
    assert losses(run) == pytest.approx(losses(uninterrupted), abs=1e-6, rel=0)
    assert val_loss(run) == pytest.approx(val_loss(uninterrupted), abs=1e-6, rel=0)


@SAVING
def test_sigkill_during_save_keeps_previous_checkpoint(uninterrupted: Path, tmp_path: Path,
                                                       saving: list[str]) -> None:
    run = tmp_path / "killed_in_save"
    ckpt = run / "checkpoints"
    proc = start(run, "train.save_every=1", *saving)

    def saving_after_first() -> bool:
        return _latest(ckpt) != "" and any(p.name.startswith(".partial-") for p in ckpt.iterdir())

    kill_when(proc, saving_after_first)
    previous = _latest(ckpt)
    assert (ckpt / previous / "metadata.json").exists()
    resume(run, *saving)
    assert losses(run) == pytest.approx(losses(uninterrupted), abs=1e-6, rel=0)
    assert not any(p.name.startswith(".partial-") for p in ckpt.iterdir())


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not ((run / "metrics.jsonl").exists() and len(metrics(run)) >= step):
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out waiting for the run's steps"
        time.sleep(0.05)


def stopped_cleanly(proc: subprocess.Popen, run: Path, reason: str) -> int:
    """The step the run stopped after: its metrics written, its checkpoint the latest."""
    try:
        _, err = proc.communicate(timeout=120)  # a stop takes seconds; ranks that disagree hang
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the run did not stop: {proc.communicate()[1][-3000:]}")
    stopped = metrics(run)[-1]["step"]
    assert f"stopped after step {stopped} ({reason})" in err, err[-3000:]
    assert _latest(run / "checkpoints") == f"step-{stopped:08d}"
    assert (run / "checkpoints" / f"step-{stopped:08d}" / "metadata.json").exists()
    assert [r["step"] for r in metrics(run)] == list(range(1, stopped + 1))
    assert metrics(run)[-1]["stopped"] == reason
    assert not any("stopped" in r for r in metrics(run)[:-1])
    return stopped


def test_sigterm_stops_after_the_step_with_a_checkpoint(uninterrupted: Path, tmp_path: Path) -> None:
    """A scheduler's SIGTERM: the step finishes, a checkpoint is saved (saves are otherwise only
    at the end here), the run exits 143 and the same command continues exactly."""
    run = tmp_path / "preempted"
    proc = start(run, "train.save_every=0")
    wait_for_step(proc, run, 4)
    os.killpg(proc.pid, signal.SIGTERM)
    stopped = stopped_cleanly(proc, run, "received SIGTERM")
    assert proc.returncode == 128 + signal.SIGTERM
    assert 4 <= stopped < 30
    resume(run)
    assert [r["step"] for r in metrics(run)] == list(range(1, 31))
    assert losses(run) == pytest.approx(losses(uninterrupted), abs=1e-6, rel=0)
    assert val_loss(run) == pytest.approx(val_loss(uninterrupted), abs=1e-6, rel=0)


def test_time_limit_stops_cleanly_and_resumes(uninterrupted: Path, tmp_path: Path) -> None:
    """`train.time_limit_minutes` (here less than the start-up takes): a planned stop after the
    first step, exit 0, and the run continues exactly without the limit."""
    run = tmp_path / "timed"
    proc = start(run, "train.time_limit_minutes=0.0001")
    assert stopped_cleanly(proc, run, "train.time_limit_minutes reached") == 1
    assert proc.returncode == 0
    resume(run)
    assert losses(run) == pytest.approx(losses(uninterrupted), abs=1e-6, rel=0)


def _worker_of_rank(agent: int, rank: int) -> int:
    """The pid of torchrun's worker with this RANK (its children, by their environment)."""
    for child in Path(f"/proc/{agent}/task/{agent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker with RANK={rank} under torchrun {agent}")


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(uninterrupted: Path,
                                                                    tmp_path: Path) -> None:
    """SIGTERM to rank 1 alone (rank 0 writes metrics and the `latest` marker): the ranks agree,
    save one complete checkpoint after the same step and stop; torchrun resumes it exactly.
    With async saves across two ranks: the stop waits for the background writes."""
    run = tmp_path / "dp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "trainer" / "main.py"), "--config", TINY, "--set", *RUN,
           "checkpoint.async_save=true", "train.save_every=0", f"run_dir={run}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_step(proc, run, 3)
    os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)
    stopped = stopped_cleanly(proc, run, "received SIGTERM")
    assert proc.returncode != 0  # the workers exit 143; torchrun, seeing non-zero workers, 1
    assert stopped < 30
    cmd.remove("train.save_every=0")
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert [r["step"] for r in metrics(run)] == list(range(1, 31))
    # DP=2 against DP=1: the gradient sums' order differs, ~2e-6 relative after 30 steps; a
    # resume off by one batch or a lost Adam state moves the losses by 1e-2 and more
    assert losses(run) == pytest.approx(losses(uninterrupted), rel=1e-5, abs=0)


def test_loss_falls_below_unigram_entropy(tmp_path: Path) -> None:
    """A short run learns more than token frequencies: loss well below the unigram entropy."""
    import numpy as np

    data = ROOT / "trainer" / "configs" / "data" / "sample-pretrain"
    tokens = np.concatenate([np.fromfile(p, dtype=np.uint16) for p in sorted(data.glob("*.bin"))])
    p = np.bincount(tokens) / tokens.size
    entropy = float(-(p[p > 0] * np.log(p[p > 0])).sum())
    run_layouts(tmp_path, {"learn": ["checkpoint.save=false"]})
    assert val_loss(tmp_path / "learn") < entropy - 0.4


# Resume under another layout: 3 steps saved under one layout, 3 more under another, compared with
# 6 uninterrupted steps at TP=PP=DP=1. lr 5e-3: a restart of Adam's moments moves the losses after
# the resume by ~0.2 (test_switching_optimizer_restarts_moments), far beyond the tolerance.
RESHARD = ["train.steps=6", "train.log_every=1", "train.eval_every=0", "schedule.decay_steps=6",
           "checkpoint.save=false"]
SAVE_AT_3 = ["train.steps=3", "checkpoint.save=true"]
PLAIN = "parallel.distributed_optimizer=false"
FOUR = "model.num_layers=4"

# name -> (saving ranks, saving overrides, resuming ranks, resuming overrides, reference run)
RESHARDS = {
    "tp2_to_tp1": (2, ["parallel.tp=2"], 1, [], "ref"),
    "pp2_to_pp1": (2, ["parallel.pp=2"], 1, [], "ref"),
    "dp2_to_dp1": (2, [], 1, [], "ref"),
    "tp1_to_tp2": (1, [], 2, ["parallel.tp=2"], "ref"),
    "plain_tp2_to_tp1": (2, ["parallel.tp=2", PLAIN], 1, [PLAIN], "ref"),
    "plain_tp1_to_pp2": (1, [PLAIN], 2, ["parallel.pp=2", PLAIN], "ref"),
    "plain_vpp2_to_pp1": (2, ["parallel.pp=2", "parallel.vpp=2", FOUR, PLAIN], 1, [FOUR, PLAIN],
                          "ref4"),
    "cp2_to_cp2": (2, ["parallel.cp=2"], 2, ["parallel.cp=2"], "ref"),  # RNG keyed by CP rank
    "cp2_to_cp1": (2, ["parallel.cp=2"], 1, [], "ref"),
    "dp2_parallel_load": (2, [], 2, ["checkpoint.fully_parallel_load=true"], "ref"),
    "switch_optimizer": (1, [], 1, [PLAIN], "ref"),  # the one case where moments restart
}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> Path:
    """Save runs, then resumes (each in its own run dir, reading the save run's checkpoints)."""
    out = tmp_path_factory.mktemp("reshard")
    saves = {n: {f"save_{name}": [*o, *SAVE_AT_3] for name, (s, o, *_) in RESHARDS.items() if s == n}
             for n in (1, 2)}
    resumes = {n: {name: [*o, f"checkpoint.dir={out / f'save_{name}' / 'checkpoints'}"]
                   for name, (_, _, r, o, _) in RESHARDS.items() if r == n} for n in (1, 2)}
    run_layouts(out, {"ref": [], "ref4": [FOUR], **saves[1]}, *RESHARD)
    run_layouts(out, {**saves[2], **resumes[2]}, *RESHARD, nproc=2)
    run_layouts(out, resumes[1], *RESHARD)
    return out


@pytest.mark.parametrize("name", [n for n in RESHARDS if n != "switch_optimizer"])
def test_resume_under_another_layout_continues_exactly(resharded: Path, name: str) -> None:
    """Weights, Adam's moments, schedule and data position all carry over to the new layout."""
    ref = resharded / RESHARDS[name][-1]
    assert [r["step"] for r in metrics(resharded / name)] == [4, 5, 6]
    assert losses(resharded / name) == pytest.approx(losses(ref)[3:], abs=1e-5, rel=0)
    assert val_loss(resharded / name) == pytest.approx(val_loss(ref), abs=1e-5, rel=0)


def test_data_parallel_ranks_share_the_writes(resharded: Path) -> None:
    """checkpoint.fully_parallel_save: at DP=2 each rank writes about half of the tensor bytes
    (without it DP rank 0 writes nearly all), and the resumes above read them back."""
    step = resharded / "save_dp2_to_dp1" / "checkpoints" / "step-00000003"
    written = [sum(f.stat().st_size for f in step.glob(f"__{rank}_*.distcp")) for rank in (0, 1)]
    assert min(written) > 0.4 * sum(written), written


def test_switching_optimizer_restarts_moments(resharded: Path) -> None:
    """Distributed -> plain optimizer keeps weights but not moments: the losses after step 4 move."""
    got, ref = losses(resharded / "switch_optimizer"), losses(resharded / "ref")[3:]
    assert got[0] == pytest.approx(ref[0], abs=1e-5, rel=0)  # the weights carried over
    assert abs(got[1] - ref[1]) > 1e-2


def test_a_latest_marker_naming_a_missing_checkpoint_is_an_error(tmp_path: Path) -> None:
    """Not a silent restart from step 0, which would prune the checkpoints that are there."""
    from kiln.errors import DataError
    from trainer.checkpoint import latest_checkpoint

    (tmp_path / "step-00000004").mkdir()
    (tmp_path / "step-00000004" / "metadata.json").write_text("{}")
    (tmp_path / "step-00000006").mkdir()  # a directory that never became a checkpoint
    for name in ("step-00000009", "step-00000006", ""):
        (tmp_path / "latest").write_text(name + "\n")
        with pytest.raises(DataError, match=f"latest names {name or 'nothing'}, which is missing "
                           "or not a complete checkpoint; the checkpoints there: step-00000004\\."):
            latest_checkpoint(str(tmp_path))
    (tmp_path / "latest").write_text("step-00000004\n")
    assert latest_checkpoint(str(tmp_path)) == str(tmp_path / "step-00000004")
    assert latest_checkpoint(str(tmp_path / "nothing-yet")) is None
