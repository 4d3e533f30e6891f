"""trainer.losses against TRL 1.16's own loss code: values, gradients and logged metrics.

The reference is TRL's real code (see ``_trl_reference``): ``DPOTrainer._compute_loss``,
``KTOTrainer._compute_loss``, ``RewardTrainer.compute_loss``, and the experimental ORPO and CPO
trainers' ``get_batch_loss_metrics`` called unbound with a minimal ``self`` and a stand-in for the
model forward that returns the log-probs we choose. Inputs are float64 per-token log-probs; each
side turns them into its own per-sequence quantities, so gradients are compared on the same
per-token leaves. cDPO, which TRL 1.16 no longer offers under ``sigmoid``, is checked against the
same expression in TRL's ``aot`` loss applied pair by pair. SFT is checked against
``torch.nn.functional.cross_entropy`` and against transformers' ``ForCausalLMLoss``, which TRL's
SFTTrainer uses.
"""

from __future__ import annotations

from decimal import Decimal, localcontext

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.loss.loss_utils import ForCausalLMLoss

from tests.trainer._trl_reference import (
    trl_cdpo,
    trl_dpo,
    trl_kto,
    trl_orpo,
    trl_reward,
    trl_simpo,
)
from trainer import losses

DT = torch.float64
TOL = {"rtol": 1e-6, "atol": 1e-6}
SEEDS = [0, 1, 2]


def _close(ours: torch.Tensor | float, theirs: torch.Tensor | float) -> None:
    torch.testing.assert_close(torch.as_tensor(ours, dtype=DT), torch.as_tensor(theirs, dtype=DT), **TOL)


def _per_token_batch(seed: int, rows: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs [rows, length] (a leaf) and a response mask with at least one token."""
    g = torch.Generator().manual_seed(seed)
    per_token = (-3 * torch.rand(rows, length, generator=g, dtype=DT)).requires_grad_()
    prompt_len = torch.randint(0, length // 2, (rows,), generator=g)
    response_len = torch.randint(1, length + 1, (rows,), generator=g)
    positions = torch.arange(length)
    mask = ((positions >= prompt_len[:, None])
            & (positions < (prompt_len + response_len)[:, None])).to(DT)
    mask[mask.sum(1) == 0, -1] = 1.0
    return per_token, mask


def _pairs(seed: int, num_pairs: int = 4, length: int = 7):
    per_token, mask = _per_token_batch(seed, 2 * num_pairs, length)
    g = torch.Generator().manual_seed(seed + 100)
    ref = -3 * length * torch.rand(2 * num_pairs, generator=g, dtype=DT) / 2
    return per_token, mask, ref[:num_pairs], ref[num_pairs:]


def _ours_dpo(per_token, mask, ref_chosen, ref_rejected, **kwargs):
    num_pairs = ref_chosen.size(0)
    logps = losses.sequence_logps(per_token, mask)
    lengths = mask.sum(1)
    return losses.dpo_loss(logps[:num_pairs], logps[num_pairs:], ref_chosen, ref_rejected,
                           chosen_lengths=lengths[:num_pairs], rejected_lengths=lengths[num_pairs:],
                           **kwargs)


def _grad(loss: torch.Tensor, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, leaves, retain_graph=True)


DPO_CASES = [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.5, 0.0),
             ("hinge", 0.1, 0.0), ("hinge", 0.9, 0.0), ("robust", 0.1, 0.1), ("robust", 0.3, 0.4)]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("loss_type", "beta", "label_smoothing"), DPO_CASES)
def test_dpo_family_matches_trl_dpo_trainer(seed, loss_type, beta, label_smoothing):
    per_token, mask, ref_chosen, ref_rejected = _pairs(seed)
    theirs, their_metrics = trl_dpo(per_token, mask, ref_chosen, ref_rejected, beta=beta,
                                    loss_type=loss_type, label_smoothing=label_smoothing)
    ours, metrics = _ours_dpo(per_token, mask, ref_chosen, ref_rejected, beta=beta,
                              loss_type=loss_type, label_smoothing=label_smoothing)
    _close(ours, theirs)
    _close(_grad(ours, per_token)[0], _grad(theirs, per_token)[0])
    for key, trl_key in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                         ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")]:
        _close(metrics[key], their_metrics[trl_key])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("label_smoothing", [0.1, 0.3])
def test_cdpo_label_smoothing_matches_trl(seed, label_smoothing):
    per_token, mask, ref_chosen, ref_rejected = _pairs(seed)
    theirs = trl_cdpo(per_token, mask, ref_chosen, ref_rejected, beta=0.2,
                      label_smoothing=label_smoothing)
    ours, _ = _ours_dpo(per_token, mask, ref_chosen, ref_rejected, beta=0.2,
                        label_smoothing=label_smoothing)
    _close(ours, theirs)
    _close(_grad(ours, per_token)[0], _grad(theirs, per_token)[0])


def test_label_smoothing_changes_the_sigmoid_loss():
    per_token, mask, ref_chosen, ref_rejected = _pairs(0)
    plain, _ = _ours_dpo(per_token, mask, ref_chosen, ref_rejected, beta=0.2)
    smoothed, _ = _ours_dpo(per_token, mask, ref_chosen, ref_rejected, beta=0.2, label_smoothing=0.2)
    assert not torch.isclose(plain, smoothed)


@settings(max_examples=15, deadline=None)
@given(num_pairs=st.integers(1, 6), length=st.integers(2, 12), beta=st.floats(0.01, 2.0),
       seed=st.integers(0, 2**16), loss_type=st.sampled_from(["sigmoid", "ipo", "hinge"]))
def test_dpo_matches_trl_for_any_shape(num_pairs, length, beta, seed, loss_type):
    per_token, mask, ref_chosen, ref_rejected = _pairs(seed, num_pairs, length)
    theirs, _ = trl_dpo(per_token, mask, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type)
    ours, _ = _ours_dpo(per_token, mask, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type)
    _close(ours, theirs)
    _close(_grad(ours, per_token)[0], _grad(theirs, per_token)[0])


def test_dpo_rejects_bad_arguments():
    x = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="lengths"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        losses.dpo_loss(x, x, x, x, loss_type="exo")


def _avg_logps(seed: int, num_pairs: int = 5):
    per_token, mask = _per_token_batch(seed, 2 * num_pairs, 6)
    return per_token, mask, losses.sequence_logps(per_token, mask, average=True)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_orpo_trainer(seed, beta):
    per_token, mask, avg = _avg_logps(seed)
    # Averages near 0 exercise log1mexp's other branch (x > -log 2).
    avg = avg * torch.linspace(0.05, 1.0, avg.numel(), dtype=DT)
    chosen_nll = (-avg[:5]).mean() * 1.1
    theirs, their_metrics = trl_orpo(avg[:5], avg[5:], chosen_nll, beta=beta)
    ours, metrics = losses.orpo_loss(avg[:5], avg[5:], chosen_nll, beta=beta)
    _close(ours, theirs)
    _close(_grad(ours, per_token)[0], _grad(theirs, per_token)[0])
    for key, trl_key in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_accuracy", "rewards/accuracies"), ("reward_margin", "rewards/margins"),
                         ("nll_loss", "nll_loss"), ("log_odds_ratio", "log_odds_ratio"),
                         ("log_odds_chosen", "log_odds_chosen")]:
        _close(metrics[key], their_metrics[trl_key])


def test_log1mexp_is_stable_on_both_branches():
    points = [-1e-10, -1e-3, -0.5, -0.7, -5.0, -50.0]
    with localcontext() as ctx:  # 50 significant digits: the exact value to float64 precision
        ctx.prec = 50
        exact = [float((1 - Decimal(x).exp()).ln()) for x in points]
    torch.testing.assert_close(losses.log1mexp(torch.tensor(points, dtype=DT)),
                               torch.tensor(exact, dtype=DT), rtol=1e-14, atol=0)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("beta", "gamma", "label_smoothing"), [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0),
                                                                (2.0, 0.5, 0.1)])
def test_simpo_matches_trl_cpo_trainer(seed, beta, gamma, label_smoothing):
    per_token, mask, avg = _avg_logps(seed)
    theirs, their_metrics = trl_simpo(avg[:5], avg[5:], beta=beta, gamma=gamma,
                                      label_smoothing=label_smoothing)
    ours, metrics = losses.simpo_loss(avg[:5], avg[5:], beta=beta, gamma=gamma,
                                      label_smoothing=label_smoothing)
    _close(ours, theirs)
    _close(_grad(ours, per_token)[0], _grad(theirs, per_token)[0])
    _close(metrics["reward_margin"], their_metrics["rewards/margins"])
    _close(metrics["reward_accuracy"], their_metrics["rewards/accuracies"])


KTO_LABELS = [[1, 0, 1, 1, 0, 0], [1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("labels", KTO_LABELS)
@pytest.mark.parametrize("kl_shift", [-2.0, 2.0])  # negative: the KL baseline is clamped to 0
def test_kto_matches_trl_kto_trainer(seed, labels, kl_shift):
    per_token, mask = _per_token_batch(seed, 6, 7)
    kl_per_token, kl_mask = _per_token_batch(seed + 50, 6, 7)
    kl_per_token = kl_per_token.detach()
    g = torch.Generator().manual_seed(seed + 7)
    ref_logps = -6 * torch.rand(6, generator=g, dtype=DT)
    ref_kl_logps = losses.sequence_logps(kl_per_token, kl_mask) - kl_shift
    ref_kl_logps = ref_kl_logps + 0.3 * torch.randn(6, generator=g, dtype=DT)
    label_tensor = torch.tensor(labels)
    theirs, their_metrics = trl_kto(per_token, mask, kl_per_token, kl_mask, ref_logps, ref_kl_logps,
                                    label_tensor, beta=0.1, desirable_weight=1.0,
                                    undesirable_weight=1.33)
    kl = losses.kto_kl_baseline(losses.sequence_logps(kl_per_token, kl_mask), ref_kl_logps)
    ours, metrics = losses.kto_loss(losses.sequence_logps(per_token, mask), ref_logps,
                                    label_tensor.bool(), kl, beta=0.1, undesirable_weight=1.33)
    _close(ours, theirs)
    _close(_grad(ours, per_token)[0], _grad(theirs, per_token)[0])
    _close(metrics["kl"], their_metrics["kl"])
    assert (metrics["kl"] == 0) == (kl_shift < 0)
    for key, trl_key in [("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("reward_margin", "rewards/margins"), ("logps_chosen", "logps/chosen"),
                         ("logps_rejected", "logps/rejected")]:
        assert (key in metrics) == (trl_key in their_metrics)
        if key in metrics:
            _close(metrics[key], their_metrics[trl_key])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center", [None, 0.01])
def test_reward_model_loss_matches_trl_reward_trainer(seed, with_margin, center):
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randn(8, generator=g, dtype=DT).requires_grad_()
    rejected = torch.randn(8, generator=g, dtype=DT).requires_grad_()
    margin = torch.rand(8, generator=g, dtype=DT) if with_margin else None
    theirs, their_metrics = trl_reward(chosen, rejected, margin=margin,
                                       center_rewards_coefficient=center)
    ours, metrics = losses.reward_model_loss(chosen, rejected, margin=margin,
                                             center_rewards_coefficient=center)
    _close(ours, theirs)
    for a, b in zip(_grad(ours, chosen, rejected), _grad(theirs, chosen, rejected), strict=True):
        _close(a, b)
    _close(metrics["accuracy"], their_metrics["accuracy"])
    _close(metrics["margin"], their_metrics["margin"])
    _close(metrics["reward_mean"], their_metrics["mean_reward"])


def test_reward_margin_raises_the_loss():
    chosen, rejected = torch.tensor([1.0, 0.5], dtype=DT), torch.tensor([0.0, 0.7], dtype=DT)
    plain, _ = losses.reward_model_loss(chosen, rejected)
    with_margin, _ = losses.reward_model_loss(chosen, rejected, margin=torch.ones(2, dtype=DT))
    assert with_margin > plain


@pytest.mark.parametrize("seed", SEEDS)
def test_sft_loss_is_token_mean_cross_entropy(seed):
    g = torch.Generator().manual_seed(seed)
    vocab, batch, length = 11, 3, 9
    logits = torch.randn(batch, length, vocab, generator=g, dtype=DT, requires_grad=True)
    tokens = torch.randint(0, vocab, (batch, length), generator=g)
    loss_mask = torch.rand(batch, length - 1, generator=g) > 0.4
    targets = tokens[:, 1:]
    per_token = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets[..., None]).squeeze(-1)

    ours, metrics = losses.sft_loss(per_token, loss_mask)
    labels = targets.masked_fill(~loss_mask, -100)
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels.reshape(-1),
                                ignore_index=-100)
    _close(ours, reference)
    _close(_grad(ours, logits)[0], _grad(reference, logits)[0])
    assert metrics["num_tokens"] == loss_mask.sum()

    # Global normalisation: what transformers' causal-LM loss (used by TRL's SFTTrainer) computes
    # with num_items_in_batch; it upcasts to float32, hence the looser tolerance.
    global_tokens = torch.tensor(3 * int(loss_mask.sum()))
    ours_global, _ = losses.sft_loss(per_token, loss_mask, num_tokens=global_tokens)
    hf_labels = torch.cat([torch.full((batch, 1), -100), labels], dim=1)
    hf = ForCausalLMLoss(logits, hf_labels, vocab, num_items_in_batch=global_tokens)
    torch.testing.assert_close(ours_global.float(), hf, rtol=1e-5, atol=1e-6)
    nll_sum, count = losses.masked_nll(per_token, loss_mask)
    _close(nll_sum / count, ours)
