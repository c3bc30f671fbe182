"""Server optimizers on the aggregate: FedAvgM, FedAdam, FedYogi.

References: Reddi et al., ICLR 2021, "Adaptive Federated Optimization"; FedAvgM: Hsu et
al., 2019.

The round's aggregate x̄ (what the linear aggregator returned) and the global x it started
from give the pseudo-gradient's negative Δ = x̄ − x, over what clients train (A and B for
fedit, B for ffa, R for fedsb) and the dense extras (head, prompt), flattened in the one
layout of :mod:`fedft.aggregation.flat`. Then, per coordinate, in float64:

- ``avgm``: m ← μ m + Δ;  x ← x + η m  (μ = ``server_momentum``; μ = 0, η = 1 is FedAvg);
- ``adam``: m ← β₁ m + (1 − β₁) Δ;  v ← β₂ v + (1 − β₂) Δ²;  x ← x + η m / (√v + τ);
- ``yogi``: as adam, but v ← v − (1 − β₂) Δ² sign(v − Δ²).

m starts at 0 and v at τ² (Reddi et al.'s v₋₁ ≥ τ²), without bias correction (their
Algorithm 2). The state (m, v, the step count) is checkpointed with the coordinator.

It is defined where the server keeps one global set of trained tensors that every client
starts from and that the aggregate replaces coordinate by coordinate: the linear
aggregators fedit, ffa and fedsb (and the robust, user-level DP and secure-aggregation
paths around them, whose result is such an aggregate). It is refused for flora and fedex
(the round's update is folded into the frozen base, which has no optimizer state),
lora_fair (its correction of B is fitted to the product; moving A and B by momentum
afterwards undoes the fit) and hetlora (clients of rank r train only the first r
components, so a coordinate's pseudo-gradient mixes ranks, rescalings and truncation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from fedft.aggregation.flat import flatten_trainables, unflatten_trainables
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["ServerOptimizer"]


@dataclass
class ServerOptimizer:
    """A FedOpt step on each round's aggregate.

    Args:
        kind: ``"avgm"``, ``"adam"`` or ``"yogi"``.
        parts: what clients train (``Aggregator.trainable``).
        lr: η, the server learning rate (> 0).
        momentum: μ of ``avgm`` (in [0, 1)).
        beta1: β₁ of adam / yogi (in [0, 1)).
        beta2: β₂ of adam / yogi (in [0, 1)).
        tau: τ of adam / yogi (> 0): the adaptivity floor.
    """

    kind: Literal["avgm", "adam", "yogi"]
    parts: Parts
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        if self.kind not in ("avgm", "adam", "yogi"):
            raise ValueError(f"server optimizer {self.kind!r}: choose avgm, adam or yogi")
        for name, value, low, high in (
            ("momentum", self.momentum, 0.0, 1.0),
            ("beta1", self.beta1, 0.0, 1.0),
            ("beta2", self.beta2, 0.0, 1.0),
        ):
            if not low <= value < high:
                raise ValueError(f"server optimizer: {name} = {value} must be in [0, 1)")
        if not (self.lr > 0 and math.isfinite(self.lr)) or not self.tau > 0:
            raise ValueError(
                f"server optimizer: lr = {self.lr} and tau = {self.tau} must be positive"
            )
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.steps = 0

    def step(
        self,
        global_adapters: Mapping[str, LoraFactors],
        extras: Mapping[str, Tensor],
        result: AggregationResult,
    ) -> AggregationResult:
        """Return ``result`` with its trained tensors moved by one optimizer step.

        Args:
            global_adapters: the global adapters the round started from.
            extras: the dense trainables the round started from.
            result: the aggregate (its adapters and extras); base_delta must be empty.

        Raises:
            ValueError: the result folds a base delta, or its layout differs from the
                global's (another set of modules, shapes or extras).
        """
        if result.base_delta:
            raise ValueError(
                "server optimizer: the aggregate folds a base delta (flora, fedex), which "
                "has no optimizer state; use aggregation.server_opt = 'none'"
            )
        current = ClientUpdate("global", dict(global_adapters), 1, extras=dict(extras))
        new = ClientUpdate("aggregate", dict(result.adapters), 1, extras=dict(result.extras))
        x = flatten_trainables(current, self.parts)  # (D,) float64
        x_bar = flatten_trainables(new, self.parts)
        if x.shape != x_bar.shape:
            raise ValueError(
                f"server optimizer: the aggregate has {x_bar.numel()} trained numbers, the "
                f"global {x.numel()}; they must share one layout"
            )
        delta = x_bar - x
        if self.m is None or self.m.shape != delta.shape:
            if self.steps:
                raise ValueError(
                    f"server optimizer: its state has {self.m.numel() if self.m is not None else 0}"
                    f" numbers, the model {delta.numel()}; it belongs to another model"
                )
            self.m = torch.zeros_like(delta)
            self.v = torch.full_like(delta, self.tau**2)
        if self.kind == "avgm":
            self.m = self.momentum * self.m + delta
            moved = x + self.lr * self.m
        else:
            assert self.v is not None
            self.m = self.beta1 * self.m + (1 - self.beta1) * delta
            sq = delta * delta
            if self.kind == "adam":
                self.v = self.beta2 * self.v + (1 - self.beta2) * sq
            else:
                self.v = self.v - (1 - self.beta2) * sq * torch.sign(self.v - sq)
            moved = x + self.lr * self.m / (self.v.sqrt() + self.tau)
        self.steps += 1
        out = unflatten_trainables(moved, new, self.parts, client_id="server_opt", num_examples=1)
        return AggregationResult(
            adapters=out.adapters,
            base_delta={},
            metrics={**result.metrics, "server_step_norm": float((moved - x).norm())},
            extras=out.extras,
        )

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The kind, hyper-parameters, step count and the moments (tensors)."""
        return {
            "kind": self.kind,
            "lr": self.lr,
            "momentum": self.momentum,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "steps": self.steps,
            "m": None if self.m is None else self.m.clone(),
            "v": None if self.v is None else self.v.clone(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            ValueError: the state is of another kind or other hyper-parameters (a resumed
                run must continue with the optimizer it checkpointed).
        """
        for key in ("kind", "lr", "momentum", "beta1", "beta2", "tau"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"server optimizer: the checkpoint has {key} = {state.get(key)!r}, the "
                    f"config {getattr(self, key)!r}; resume with the checkpoint's setting"
                )
        self.steps = int(state["steps"])
        m, v = state["m"], state["v"]
        self.m = None if m is None else torch.as_tensor(m, dtype=torch.float64).clone()
        self.v = None if v is None else torch.as_tensor(v, dtype=torch.float64).clone()
        if (self.m is None) != (self.v is None) or (
            self.m is not None and self.v is not None and self.m.shape != self.v.shape
        ):
            raise ValueError("server optimizer: checkpointed moments m and v do not match")
