"""HetLoRA zero-padding (Cho et al., EMNLP 2024): pad to the max rank, average, truncate back.

Client k's factors are zero-padded to ``r_max = max_k r_k`` (A with zero rows, B with zero
columns) and averaged by p_k. Clients of different ranks usually have different scalings
(``alpha / r_k``), so each ``B_k`` is first rescaled to the global scaling ``s_g`` (the
scaling of the largest-rank client): ``B = sum_k p_k pad(s_k / s_g * B_k)``,
``A = sum_k p_k pad(A_k)``. In ``client_start`` a client of rank r gets ``A[:r]`` and
``B[:, :r] * s_g / s`` with its own scaling s, i.e. the rank-r truncation of the global
update. Inexact (like FedIT) by design; kept as a baseline.
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
    weighted_mean,
)
from fedft.aggregation.base import Aggregator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["HetLoRA"]


def _pad_rows(a: Tensor, rank: int) -> Tensor:
    """Zero-pad A (r, in) to (rank, in)."""
    return torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])], dim=0)


def _pad_cols(b: Tensor, rank: int) -> Tensor:
    """Zero-pad B (out, r) to (out, rank)."""
    return torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)


class HetLoRA(Aggregator):
    """Zero-pad heterogeneous-rank factors to the max rank and average them by p_k."""

    name: ClassVar[str] = "hetlora"
    supports_mixed_ranks: ClassVar[bool] = True
    linear: ClassVar[bool] = False
    trainable: ClassVar[Parts] = "ab"

    def __init__(self) -> None:
        super().__init__()
        #: the rank and scaling of the global adapters (the largest client rank): kept so a
        #: round without any largest-rank client still returns adapters they can start from
        self._global_rank = 0
        self._global_scaling = 0.0

    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Peft's init at the largest client rank (remembered for later rounds)."""
        self._global_rank, self._global_scaling = int(rank), float(scaling)
        return super().init_global(shapes, rank=rank, scaling=scaling, generator=generator)

    def client_start(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Truncate the global adapters to the client's rank, in the client's scaling.

        Raises:
            ValueError: when the client's rank exceeds the global rank (initialise the
                global adapters at the largest client rank).
        """
        if rank <= 0 or scaling == 0:
            raise ValueError(f"hetlora: need rank >= 1 and scaling != 0, got {rank}, {scaling}")
        out: dict[str, LoraFactors] = {}
        for mod, f in global_adapters.items():
            if rank > f.rank:
                raise ValueError(
                    f"hetlora: client rank {rank} exceeds the global rank {f.rank} of module "
                    f"{mod!r}; call init_global with the largest client rank"
                )
            out[mod] = LoraFactors(
                a=f.a[:rank].clone(),  # (rank, in)
                b=f.b[:, :rank] * (f.scaling / scaling),  # (out, rank)
                scaling=float(scaling),
            )
        return out

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return the p_k-average of the zero-padded factors at the largest rank."""
        ups = check_updates(updates, algorithm=self.name, mixed_ranks=True)
        p = client_weights(ups)
        adapters: dict[str, LoraFactors] = {}
        for mod in sorted(ups[0].adapters):
            fs = [u.adapters[mod] for u in ups]
            r_max = max(max(f.rank for f in fs), self._global_rank)  # zero rows beyond
            s_g = next((f.scaling for f in fs if f.rank == r_max), self._global_scaling)
            a_bar = weighted_mean([_pad_rows(f.a, r_max) for f in fs], p)  # (r_max, in)
            b_bar = weighted_mean(
                [
                    _pad_cols(f.b if f.scaling == s_g else f.b * (f.scaling / s_g), r_max)
                    for f in fs
                ],
                p,
            )  # (out, r_max)
            adapters[mod] = LoraFactors(a=a_bar, b=b_bar, scaling=s_g)
        self._shapes = {mod: f.shape for mod, f in adapters.items()}
        return AggregationResult(
            adapters=adapters,
            metrics={"clients": float(len(ups))},
            extras=average_extras(ups, p),
        )

    def state_dict(self) -> dict[str, Any]:
        """Shapes plus the global rank and scaling."""
        return {
            **super().state_dict(),
            "global_rank": self._global_rank,
            "global_scaling": self._global_scaling,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(state)
        self._global_rank = int(state.get("global_rank", 0))
        self._global_scaling = float(state.get("global_scaling", 0.0))
