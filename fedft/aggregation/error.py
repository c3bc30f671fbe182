"""Aggregation error: how far the update the global model received is from the ideal one.

For one round with replies k = 1..K (weights p_k = n_k / sum n over the replies), each client
started from factors (B_k⁰, A_k⁰) and returned (B_k, A_k) with scaling s_k (Fed-SB:
s B R A). Per adapted module::

    ideal  = sum_k p_k (s_k B_k A_k - s_k B_k⁰ A_k⁰)    the p_k-mean of what clients changed
    actual = (base delta + s B A of the new global) - (s B A of the global before)

and the round's error is the relative Frobenius distance over all modules together::

    agg_error = sqrt(sum_m ||actual_m - ideal_m||²) / sqrt(sum_m ||ideal_m||²)

When every client starts from the global adapters (every algorithm except FLoRA, whose
clients start from B = 0, and HetLoRA, which hands each client a truncation), the ideal is
``sum_k p_k s_k B_k A_k - s B A(before)``: the new global *should* be the p_k-mean of the
clients' models. FLoRA, FFA-LoRA, Fed-SB and FedEx-LoRA give 0 up to float rounding; FedIT's
error is ``||sum_k p_k s (B_k - B)(A_k - A)|| / ||ideal||`` (docs/algorithms.md).

Everything is computed densely in float64 (one (out, in) matrix per module and client).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedft.aggregation._weights import client_weights
from fedft.types import AggregationResult, ClientUpdate, LoraFactors

__all__ = ["actual_update", "aggregation_error", "dense64", "ideal_update"]

_F64 = torch.float64


def dense64(value: Tensor | LoraFactors) -> Tensor:
    """``s B [R] A`` (or a dense delta) as an (out, in) float64 matrix."""
    if isinstance(value, LoraFactors):
        a = value.a.detach().to(_F64)
        if value.r is not None:
            a = value.r.detach().to(_F64) @ a  # (r, in)
        return float(value.scaling) * (value.b.detach().to(_F64) @ a)
    return value.detach().to(_F64)


def _accumulate(out: dict[str, Tensor], module: str, delta: Tensor, weight: float) -> None:
    if module in out:
        out[module] = out[module] + weight * delta
    else:
        out[module] = weight * delta


def ideal_update(
    updates: Sequence[ClientUpdate], starts: Sequence[Mapping[str, LoraFactors]]
) -> dict[str, Tensor]:
    """``sum_k p_k (s_k B_k A_k - s_k B_k⁰ A_k⁰)`` per module, float64 (out, in).

    Args:
        updates: the round's replies (p_k = n_k / sum n over them).
        starts: what each reply's client started from, in the same order (module ->
            factors; a module missing there started from zero).
    """
    if len(updates) != len(starts):
        raise ValueError(f"need one start per update; got {len(starts)} for {len(updates)}")
    p = client_weights(updates)
    out: dict[str, Tensor] = {}
    for pk, u, start in zip(p, updates, starts, strict=True):
        for mod, f in u.adapters.items():
            delta = dense64(f)
            if mod in start:
                delta = delta - dense64(start[mod])
            _accumulate(out, mod, delta, pk)
    return out


def actual_update(
    before: Mapping[str, LoraFactors], result: AggregationResult
) -> dict[str, Tensor]:
    """What the round did to the effective weights: new (base delta + adapters) minus before."""
    out: dict[str, Tensor] = {}
    for mod, value in result.base_delta.items():
        _accumulate(out, mod, dense64(value), 1.0)
    for mod, f in result.adapters.items():
        _accumulate(out, mod, dense64(f), 1.0)
    for mod, f in before.items():
        _accumulate(out, mod, dense64(f), -1.0)
    return out


def aggregation_error(
    before: Mapping[str, LoraFactors],
    updates: Sequence[ClientUpdate],
    starts: Sequence[Mapping[str, LoraFactors]],
    result: AggregationResult,
) -> float | None:
    """The round's relative Frobenius distance between the actual and the ideal update.

    Args:
        before: the global adapters before the round.
        updates: the replies the aggregator received (as they arrived).
        starts: what each reply's client started from, in the order of ``updates``.
        result: what the aggregator returned.

    Returns:
        ``sqrt(sum_m ||actual_m - ideal_m||²) / sqrt(sum_m ||ideal_m||²)``, or None when it
        is undefined: no replies, no adapted module (prompt tuning), or an ideal update of
        zero (no client changed anything).
    """
    if not updates:
        return None
    ideal = ideal_update(updates, starts)
    if not ideal:
        return None
    actual = actual_update(before, result)
    num = den = 0.0
    for mod in sorted(set(ideal) | set(actual)):
        want = ideal.get(mod)
        got = actual.get(mod)
        if want is None:
            num += float(got.pow(2).sum()) if got is not None else 0.0
            continue
        den += float(want.pow(2).sum())
        diff = want if got is None else got - want
        num += float(diff.pow(2).sum())
    if den == 0.0:
        return None
    return math.sqrt(num) / math.sqrt(den)
