"""Stored reference log-probs cover the rows a stage trains and validates on, nothing else."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.errors import DataError
from trainer.reference import ReferenceLogps


def test_lookup_refuses_rows_outside_the_computed_split(tmp_path):
    ref = ReferenceLogps(str(tmp_path / "r.arrow"), {"x": 1}, ["a", "b", "c", "d"],
                         ("chosen_logps", "rejected_logps"), rows=np.array([0, 2]))
    values = torch.full((4, 2), float("nan"), dtype=torch.float64)
    values[[0, 2]] = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]], dtype=torch.float64)
    ref.values = values
    assert ref.lookup(torch.tensor([2, 0])).tolist() == [[-3.0, -4.0], [-1.0, -2.0]]
    with pytest.raises(DataError, match="not computed"):
        ref.lookup(torch.tensor([0, 1]))
    ref._write(values)  # NaN rows survive the round trip through the Arrow file
    again = ReferenceLogps(str(tmp_path / "r.arrow"), {"x": 1}, ["a", "b", "c", "d"],
                           ("chosen_logps", "rejected_logps"), rows=np.array([0, 2]))
    stored = again._read()
    assert torch.equal(torch.isnan(stored), torch.isnan(values))
