"""The membership-inference audit's AUC."""

from __future__ import annotations

import torch

from simulations.mia import auc


def test_auc_extremes_and_chance():
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
    g = torch.Generator().manual_seed(0)
    same = auc(torch.randn(4000, generator=g), torch.randn(4000, generator=g))
    assert abs(same - 0.5) < 0.02
    shifted = auc(torch.randn(4000, generator=g) + 1.0, torch.randn(4000, generator=g))
    assert abs(shifted - 0.76) < 0.02  # Φ(1/√2) for unit-variance Gaussians one sd apart
