"""The shared vocabulary: what clients send, what the server returns.

Shapes follow the LoRA paper (Hu et al., 2021): a weight W of shape (out, in) is updated by
``scaling * b @ a`` with ``a: (r, in)`` and ``b: (out, r)``. For Fed-SB (LoRA-SB, Ponkshe
et al., 2025) the update is ``scaling * b @ r @ a`` with a trainable ``r: (rank, rank)``
between the frozen, shared ``b`` and ``a``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Parts = Literal["ab", "b", "r"]
"""What clients train and upload: ``"ab"`` both factors, ``"b"`` only B (A frozen and
shared, FFA), ``"r"`` only the Fed-SB middle matrix (B and A frozen and shared)."""

PARTS_FIELDS: Mapping[str, tuple[str, ...]] = {"ab": ("a", "b"), "b": ("b",), "r": ("r",)}
"""The :class:`LoraFactors` fields each :data:`Parts` value trains."""


@dataclass(frozen=True)
class LoraFactors:
    """Low-rank factors of one adapted weight matrix.

    Attributes:
        a: (r, in_features).
        b: (out_features, r).
        scaling: the LoRA scale ``alpha / r`` (a plain float).
        r: optional (r, r) middle matrix (Fed-SB); then delta = scaling * b @ r @ a.
    """

    a: Tensor
    b: Tensor
    scaling: float
    r: Tensor | None = None

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2:
            raise ValueError(
                f"LoraFactors needs 2-D a (r, in) and b (out, r); got a{tuple(self.a.shape)}, "
                f"b{tuple(self.b.shape)}"
            )
        inner_b = self.b.shape[1] if self.r is None else self.r.shape[0]
        inner_a = self.a.shape[0] if self.r is None else self.r.shape[1]
        if self.r is not None and (
            self.r.dim() != 2
            or self.r.shape[0] != self.b.shape[1]
            or self.r.shape[1] != self.a.shape[0]
        ):
            raise ValueError(
                f"Fed-SB middle matrix r{tuple(self.r.shape)} does not fit "
                f"b{tuple(self.b.shape)} and a{tuple(self.a.shape)}"
            )
        if self.r is None and inner_b != inner_a:
            raise ValueError(
                f"rank mismatch: b{tuple(self.b.shape)} @ a{tuple(self.a.shape)} is undefined"
            )

    @property
    def rank(self) -> int:
        """The number of rows of ``a`` (the adapter's rank)."""
        return int(self.a.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the weight this adapter updates."""
        return int(self.b.shape[0]), int(self.a.shape[1])

    def delta(self) -> Tensor:
        """The dense update ``scaling * b @ [r @] a``: (out, in), in float32 or wider."""
        dtype = torch.promote_types(self.a.dtype, torch.float32)
        a, b = self.a.to(dtype), self.b.to(dtype)
        if self.r is not None:
            a = self.r.to(dtype) @ a  # (r, in)
        return self.scaling * (b @ a)

    def numel(self) -> int:
        """Number of scalars these factors hold."""
        return self.a.numel() + self.b.numel() + (0 if self.r is None else self.r.numel())


@dataclass(frozen=True)
class ClientUpdate:
    """What one client sends back after a local round.

    Attributes:
        client_id: a stable identifier (Flower node id or partition id as a string).
        adapters: module name -> LoraFactors (for Fed-SB only ``r`` is trained).
        num_examples: n_k, the examples this client trained on (weights p_k = n_k / sum n).
        metrics: scalars (train loss, epsilon, ...).
        extras: dense trainables that every aggregator averages by p_k (classifier head,
            soft prompts): name -> Tensor.
    """

    client_id: str
    adapters: Mapping[str, LoraFactors]
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_examples <= 0:
            raise ValueError(
                f"client {self.client_id!r} reports num_examples={self.num_examples}; "
                "an update must come from at least one example"
            )


@dataclass(frozen=True)
class AggregationResult:
    """What the server hands to the next round.

    Attributes:
        adapters: the global adapters clients start from (empty when clients start fresh,
            e.g. FLoRA).
        base_delta: updates folded into the frozen base weights this round (FLoRA,
            FedEx-LoRA): module -> dense Tensor (out, in) or LoraFactors (exact factored
            form, cheaper to send).
        metrics: scalars about the aggregation (cosines, norms, ...).
        extras: the averaged dense trainables (classifier head, soft prompts).
    """

    adapters: Mapping[str, LoraFactors]
    base_delta: Mapping[str, Tensor | LoraFactors] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, Tensor] = field(default_factory=dict)
