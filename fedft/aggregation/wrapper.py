"""The shared shell of every aggregator that composes around a linear one.

Wrappers (the robust estimators, the norm bound, user-level DP) never subclass an
algorithm: they hold one (``inner``), hand it the interface they do not change
(``init_global``, ``client_start``, its state) and upload what it trains (``trainable``).
The ones that measure a client's update against what every client started from keep that
reference here (:meth:`Wrapper.set_reference`, :meth:`Wrapper.reference_update`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedft.aggregation.base import Aggregator, clone_factors
from fedft.types import ClientUpdate, LoraFactors, Parts

__all__ = ["MissingReferenceError", "Wrapper"]


class MissingReferenceError(ValueError, RuntimeError):
    """``aggregate`` came before ``set_reference``: the wrapper cannot measure updates."""


class Wrapper(Aggregator):
    """An aggregator around a linear, single-rank one (fedit, fedsb, ffa).

    Args:
        inner: the linear aggregator whose math and result format the wrapper reuses.
    """

    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = False

    def __init__(self, inner: Aggregator) -> None:
        super().__init__()
        if not inner.linear or inner.supports_mixed_ranks:
            raise ValueError(
                f"{self.name} composes around a linear, single-rank aggregator (fedit, fedsb, "
                f"ffa); {inner.name!r} is not one"
            )
        self.inner = inner
        self._ref: dict[str, LoraFactors] | None = None
        self._ref_extras: dict[str, Tensor] = {}

    # A ClassVar in the interface, but a wrapper uploads whatever its inner one trains.
    @property
    def trainable(self) -> Parts:  # type: ignore[override]
        """What clients train and upload: the inner aggregator's ``trainable``."""
        return self.inner.trainable

    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """The inner aggregator's round-1 adapters."""
        init = self.inner.init_global(shapes, rank=rank, scaling=scaling, generator=generator)
        self._shapes = dict(self.inner._shapes)
        return init

    def client_start(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """The inner aggregator's client start."""
        return self.inner.client_start(
            global_adapters, rank=rank, scaling=scaling, generator=generator
        )

    def set_reference(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Keep what every client starts this round from (copies: the caller may change its own).

        Args:
            global_adapters: module -> LoraFactors all clients started from.
            extras: dense trainables (head, prompts) all clients started from.
        """
        self._ref = {mod: clone_factors(f) for mod, f in global_adapters.items()}
        self._ref_extras = {k: v.detach().clone() for k, v in (extras or {}).items()}

    def reference_update(self) -> ClientUpdate:
        """The reference as a ClientUpdate (its adapters and extras).

        Raises:
            MissingReferenceError: :meth:`set_reference` was never called.
        """
        if self._ref is None:
            raise MissingReferenceError(
                f"{self.name} measures updates against what clients started from: call "
                "set_reference(global_adapters, extras=...) before aggregate"
            )
        return ClientUpdate(
            client_id="reference", adapters=self._ref, num_examples=1, extras=self._ref_extras
        )

    def state_dict(self) -> dict[str, Any]:
        """This wrapper's name and the inner aggregator's state."""
        return {"name": self.name, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("name") != self.name:
            raise ValueError(f"cannot load a {state.get('name')!r} state into {self.name!r}")
        self.inner.load_state_dict(state["inner"])
        self._shapes = dict(self.inner._shapes)
