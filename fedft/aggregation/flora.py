"""FLoRA stacking (Wang et al., NeurIPS 2024) for heterogeneous ranks and scalings.

``A_stack = vstack(p_k s_k A_k)`` (sum r_k, in) and ``B_stack = hstack(B_k)`` (out, sum r_k)
give ``B_stack A_stack = sum_k p_k s_k B_k A_k`` exactly. The server folds this product
into the frozen base (sent here in factored form with scaling 1.0) and every client starts
the next round from a fresh LoRA at its own rank (A random, B = 0). The download grows
with sum r_k; callers may instead send the dense delta when that is smaller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch

from fedft.aggregation._weights import (
    average_extras,
    check_updates,
    client_weights,
    fresh_lora,
)
from fedft.aggregation.base import Aggregator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["FLoRA"]


class FLoRA(Aggregator):
    """Stack the clients' factors into an exact base delta; clients restart fresh."""

    name: ClassVar[str] = "flora"
    supports_mixed_ranks: ClassVar[bool] = True
    linear: ClassVar[bool] = False
    trainable: ClassVar[Parts] = "ab"

    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Remember the adapted shapes; there is no global adapter (returns ``{}``)."""
        if rank <= 0:
            raise ValueError(f"rank = {rank} is not allowed: a LoRA rank must be >= 1")
        self._remember_shapes(shapes)
        return {}

    def client_start(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Return a fresh LoRA (A kaiming-uniform, B = 0) at the client's rank and scaling."""
        if not self._shapes:
            raise ValueError("flora: call init_global(shapes, ...) before client_start")
        return fresh_lora(self._shapes, rank=rank, scaling=scaling, generator=generator)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return no adapters and ``base_delta = {module: (vstack p_k s_k A_k, hstack B_k)}``."""
        ups = check_updates(updates, algorithm=self.name, mixed_ranks=True)
        p = client_weights(ups)
        base: dict[str, LoraFactors] = {}
        for mod in sorted(ups[0].adapters):
            fs = [u.adapters[mod] for u in ups]
            a_stack = torch.cat(
                [(pk * f.scaling) * f.a for pk, f in zip(p, fs, strict=True)], dim=0
            )  # (sum r_k, in)
            b_stack = torch.cat([f.b for f in fs], dim=1)  # (out, sum r_k)
            base[mod] = LoraFactors(a=a_stack, b=b_stack, scaling=1.0)
        self._shapes = {mod: f.shape for mod, f in base.items()}
        return AggregationResult(
            adapters={},
            base_delta=base,
            metrics={"clients": float(len(ups)), "stacked_rank": float(base_rank(base))},
            extras=average_extras(ups, p),
        )


def base_rank(base: Mapping[str, LoraFactors]) -> int:
    """Return the largest stacked rank over modules (what the download scales with)."""
    return max(f.rank for f in base.values())
