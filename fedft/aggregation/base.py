"""The one interface every aggregation algorithm implements (pure tensors, no Flower).

A round on the server is: ``client_start`` tells each replying client what adapters to
start from, clients train and send :class:`~fedft.types.ClientUpdate` objects, and
``aggregate`` turns them into an :class:`~fedft.types.AggregationResult` (next global
adapters plus an optional delta folded into the frozen base). Every invariant is stated
through ``fedft.adapters.effective_delta`` (docs/algorithms.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from fedft.aggregation._weights import fresh_lora
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

if TYPE_CHECKING:  # fedft.privacy imports this module
    from fedft.privacy.accountant import BudgetDecision

__all__ = ["Aggregator", "clone_factors"]


def clone_factors(f: LoraFactors) -> LoraFactors:
    """Return a copy of ``f`` whose tensors share no storage with it."""
    return LoraFactors(
        a=f.a.detach().clone(),
        b=f.b.detach().clone(),
        scaling=float(f.scaling),
        r=None if f.r is None else f.r.detach().clone(),
    )


class Aggregator(ABC):
    """Server-side aggregation of LoRA-style client updates.

    Class attributes:
        name: the registry name (``[aggregation] algorithm``).
        supports_mixed_ranks: whether clients may train different ranks (flora, hetlora).
        linear: whether the result's effective delta is the p_k-weighted mean of what
            clients upload (needed by user-level DP and secure aggregation).
        trainable: what clients train and upload: ``"ab"`` both factors, ``"b"`` only B
            (A frozen and shared), ``"r"`` only the Fed-SB middle matrix.
    """

    name: ClassVar[str]
    supports_mixed_ranks: ClassVar[bool]
    linear: ClassVar[bool]
    trainable: ClassVar[Parts]

    def __init__(self) -> None:
        #: module -> (out_features, in_features), known from init_global or aggregate.
        self._shapes: dict[str, tuple[int, int]] = {}

    # -- round 1 ------------------------------------------------------------------------
    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Return the round-1 global adapters (default: peft's init, A random, B = 0).

        Args:
            shapes: module -> (out_features, in_features) of each adapted weight.
            rank: the global rank r.
            scaling: the LoRA scale ``alpha / r``.
            generator: randomness for A (seeded by the run's seed).
        """
        self._remember_shapes(shapes)
        return fresh_lora(shapes, rank=rank, scaling=scaling, generator=generator)

    def client_start(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Return the adapters a client of ``rank`` starts this round from.

        The default hands out (a copy of) the global adapters unchanged; the client's rank
        must equal the global one.

        Args:
            global_adapters: the current global adapters (module -> LoraFactors).
            rank: the client's rank.
            scaling: the client's LoRA scale.
            generator: randomness, for algorithms whose clients start fresh.
        """
        for mod, f in global_adapters.items():
            if f.rank != rank:
                raise ValueError(
                    f"{self.name}: module {mod!r} has global rank {f.rank} but the client "
                    f"trains rank {rank}; {self.name} needs one rank for every client"
                )
        return {mod: clone_factors(f) for mod, f in global_adapters.items()}

    # -- every round --------------------------------------------------------------------
    def set_reference(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Learn what every client starts this round from (called before :meth:`aggregate`).

        Wrappers that measure updates against it (norm bound, user-level DP) keep it; the
        default ignores it.

        Args:
            global_adapters: module -> LoraFactors every client started from.
            extras: the dense trainables (head, prompts) every client started from.
        """
        del global_adapters, extras

    def budget_decision(self) -> BudgetDecision | None:
        """Whether one more round fits a privacy budget this aggregator spends.

        None (the default): it spends none, the run goes on. User-level DP answers from
        its accountant.
        """
        return None

    @abstractmethod
    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Aggregate the replies of one round (weights p_k over these updates only)."""

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Return the state that lives across rounds, in plain types and tensors."""
        return {"name": self.name, "shapes": {k: list(v) for k, v in self._shapes.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: when the state belongs to another algorithm.
        """
        if state.get("name") != self.name:
            raise ValueError(
                f"cannot load a {state.get('name')!r} aggregator state into {self.name!r}"
            )
        self._shapes = {str(k): (int(v[0]), int(v[1])) for k, v in state["shapes"].items()}

    def _remember_shapes(self, shapes: Mapping[str, tuple[int, int]]) -> None:
        for mod, shape in shapes.items():
            if len(shape) != 2 or min(int(s) for s in shape) <= 0:
                raise ValueError(f"module {mod!r}: shape {shape} is not (out, in) > 0")
        self._shapes = {mod: (int(s[0]), int(s[1])) for mod, s in sorted(shapes.items())}
