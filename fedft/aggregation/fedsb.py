"""Fed-SB (Singhal et al., 2025; LoRA-SB): W = W0 + s * B R A with B, A frozen and shared.

Only the (r, r) matrix R is trained, so ``sum_k p_k s B R_k A = s B (sum_k p_k R_k) A``:
averaging R is exact, linear (secure-aggregation friendly) and the upload is r^2 per
adapted matrix whatever the number of clients.

Initialisation (LoRA-SB): from the gradient G (out, in) of the full weight, take Adam's
first update ``U = -lr * sign(G)``, its truncated SVD ``U ~ Q S P^T`` and set ``B = Q[:, :r]``,
``A = P^T[:r]`` and ``R = diag(S[:r]) / s``. Dividing by the scaling s makes the first
effective update ``s B R A`` the best rank-r approximation of U itself, whatever alpha is.
The gradient touches data: compute it on public data, or privatise it and count it in the
privacy budget when DP is on (docs/algorithms.md, Fed-SB).
"""

from __future__ import annotations

import logging
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
from fedft.aggregation.base import Aggregator, clone_factors
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["FedSB"]

logger = logging.getLogger(__name__)


class FedSB(Aggregator):
    """Average the clients' R by p_k over a frozen, shared (B, A) pair per module."""

    name: ClassVar[str] = "fedsb"
    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = True
    trainable: ClassVar[Parts] = "r"

    def __init__(self) -> None:
        super().__init__()
        #: module -> the shared frozen factors with the current global R.
        self._global: dict[str, LoraFactors] = {}

    def initialise_from_gradients(
        self,
        grads: Mapping[str, Tensor],
        *,
        rank: int,
        lr: float,
        scaling: float,
    ) -> dict[str, LoraFactors]:
        """Build the shared (B, A) and the initial R from full-weight gradients.

        Args:
            grads: module -> G (out, in), the (public or privatised) gradient of the loss
                with respect to the full weight W.
            rank: r, at most min(out, in).
            lr: the step size eta of ``U = -eta * sign(G)``.
            scaling: the LoRA scale s used in ``s B R A``; must be nonzero.

        Returns:
            module -> LoraFactors(a=A (r, in), b=B (out, r), scaling=s, r=R (r, r)).
        """
        if not grads:
            raise ValueError("fedsb: no gradients given for the initialisation")
        if rank <= 0 or lr <= 0 or scaling == 0:
            raise ValueError(
                f"fedsb: need rank >= 1, lr > 0, scaling != 0; got {rank}, {lr}, {scaling}"
            )
        init: dict[str, LoraFactors] = {}
        for mod in sorted(grads):
            g = grads[mod].detach()
            if g.dim() != 2 or rank > min(g.shape):
                raise ValueError(
                    f"fedsb: module {mod!r}: gradient of shape {tuple(g.shape)} cannot give "
                    f"rank {rank} (need a 2-D (out, in) gradient with min(out, in) >= rank)"
                )
            u = -lr * torch.sign(g.to(torch.float64))  # (out, in)
            q, sv, ph = torch.linalg.svd(u, full_matrices=False)  # (out,k) (k,) (k,in)
            dtype = torch.promote_types(g.dtype, torch.float32)
            init[mod] = LoraFactors(
                a=ph[:rank].to(dtype).contiguous(),  # (r, in)
                b=q[:, :rank].to(dtype).contiguous(),  # (out, r)
                scaling=float(scaling),
                r=(torch.diag(sv[:rank]) / scaling).to(dtype),  # (r, r)
            )
            logger.debug("fedsb init %s: top singular value %.4g", mod, float(sv[0]))
        self._global = init
        self._shapes = {mod: f.shape for mod, f in init.items()}
        return {mod: clone_factors(f) for mod, f in init.items()}

    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Return the factors built by :meth:`initialise_from_gradients`.

        Raises:
            ValueError: when not initialised, or when shapes, rank or scaling differ from it.
        """
        if not self._global:
            raise ValueError(
                "fedsb: call initialise_from_gradients(grads, rank=..., lr=..., scaling=...) "
                "before init_global; Fed-SB's B and A come from a gradient, not from a seed"
            )
        want = {mod: (int(s[0]), int(s[1])) for mod, s in shapes.items()}
        if want != self._shapes:
            raise ValueError(f"fedsb: shapes {want} differ from the initialised {self._shapes}")
        for mod, f in self._global.items():
            if f.rank != rank or f.scaling != scaling:
                raise ValueError(
                    f"fedsb: module {mod!r} was initialised at rank {f.rank}, scaling "
                    f"{f.scaling}; asked for rank {rank}, scaling {scaling}"
                )
        return {mod: clone_factors(f) for mod, f in self._global.items()}

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return the shared (B, A) with ``R = sum_k p_k R_k`` per module.

        Raises:
            ValueError: when a client's B or A differs from the shared, frozen ones.
        """
        ups = check_updates(updates, algorithm=self.name, mixed_ranks=False, middle=True)
        if self._global and set(ups[0].adapters) != set(self._global):
            raise ValueError(
                f"fedsb: client {ups[0].client_id!r} adapts {sorted(ups[0].adapters)} but the "
                f"shared factors cover {sorted(self._global)}"
            )
        p = client_weights(ups)
        adapters: dict[str, LoraFactors] = {}
        for mod in sorted(ups[0].adapters):
            fs = [u.adapters[mod] for u in ups]
            shared = self._global.get(mod, fs[0])
            for u, f in zip(ups, fs, strict=True):
                if not (
                    f.a.shape == shared.a.shape
                    and f.b.shape == shared.b.shape
                    and torch.equal(f.a.to(shared.a.dtype), shared.a)
                    and torch.equal(f.b.to(shared.b.dtype), shared.b)
                ):
                    raise ValueError(
                        f"fedsb: client {u.client_id!r} sent a B or A for module {mod!r} that "
                        "differs from the shared, frozen one; Fed-SB trains only R"
                    )
            r_bar = weighted_mean([f.r for f in fs if f.r is not None], p)  # (r, r)
            adapters[mod] = LoraFactors(
                a=shared.a.clone(), b=shared.b.clone(), scaling=shared.scaling, r=r_bar
            )
        self._global = {mod: clone_factors(f) for mod, f in adapters.items()}
        self._shapes = {mod: f.shape for mod, f in adapters.items()}
        return AggregationResult(
            adapters=adapters,
            metrics={"clients": float(len(ups))},
            extras=average_extras(ups, p),
        )

    def state_dict(self) -> dict[str, Any]:
        """Return the shapes and the shared (B, A, scaling, R) of every module."""
        state = super().state_dict()
        state["factors"] = {
            mod: {"a": f.a.clone(), "b": f.b.clone(), "scaling": f.scaling, "r": _clone(f.r)}
            for mod, f in self._global.items()
        }
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the shapes and the shared factors."""
        super().load_state_dict(state)
        self._global = {
            str(mod): LoraFactors(
                a=torch.as_tensor(v["a"]).clone(),
                b=torch.as_tensor(v["b"]).clone(),
                scaling=float(v["scaling"]),
                r=None if v["r"] is None else torch.as_tensor(v["r"]).clone(),
            )
            for mod, v in state["factors"].items()
        }


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()
