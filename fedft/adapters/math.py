"""LoRA algebra over plain tensors: the effective delta, rank padding, SVD factorisation.

Conventions (docs/algorithms.md, Notation): ``LoraFactors(a, b, scaling, r=None)`` with
``a: (rank, in)``, ``b: (out, rank)`` and optional Fed-SB middle ``r: (rank, rank)``; the
update to a weight ``W: (out, in)`` is ``scaling * b @ [r @] a``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedft.types import AggregationResult, ClientUpdate, LoraFactors


def _as_dense(value: Tensor | LoraFactors) -> Tensor:
    if isinstance(value, LoraFactors):
        return value.delta()
    if value.dim() != 2:
        raise ValueError(f"a dense delta must be 2-D (out, in); got shape {tuple(value.shape)}")
    return value.to(torch.promote_types(value.dtype, torch.float32))


def _add(out: dict[str, Tensor], module: str, delta: Tensor) -> None:
    if module in out:
        if out[module].shape != delta.shape:
            raise ValueError(
                f"module {module!r}: deltas of shapes {tuple(out[module].shape)} and "
                f"{tuple(delta.shape)} cannot be summed"
            )
        out[module] = out[module] + delta
    else:
        out[module] = delta


def effective_delta(
    x: ClientUpdate | AggregationResult | Mapping[str, LoraFactors],
) -> dict[str, Tensor]:
    """What an update does to the base weights: ``{module: Tensor(out, in)}`` (docs/algorithms.md).

    Args:
        x: a ClientUpdate (the delta of its adapters), an AggregationResult (``base_delta``,
            dense or factored, plus the delta of its adapters, summed per module) or a
            mapping module -> LoraFactors.

    Returns:
        module -> dense delta (out, in), float32 or wider. Modules without any update are
        absent.
    """
    out: dict[str, Tensor] = {}
    if isinstance(x, AggregationResult):
        for module, value in x.base_delta.items():
            _add(out, module, _as_dense(value))
        adapters: Mapping[str, LoraFactors] = x.adapters
    elif isinstance(x, ClientUpdate):
        adapters = x.adapters
    else:
        adapters = x
    for module, factors in adapters.items():
        if not isinstance(factors, LoraFactors):
            raise TypeError(
                f"module {module!r}: expected LoraFactors, got {type(factors).__name__}"
            )
        _add(out, module, factors.delta())
    return out


def pad_rank(f: LoraFactors, rank: int) -> LoraFactors:
    """Zero-pad factors to a larger rank (HetLoRA); the delta is unchanged.

    Args:
        f: factors of rank r.
        rank: target rank >= r.

    Returns:
        ``a: (rank, in)`` with zero rows r..rank, ``b: (out, rank)`` with zero columns
        (and ``r: (rank, rank)`` zero outside the top-left block for Fed-SB).
    """
    if rank < f.rank:
        raise ValueError(f"pad_rank: target rank {rank} is below the factors' rank {f.rank}")
    extra = rank - f.rank
    a = torch.cat([f.a, f.a.new_zeros(extra, f.a.shape[1])], dim=0)  # (rank, in)
    b = torch.cat([f.b, f.b.new_zeros(f.b.shape[0], extra)], dim=1)  # (out, rank)
    r = None
    if f.r is not None:
        r = f.r.new_zeros(rank, rank)
        r[: f.rank, : f.rank] = f.r
    return LoraFactors(a=a, b=b, scaling=f.scaling, r=r)


def truncate_rank(f: LoraFactors, rank: int) -> LoraFactors:
    """Keep the first ``rank`` components: rows of ``a``, columns of ``b`` (HetLoRA).

    Exact inverse of :func:`pad_rank`; otherwise it drops the components beyond ``rank``.
    """
    if not 1 <= rank <= f.rank:
        raise ValueError(f"truncate_rank: rank must be in [1, {f.rank}], got {rank}")
    r = None if f.r is None else f.r[:rank, :rank].clone()
    return LoraFactors(a=f.a[:rank].clone(), b=f.b[:, :rank].clone(), scaling=f.scaling, r=r)


def numerical_rank(delta: Tensor, *, tol: float = 1e-7) -> int:
    """Singular values above ``tol * max(out, in) * s_max`` (numpy's matrix_rank rule)."""
    s = torch.linalg.svdvals(delta.to(torch.float64))
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > tol * max(delta.shape) * s[0]).sum())


def svd_factors(
    delta: Tensor, rank: int | None, *, scaling: float = 1.0, tol: float = 1e-7
) -> LoraFactors:
    """Best rank-``rank`` factors of a dense delta (Eckart-Young), ``scaling * b @ a ≈ delta``.

    The singular values are split evenly: ``b = U sqrt(S / scaling)``,
    ``a = sqrt(S / scaling) Vᵀ``. Computed in float64, returned in ``delta``'s float dtype
    (at least float32).

    Args:
        delta: (out, in).
        rank: the rank of the factors; None → the numerical rank (see
            :func:`numerical_rank`), at least 1. A rank above ``min(out, in)`` is reached by
            zero padding.
        scaling: the LoRA scale the factors will be used with (> 0).
        tol: relative tolerance for the numerical rank.

    Returns:
        LoraFactors with ``a: (rank, in)``, ``b: (out, rank)``.
    """
    if delta.dim() != 2:
        raise ValueError(f"svd_factors needs a 2-D delta (out, in); got {tuple(delta.shape)}")
    if scaling <= 0:
        raise ValueError(f"svd_factors: scaling must be > 0, got {scaling}")
    if rank is not None and rank < 1:
        raise ValueError(f"svd_factors: rank must be >= 1 or None, got {rank}")
    dtype = torch.promote_types(delta.dtype, torch.float32)
    d64 = delta.to(torch.float64)
    u, s, vh = torch.linalg.svd(d64, full_matrices=False)  # u (out,k) s (k,) vh (k,in)
    if rank is None:
        rank = max(1, numerical_rank(delta, tol=tol))
    keep = min(rank, s.numel())
    root = torch.sqrt(s[:keep] / scaling)  # (keep,)
    b = (u[:, :keep] * root).to(dtype)  # (out, keep)
    a = (root[:, None] * vh[:keep]).to(dtype)  # (keep, in)
    factors = LoraFactors(a=a, b=b, scaling=float(scaling))
    return pad_rank(factors, rank) if keep < rank else factors
