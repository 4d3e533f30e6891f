"""Arrow shard loading, the resumable DP sampler and the collators' masking conventions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.errors import DataError
from tests.schemas.conftest import FINGERPRINT, make_dataset
from trainer.chat_data import (
    DistributedSampler,
    ShardSet,
    collate_preference,
    collate_sft,
    collate_unpaired,
    kept_responses,
    kl_partners,
    trained_tokens,
)

SAMPLES = Path(__file__).resolve().parents[2] / "trainer" / "configs" / "data"


def test_shard_set_reads_rows_and_refuses_mismatches(tmp_path):
    d = make_dataset(str(tmp_path / "p"), "preference")
    ds = ShardSet(d, ["preference"], FINGERPRINT)
    assert len(ds) == 24 and ds.row(0)["id"] == "preference-0"
    with pytest.raises(DataError, match="tokenizer fingerprint .* does not match"):
        ShardSet(d, ["preference"], "0" * 64)
    with pytest.raises(DataError, match="this stage reads sft"):
        ShardSet(d, ["sft"], FINGERPRINT)
    with pytest.raises(DataError, match="no manifest.json"):
        ShardSet(str(tmp_path), ["sft"], None)


def test_sampler_resume_continues_at_the_exact_sample():
    full = DistributedSampler(50, 8, 0, 1, seed=3)
    seen = [full.next_global_batch() for _ in range(13)]  # crosses two epoch boundaries
    resumed = DistributedSampler(50, 8, 0, 1, seed=3, consumed_samples=5 * 8)
    again = [resumed.next_global_batch() for _ in range(8)]
    assert all(np.array_equal(a, b) for a, b in zip(seen[5:], again, strict=True))
    first_epoch = np.concatenate(seen[:6])
    assert len(set(first_epoch.tolist())) == 48  # no repeats within an epoch


def test_sampler_looks_ahead_without_consuming():
    sampler = DistributedSampler(50, 8, 1, 2, seed=3)
    ahead = [sampler.global_batch(k * 8) for k in range(13)]  # crosses two epoch boundaries
    assert sampler.state.consumed_samples == 0
    assert all(np.array_equal(a, sampler.next_global_batch()) for a in ahead)


def test_kl_partners_rotate_completions_within_blocks_as_trl():
    # TRL: (x1, y1) ... (xk, yk) -> (x1, yk), (x2, y1) ... per block; a short last block too
    rows = np.arange(10) + 5
    assert kl_partners(rows, 4).tolist() == [8, 5, 6, 7, 12, 9, 10, 11, 14, 13]
    assert kl_partners(rows[:1], 4).tolist() == [5]


def test_sampler_dp_ranks_partition_each_global_batch():
    single = DistributedSampler(40, 8, 0, 1, seed=1).next_global_batch()
    parts = [DistributedSampler(40, 8, r, 4, seed=1).next_global_batch() for r in range(4)]
    assert np.array_equal(np.concatenate(parts), single)
    with pytest.raises(DataError, match="not divisible"):
        DistributedSampler(40, 6, 0, 4, seed=1)


def test_sft_collate_shifts_labels_and_mask():
    row = {"input_ids": np.array([2, 5, 10, 11, 7, 6, 20, 21, 7, 3]),
           "loss_mask": np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1])}
    b = collate_sft([row], None, pad_id=0)
    assert b.tokens.shape == (1, 16)
    assert b.labels[0, :9].tolist() == row["input_ids"][1:].tolist()
    # trained on predicting 20, 21, <|end|>, </s>: targets at positions 5..8
    assert b.loss_mask[0].nonzero()[0].tolist() == [5, 6, 7, 8]


def test_packed_rows_keep_attention_positions_and_loss_inside_each_conversation():
    a = [2, 5, 10, 7, 6, 11, 7, 3]
    c = [2, 5, 12, 13, 7, 6, 14, 7, 3]
    row = {"input_ids": np.array(a + c), "loss_mask": np.array([0, 0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 0, 0, 0, 1, 1, 1]),
           "seq_boundaries": np.array([0, len(a), len(a) + len(c)])}
    b = collate_sft([row], 24, pad_id=0)
    m = b.attention_mask[0, 0]
    n = len(a)
    assert m[n:, :n].all(), "second conversation must not attend to the first"
    assert not m[n + 3, n:n + 4].any() and m[n + 3, n + 4:].all()
    assert b.position_ids[0, n] == 0 and b.position_ids[0, n - 1] == n - 1
    # the target at the boundary (first token of conversation 2) carries no loss
    assert b.loss_mask[0, n - 1] == 0


def test_preference_and_unpaired_collate_layout():
    rows = [{"prompt_ids": np.array([2, 5, 9, 7, 6]), "chosen_ids": np.array([30, 7, 3]),
             "rejected_ids": np.array([31, 32, 7, 3]), "margin": None}] * 2
    b = collate_preference(rows, None, pad_id=0)
    assert b.tokens.shape[0] == 4
    assert b.loss_mask[0].sum() == 3 and b.loss_mask[2].sum() == 4
    un = [{"prompt_ids": np.array([2, 5, 6]), "completion_ids": np.array([40 + i, 3]), "label": i % 2 == 0}
          for i in range(3)]
    k = collate_unpaired(un, un[1:] + un[:1], None, pad_id=0)
    assert k.tokens.shape[0] == 6 and k.extra["label"].tolist() == [True, False, True]
    assert k.labels[3, 2] == 41  # KL pair 0 uses completion 1


@pytest.mark.parametrize("seq_len", [24, 40, 64, 128])
def test_cut_counts_equal_what_the_collators_train_on(seq_len):
    """The stages' report of rows cut by train.seq_length (and which keep nothing) is column
    arithmetic; it must count exactly the loss-mask tokens the collators emit."""
    pref = ShardSet(str(SAMPLES / "sample-preference"), ["preference"], None)
    rows = pref.rows(range(len(pref)))
    mask = collate_preference(rows, None, 0, max_len=seq_len).loss_mask.sum(1)
    for k, column in enumerate(("chosen_ids", "rejected_ids")):
        total, kept = kept_responses(pref.table.column("prompt_ids"), pref.table.column(column),
                                     seq_len)
        assert kept.tolist() == mask[k * len(rows):(k + 1) * len(rows)].astype(int).tolist()
        assert total.tolist() == [len(r[column]) for r in rows]
    sft = ShardSet(str(SAMPLES / "sample-sft"), ["sft"], None)
    rows = sft.rows(range(len(sft)))
    total, kept = trained_tokens(sft.table.column("loss_mask"), seq_len)
    assert kept.tolist() == collate_sft(rows, None, 0, max_len=seq_len).loss_mask.sum(1).astype(
        int).tolist()
    assert total.tolist() == [int(np.sum(r["loss_mask"][1:])) for r in rows]
    if seq_len < 64:
        assert (kept == 0).any() and (kept < total).any()  # the cases the report is for


def test_sampler_batches_stay_whole_when_a_resume_changes_the_global_batch():
    """176 samples consumed (at 16 per batch), resumed at 12 per batch over 180 rows: the epoch
    has 4 rows left, and the batch takes 8 from the next epoch; each DP rank still gets 6."""
    ranks = [DistributedSampler(180, 12, r, 2, seed=1, consumed_samples=176) for r in (0, 1)]
    first = [next(iter(s)) for s in ranks]
    assert [len(b) for b in first] == [6, 6]
    order = [ranks[0]._order(e) for e in (0, 1)]
    assert np.concatenate(first).tolist() == [*order[0][176:], *order[1][:8]]
