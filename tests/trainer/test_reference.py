"""Reference log-probs: stored ones cover the rows a stage trains and validates on, nothing else;
the online reference (a frozen copy of the starting model) gives the precomputed losses, also
after a resume; the option is checked."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kiln.errors import ConfigError, DataError
from tests.trainer.conftest import metrics, run_trainings
from tests.trainer.post_helpers import config
from trainer.config import load_run_config
from trainer.reference import StoredReference

# 4 steps without warm-up (the policy leaves the reference at once), one LR schedule for the
# 4-step runs and the 2-step start of the resumed one, validation after the last step
STEPS = ["train.steps=4", "schedule.warmup_steps=0", "schedule.decay_steps=4", "train.eval_every=0",
         "checkpoint.save=false"]


def test_lookup_refuses_rows_outside_the_computed_split(tmp_path):
    ref = StoredReference(None, str(tmp_path / "r.arrow"), {"x": 1}, ["a", "b", "c", "d"],
                          ("chosen_logps", "rejected_logps"), rows=np.array([0, 2]))
    values = torch.full((4, 2), float("nan"), dtype=torch.float64)
    values[[0, 2]] = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], dtype=torch.float64)
    ref.values = values
    assert ref.lookup(torch.tensor([2, 0])).tolist() == [[-3.0, -4.0], [-1.0, -2.0]]
    with pytest.raises(DataError, match="not computed"):
        ref.lookup(torch.tensor([0, 1]))
    ref._write(values)  # NaN rows survive the round trip through the Arrow file
    again = StoredReference(None, str(tmp_path / "r.arrow"), {"x": 1}, ["a", "b", "c", "d"],
                            ("chosen_logps", "rejected_logps"), rows=np.array([0, 2]))
    stored = again._read()
    assert torch.equal(torch.isnan(stored), torch.isnan(values))


def test_unknown_reference_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="'dpo.reference'.*'precomputed', 'online'"):
        load_run_config(config("dpo"), ["dpo.reference=offline"])
    assert load_run_config(config("kto"), ["kto.reference=online"]).kto.reference == "online"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    ckpt = f"checkpoint.dir={out / 'resume_checkpoints'}"
    init = f"init.checkpoint={out / 'resume_checkpoints'}"
    online = ["dpo.reference=online"]
    run_trainings(out, {
        "dpo_precomputed": [config("dpo"), *STEPS],
        "dpo_online": [config("dpo"), *STEPS, *online],
        "kto_precomputed": [config("kto"), *STEPS],
        "kto_online": [config("kto"), *STEPS, "kto.reference=online"],
        # the same online run, stopped after 2 steps and resumed from its checkpoint
        "dpo_first": [config("dpo"), *STEPS, *online, "train.steps=2", "checkpoint.save=true",
                      ckpt],
        "dpo_resumed": [config("dpo"), *STEPS, *online, ckpt],
        # both references start from an init checkpoint (the 2-step one)
        "dpo_init_precomputed": [config("dpo"), *STEPS, init],
        "dpo_init_online": [config("dpo"), *STEPS, *online, init],
        # evaluated before any step: the starting model is the reference
        "dpo_unstepped": [config("dpo"), *STEPS, "train.steps=0"],
        "kto_unstepped": [config("kto"), *STEPS, "train.steps=0"],
        "kto_unstepped_online": [config("kto"), *STEPS, "train.steps=0", "kto.reference=online"],
    })
    return out


def _series(run: Path, key: str) -> list[float]:
    return [r[key] for r in metrics(run) if key in r]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_online_reference_gives_the_precomputed_losses(runs: Path, stage: str) -> None:
    pre, online = runs / f"{stage}_precomputed", runs / f"{stage}_online"
    assert (pre / "reference_logps.arrow").exists()
    assert not (online / "reference_logps.arrow").exists()  # nothing stored
    for key in ("loss", "val_loss", "reward_margin"):
        expected = _series(pre, key)
        assert len(expected) == (1 if key.startswith("val") else 4), key
        assert _series(online, key) == pytest.approx(expected, abs=1e-6, rel=0), key
    # the policy left the reference: a reference that moved with it would give log 2 (DPO)
    if stage == "dpo":
        assert abs(_series(online, "loss")[-1] - math.log(2)) > 1e-3


@pytest.mark.slow
def test_online_reference_loads_the_init_checkpoint(runs: Path) -> None:
    pre, online = runs / "dpo_init_precomputed", runs / "dpo_init_online"
    # the first step's policy is the reference: log 2 only if both hold the checkpoint's weights
    assert _series(online, "loss")[0] == pytest.approx(math.log(2), abs=1e-6)
    assert _series(online, "loss")[1] != pytest.approx(_series(runs / "dpo_online", "loss")[1])
    for key in ("loss", "val_loss"):
        assert _series(online, key) == pytest.approx(_series(pre, key), abs=1e-6, rel=0), key


@pytest.mark.slow
def test_online_reference_resumes_to_the_uninterrupted_losses(runs: Path) -> None:
    whole = metrics(runs / "dpo_online")
    first, resumed = metrics(runs / "dpo_first"), metrics(runs / "dpo_resumed")
    assert [r["step"] for r in first] == [1, 2] and [r["step"] for r in resumed] == [3, 4]
    assert [r["loss"] for r in first + resumed] == pytest.approx(
        [r["loss"] for r in whole], abs=1e-6, rel=0)
    assert resumed[-1]["val_loss"] == pytest.approx(whole[-1]["val_loss"], abs=1e-6, rel=0)


@pytest.mark.slow
def test_a_run_with_no_steps_scores_the_precomputed_reference_to_evaluate(runs: Path) -> None:
    """`train.steps=0` evaluates the starting model, which is the reference: the precomputed
    values are scored and stored then (not refused as missing), and give the online losses."""
    def evaluation(run: str) -> dict:
        return json.loads((runs / run / "eval.json").read_text())

    dpo = evaluation("dpo_unstepped")
    assert dpo["step"] == 0 and dpo["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert dpo["val_reward_margin"] == 0.0
    assert (runs / "dpo_unstepped" / "reference_logps.arrow").exists()
    kto, kto_online = evaluation("kto_unstepped"), evaluation("kto_unstepped_online")
    assert kto == pytest.approx(kto_online, abs=1e-6, rel=0)


def test_stored_values_are_recomputed_when_sequences_are_cut_elsewhere(tmp_path, caplog):
    """`train.seq_length` decides how many response tokens are scored: stored log-probs made
    at another length are not reused."""
    from trainer.reference import reference_identity

    made = reference_identity(load_run_config(config("dpo"), []), [])
    shorter = reference_identity(load_run_config(config("dpo"), ["train.seq_length=48"]), [])
    path, ids, columns = str(tmp_path / "r.arrow"), ["a", "b"], ("chosen_logps", "rejected_logps")
    StoredReference(None, path, made, ids, columns)._write(torch.zeros(2, 2, dtype=torch.float64))
    assert StoredReference(None, path, made, ids, columns)._read() is not None
    with caplog.at_level("WARNING"):
        assert StoredReference(None, path, shorter, ids, columns)._read() is None
    assert "seq_length differ" in caplog.text
