"""The server's state across rounds, free of Flower.

Global adapters, folded base deltas, averaged extras, and what each client starts a round
from.

The Flower ServerApp (``server/app.py``) only moves these objects over the wire.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from fedft.aggregation.base import Aggregator
from fedft.aggregation.error import aggregation_error
from fedft.aggregation.server_opt import ServerOptimizer
from fedft.seeds import derive_seed
from fedft.types import AggregationResult, ClientUpdate, LoraFactors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientStart:
    """What one client receives for one round.

    Attributes:
        adapters: module -> LoraFactors the client trains from (its own rank).
        base_delta: module -> dense (out, in) Tensor or exact LoraFactors, to add to W0.
        extras: dense trainables (head, prompt) to load before training.
        rank: the client's LoRA rank this round.
    """

    adapters: Mapping[str, LoraFactors]
    base_delta: Mapping[str, Tensor | LoraFactors]
    extras: Mapping[str, Tensor]
    rank: int


def concat_factors(parts: Sequence[LoraFactors]) -> LoraFactors:
    """One exact factored form of a sum of low-rank deltas: Σ s_i B_i [R_i] A_i.

    Returns:
        LoraFactors(a = vstack(s_i [R_i] A_i), b = hstack(B_i), scaling = 1).
    """
    a = torch.cat([p.scaling * (p.a if p.r is None else p.r @ p.a) for p in parts], dim=0)
    b = torch.cat([p.b for p in parts], dim=1)
    return LoraFactors(a=a, b=b, scaling=1.0)


@dataclass
class Coordinator:
    """Global state of a federated LoRA run.

    Args:
        aggregator: any :class:`fedft.aggregation.base.Aggregator` (possibly wrapped).
        shapes: module -> (out_features, in_features) of every adapted weight.
        rank_of: client index -> that client's rank.
        alpha: LoRA alpha (scaling = alpha / rank).
        extras: the initial dense trainables (the seeded head), identical for all clients.
        seed: seeds every random init the server makes.
        server_opt: an optional server optimizer (FedAvgM / FedAdam / FedYogi) applied to
            every round's aggregate; its state is checkpointed with the coordinator.
    """

    aggregator: Aggregator
    shapes: Mapping[str, tuple[int, int]]
    rank_of: Callable[[int], int]
    alpha: float
    extras: dict[str, Tensor]
    seed: int = 0
    max_rank: int = 0
    global_adapters: dict[str, LoraFactors] = field(default_factory=dict)
    #: the sum of everything folded into the base so far, per module, in factored form.
    base_factors: dict[str, LoraFactors] = field(default_factory=dict)
    round: int = 0
    server_opt: ServerOptimizer | None = None

    def __post_init__(self) -> None:
        if not self.global_adapters:
            gen = torch.Generator().manual_seed(self.seed)
            rank = self.max_rank or self.rank_of(0)
            self.global_adapters = dict(
                self.aggregator.init_global(
                    self.shapes, rank=rank, scaling=self.alpha / rank, generator=gen
                )
            )

    # -- what clients get -------------------------------------------------------------
    def start_for(self, client_index: int) -> ClientStart:
        """The adapters, base delta and extras client ``client_index`` starts from."""
        rank = self.rank_of(client_index)
        gen = torch.Generator().manual_seed(derive_seed(self.seed, self.round, client_index))
        adapters = self.aggregator.client_start(
            self.global_adapters, rank=rank, scaling=self.alpha / rank, generator=gen
        )
        return ClientStart(
            adapters=adapters, base_delta=self.base_delta_payload(), extras=self.extras, rank=rank
        )

    def base_delta_payload(self) -> dict[str, Tensor | LoraFactors]:
        """Per module, the cheaper exact form of the folded delta: factored or dense."""
        out: dict[str, Tensor | LoraFactors] = {}
        for name, f in self.base_factors.items():
            rows, cols = f.shape
            out[name] = f if f.numel() < rows * cols else f.delta()
        return out

    def dense_base_delta(self) -> dict[str, Tensor]:
        """Everything folded into the base so far: module -> (out, in)."""
        return {name: f.delta() for name, f in self.base_factors.items()}

    # -- aggregation ------------------------------------------------------------------
    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Aggregate one round's updates and move the global state forward.

        The result's metrics gain ``error``, the round's aggregation error
        (:func:`fedft.aggregation.error.aggregation_error`, ``agg_error`` in metrics.jsonl),
        whenever it is defined.
        """
        before = self.global_adapters
        # wrappers (norm bound, user-level DP) clip against what the clients started from
        self.aggregator.set_reference(before, extras=self.extras)
        result = self.aggregator.aggregate(updates)
        error = self.aggregation_error(before, updates, result)
        if error is not None:
            result = replace(result, metrics={**result.metrics, "error": error})
        return self.apply(result)

    def aggregation_error(
        self,
        before: Mapping[str, LoraFactors],
        updates: Sequence[ClientUpdate],
        result: AggregationResult,
    ) -> float | None:
        """The relative distance of the round's actual update from the ideal one.

        Each update's start is what :meth:`Aggregator.client_start` hands a client of its
        rank and scaling (the global adapters; FLoRA's fresh B = 0; HetLoRA's truncation).
        """
        if not updates or not updates[0].adapters:
            return None
        cache: dict[tuple[int, float], dict[str, LoraFactors]] = {}
        starts: list[Mapping[str, LoraFactors]] = []
        for u in updates:
            first = next(iter(u.adapters.values()))
            key = (first.rank, float(first.scaling))
            if key not in cache:  # only FLoRA's A is random, and its B is 0: any seed will do
                cache[key] = self.aggregator.client_start(
                    before, rank=key[0], scaling=key[1], generator=torch.Generator().manual_seed(0)
                )
            starts.append(cache[key])
        return aggregation_error(before, updates, starts, result)

    def apply(self, result: AggregationResult) -> AggregationResult:
        """Move the global state forward by a round's result computed elsewhere.

        :meth:`aggregate` ends here; secure aggregation calls it directly with the result it
        decoded from the unmasked sum (the server never holds the individual updates). A
        server optimizer, when set, moves the aggregate first (the returned result is what
        the global model became).
        """
        if self.server_opt is not None:
            result = self.server_opt.step(self.global_adapters, self.extras, result)
        self.global_adapters = dict(result.adapters)
        for name, delta in result.base_delta.items():
            part = delta if isinstance(delta, LoraFactors) else _dense_as_factors(delta)
            prev = self.base_factors.get(name)
            self.base_factors[name] = part if prev is None else concat_factors([prev, part])
            # keep the factored form no larger than dense: re-factor exactly when it is
            merged = self.base_factors[name]
            if merged.numel() > merged.shape[0] * merged.shape[1]:
                self.base_factors[name] = _dense_as_factors(merged.delta())
        if result.extras:
            self.extras = {k: v.detach().clone() for k, v in result.extras.items()}
        self.round += 1
        return result

    # -- checkpoints ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain types and tensors only (no pickle)."""
        state = {
            "round": self.round,
            "global_adapters": _factors_state(self.global_adapters),
            "base_factors": _factors_state(self.base_factors),
            "extras": {k: v.clone() for k, v in self.extras.items()},
            "aggregator": self.aggregator.state_dict(),
        }
        if self.server_opt is not None:
            state["server_opt"] = self.server_opt.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore exactly what :meth:`state_dict` saved."""
        self.round = int(state["round"])
        self.global_adapters = _factors_from_state(state["global_adapters"])
        self.base_factors = _factors_from_state(state["base_factors"])
        self.extras = {k: v.clone() for k, v in state["extras"].items()}
        self.aggregator.load_state_dict(state["aggregator"])
        saved_opt = state.get("server_opt")
        if (saved_opt is None) != (self.server_opt is None):
            raise ValueError(
                "the checkpoint was written "
                + ("with" if saved_opt is not None else "without")
                + " a server optimizer and this run is configured "
                + ("without" if saved_opt is not None else "with")
                + " one; resume with the checkpoint's aggregation.server_opt"
            )
        if self.server_opt is not None and saved_opt is not None:
            self.server_opt.load_state_dict(saved_opt)


def _dense_as_factors(delta: Tensor) -> LoraFactors:
    """A dense (out, in) delta as exact factors b = I (out, out)... or a = I when narrower."""
    out_f, in_f = delta.shape
    if in_f <= out_f:  # b = delta (out, in), a = I (in, in)
        return LoraFactors(a=torch.eye(in_f, dtype=delta.dtype), b=delta.clone(), scaling=1.0)
    return LoraFactors(a=delta.clone(), b=torch.eye(out_f, dtype=delta.dtype), scaling=1.0)


def _factors_state(factors: Mapping[str, LoraFactors]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, f in factors.items():
        entry: dict[str, Any] = {"a": f.a.clone(), "b": f.b.clone(), "scaling": f.scaling}
        if f.r is not None:
            entry["r"] = f.r.clone()
        out[name] = entry
    return out


def _factors_from_state(state: Mapping[str, Mapping[str, Any]]) -> dict[str, LoraFactors]:
    return {
        name: LoraFactors(a=e["a"], b=e["b"], scaling=float(e["scaling"]), r=e.get("r"))
        for name, e in state.items()
    }
