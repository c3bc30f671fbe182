"""FedIT: FedAvg on the LoRA factors (Zhang et al., 2024, "Towards Building the Federated GPT").

``A = sum_k p_k A_k`` and ``B = sum_k p_k B_k``. Inexact for the product: the error is
``sum_k p_k B_k A_k - B A = sum_k p_k (B_k - B)(A_k - A)`` (docs/algorithms.md, FedIT).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fedft.aggregation._weights import (
    average_extras,
    check_updates,
    client_weights,
    weighted_mean,
)
from fedft.aggregation.base import Aggregator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["FedIT"]


class FedIT(Aggregator):
    """Average A and B separately by p_k (one rank and scaling for every client)."""

    name: ClassVar[str] = "fedit"
    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = True
    trainable: ClassVar[Parts] = "ab"

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return ``(sum p_k A_k, sum p_k B_k)`` per module and the p_k-mean of extras."""
        ups = check_updates(updates, algorithm=self.name, mixed_ranks=False)
        p = client_weights(ups)
        adapters: dict[str, LoraFactors] = {}
        for mod in sorted(ups[0].adapters):
            fs = [u.adapters[mod] for u in ups]
            adapters[mod] = LoraFactors(
                a=weighted_mean([f.a for f in fs], p),  # (r, in)
                b=weighted_mean([f.b for f in fs], p),  # (out, r)
                scaling=fs[0].scaling,
            )
        self._shapes = {mod: f.shape for mod, f in adapters.items()}
        return AggregationResult(
            adapters=adapters,
            metrics={"clients": float(len(ups))},
            extras=average_extras(ups, p),
        )
