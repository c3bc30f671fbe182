"""FedEx-LoRA (Singhal et al., 2025): FedIT plus the exact residual folded into the base.

Clients restart from the FedIT averages ``(A, B)``; the residual
``s * (sum_k p_k B_k A_k - B A)`` is folded into the frozen base weights, so the effective
global update is exactly ``s * sum_k p_k B_k A_k``. The residual is sent in factored form:
``a = vstack(p_1 A_1, ..., p_K A_K, A)`` (sum r + r, in) and
``b = hstack(B_1, ..., B_K, -B)`` (out, sum r + r) with the common scaling s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from fedft.aggregation._weights import (
    average_extras,
    check_updates,
    client_weights,
    weighted_mean,
)
from fedft.aggregation.base import Aggregator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["FedEx"]


class FedEx(Aggregator):
    """FedIT averages as the next adapters, plus the residual as an exact base delta."""

    name: ClassVar[str] = "fedex"
    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = False
    trainable: ClassVar[Parts] = "ab"

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return the FedIT adapters and the residual ``s(sum p_k B_k A_k - B A)`` factored."""
        ups = check_updates(updates, algorithm=self.name, mixed_ranks=False)
        p = client_weights(ups)
        adapters: dict[str, LoraFactors] = {}
        base: dict[str, LoraFactors] = {}
        for mod in sorted(ups[0].adapters):
            fs = [u.adapters[mod] for u in ups]
            a_bar = weighted_mean([f.a for f in fs], p)  # (r, in)
            b_bar = weighted_mean([f.b for f in fs], p)  # (out, r)
            adapters[mod] = LoraFactors(a=a_bar, b=b_bar, scaling=fs[0].scaling)
            a_res = torch.cat([pk * f.a for pk, f in zip(p, fs, strict=True)] + [a_bar], dim=0)
            b_res = torch.cat([f.b for f in fs] + [-b_bar], dim=1)  # (out, K r + r)
            base[mod] = LoraFactors(a=a_res, b=b_res, scaling=fs[0].scaling)
        self._shapes = {mod: f.shape for mod, f in adapters.items()}
        return AggregationResult(
            adapters=adapters,
            base_delta=base,
            metrics={"clients": float(len(ups))},
            extras=average_extras(ups, p),
        )
