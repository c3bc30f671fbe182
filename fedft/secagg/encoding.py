"""Client updates <-> the weighted vectors SecAgg sums, for linear aggregators.

A client k sends ``[n_k * x_k, n_k]``: its flattened uploads x_k (layout of
:func:`fedft.aggregation.robust.flatten_trainables`) pre-multiplied by its example count,
with the count appended. The server unmasks only the sum ``[sum n_k x_k, sum n_k]``, so it
learns the p_k-weighted mean and the total count and nothing per client. The inner linear
aggregator (fedit, fedsb, ffa) then formats the mean by aggregating one synthetic update
(its one-client-is-identity invariant), so no aggregation math is copied here.

Bounds: the clip c of :class:`~fedft.secagg.protocol.SecAggParams` applies to the
pre-multiplied entries n_k * x_k and to n_k itself; choose c above max n_k * max |x|.
The decoded weighted sum is exact up to n * 2^(-f-1) per entry (n clients, f fractional
bits), so the mean is off by at most n * 2^(-f-1) / sum n_k.

Differential privacy (user level) composes as central DP *after* unmasking: each client
clips its own delta (the server cannot, it never sees one), sends weight 1 instead of n_k,
and the server adds N(0, sigma^2 C^2) to the unmasked sum before dividing. The server thus
sees the exact sum of clipped updates before the noise: it is trusted to add the noise,
while SecAgg keeps it from seeing any single client. Distributed noise (each client adding
a share of it before masking) would remove that trust and is not implemented here.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedft.aggregation.base import Aggregator
from fedft.aggregation.robust import flatten_trainables, unflatten_trainables
from fedft.secagg.protocol import SecAggResult
from fedft.types import AggregationResult, ClientUpdate, Parts

__all__ = ["decode_aggregate", "encode_update", "vector_length"]


def vector_length(template: ClientUpdate, *, parts: Parts) -> int:
    """D of the SecAgg vector for updates shaped like ``template``: uploads + 1 (the count)."""
    return int(flatten_trainables(template, parts).numel()) + 1


def encode_update(update: ClientUpdate, *, parts: Parts, weighted: bool = True) -> np.ndarray:
    """The vector a client masks: float64 (D,) = [w * x_k, w], w = n_k (or 1 if unweighted).

    Args:
        update: the client's update (validated and, under DP, already clipped).
        parts: what the aggregator trains (``inner.trainable``).
        weighted: False for uniform weights (user-level DP).
    """
    weight = float(update.num_examples) if weighted else 1.0
    x = flatten_trainables(update, parts).numpy()
    return np.concatenate([weight * x, [weight]])


def decode_aggregate(
    result: SecAggResult,
    *,
    template: ClientUpdate,
    parts: Parts,
    inner: Aggregator,
) -> AggregationResult:
    """Turn the unmasked weighted sum into the inner aggregator's result.

    Args:
        result: the server's :class:`SecAggResult` (total = [sum w x_k, sum w]).
        template: an update with the round's layout and frozen factors (e.g. the global
            adapters wrapped in a ClientUpdate).
        parts: what the aggregator trains.
        inner: a linear aggregator (fedit, fedsb, ffa).

    Raises:
        ValueError: a non-linear inner aggregator, a length mismatch, or a total weight that
            does not round to a positive count (<= 0.5, or not finite).
    """
    if not inner.linear or inner.supports_mixed_ranks:
        raise ValueError(f"secure aggregation needs a linear aggregator, got {inner.name!r}")
    total = np.asarray(result.total, dtype=np.float64)
    if total.shape != (vector_length(template, parts=parts),):
        raise ValueError(f"unmasked sum has shape {total.shape}; the template needs D + 1")
    weight = float(total[-1])
    if not weight > 0.5 or not math.isfinite(weight):  # round(0.5) == 0: no count
        raise ValueError(f"unmasked total weight {weight} is not a positive count")
    mean = torch.from_numpy(total[:-1] / weight)  # (D,) the weighted mean of the uploads
    synthetic = unflatten_trainables(
        mean, template, parts, client_id="secagg-aggregate", num_examples=round(weight)
    )
    out = inner.aggregate([synthetic])
    metrics = {**out.metrics, "clients": float(len(result.included)), "total_weight": weight}
    return AggregationResult(
        adapters=out.adapters, base_delta=out.base_delta, metrics=metrics, extras=out.extras
    )
