"""Each stage's loss equals the `trainer.losses` function applied to log-probs computed
independently (a plain log-softmax over logits gathered across TP=2) on the same batch; stored
reference log-probs equal the starting model's; packed rows give each conversation its own
log-probs, through the attention mask and through megatron's packed-sequence (THD) path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.trainer.conftest import ROOT, child_env

pytestmark = pytest.mark.slow

DRIVER = str(ROOT / "tests" / "trainer" / "post_loss_driver.py")
STAGES = ["sft", "sft_packed", "sft_packed_thd", "rm", "dpo_sigmoid", "dpo_ipo", "dpo_hinge", "dpo_robust", "orpo",
          "simpo", "kto"]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("post_losses") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           DRIVER, str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    flat: dict = {}  # {variant: {stage, independent}} and each case's own checks
    for name, case in json.loads(out.read_text()).items():
        flat.update({k: v for k, v in case.items() if isinstance(v, dict)})
        flat.setdefault(name, {}).update({k: v for k, v in case.items() if not isinstance(v, dict)})
    return flat


@pytest.mark.parametrize("name", STAGES)
def test_stage_loss_matches_independent_log_probs(results: dict, name: str) -> None:
    got = results[name]
    assert got["stage"] == pytest.approx(got["independent"], abs=1e-5, rel=1e-6)


def test_policy_left_the_reference(results: dict) -> None:
    """After one step the DPO loss is no longer log 2: the comparison above is not trivial."""
    assert abs(results["dpo_sigmoid"]["stage"] - 0.6931471805599453) > 1e-4


@pytest.mark.parametrize("name", ["dpo", "kto"])
def test_stored_reference_is_the_starting_model(results: dict, name: str) -> None:
    # sums of ~100 float32 token log-probs of magnitude ~300: float32 rounding, nothing more
    assert results[name]["reference_diff"] < 2e-4


@pytest.mark.parametrize(("name", "thd"), [("sft_packed", False), ("sft_packed_thd", True)])
def test_packed_conversations_do_not_see_each_other(results: dict, name: str, thd: bool) -> None:
    assert results[name]["cu_seqlens"] is thd  # the mask path, or megatron's packed-sequence path
    assert results[name]["packed_diff"] < 1e-5
