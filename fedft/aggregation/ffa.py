"""FFA-LoRA (Sun et al., ICLR 2024): A frozen and shared by seed, only B trained and averaged.

With one shared A, ``sum_k p_k s B_k A = s (sum_k p_k B_k) A``: averaging B is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedft.aggregation._weights import (
    average_extras,
    check_updates,
    client_weights,
    fresh_lora,
    weighted_mean,
)
from fedft.aggregation.base import Aggregator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["FFA"]


class FFA(Aggregator):
    """Average B by p_k; A is the shared, frozen init and must come back unchanged."""

    name: ClassVar[str] = "ffa"
    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = True
    trainable: ClassVar[Parts] = "b"

    def __init__(self) -> None:
        super().__init__()
        #: module -> the shared frozen A (r, in), fixed by init_global.
        self._a: dict[str, Tensor] = {}

    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Draw the shared A from ``generator`` (peft's init) and set B = 0."""
        self._remember_shapes(shapes)
        init = fresh_lora(shapes, rank=rank, scaling=scaling, generator=generator)
        self._a = {mod: f.a.clone() for mod, f in init.items()}
        return init

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return ``(A, sum p_k B_k)`` per module.

        Raises:
            ValueError: when a client's A differs from the shared one (it must stay frozen).
        """
        ups = check_updates(updates, algorithm=self.name, mixed_ranks=False)
        if self._a and set(ups[0].adapters) != set(self._a):
            raise ValueError(
                f"ffa: client {ups[0].client_id!r} adapts {sorted(ups[0].adapters)} but the "
                f"shared A covers {sorted(self._a)}"
            )
        p = client_weights(ups)
        adapters: dict[str, LoraFactors] = {}
        for mod in sorted(ups[0].adapters):
            fs = [u.adapters[mod] for u in ups]
            shared = self._a.get(mod, fs[0].a)
            for u, f in zip(ups, fs, strict=True):
                if f.a.shape != shared.shape or not torch.equal(f.a.to(shared.dtype), shared):
                    raise ValueError(
                        f"ffa: client {u.client_id!r} changed the frozen A of module {mod!r}; "
                        "FFA-LoRA trains only B"
                    )
            adapters[mod] = LoraFactors(
                a=shared.clone(),
                b=weighted_mean([f.b for f in fs], p),  # (out, r)
                scaling=fs[0].scaling,
            )
        self._shapes = {mod: f.shape for mod, f in adapters.items()}
        self._a = {mod: f.a.clone() for mod, f in adapters.items()}
        return AggregationResult(
            adapters=adapters,
            metrics={"clients": float(len(ups))},
            extras=average_extras(ups, p),
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the shapes and the shared frozen A of every module."""
        state = super().state_dict()
        state["a"] = {mod: a.clone() for mod, a in self._a.items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the shapes and the shared A."""
        super().load_state_dict(state)
        self._a = {str(mod): torch.as_tensor(a).clone() for mod, a in state["a"].items()}
