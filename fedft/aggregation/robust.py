"""Byzantine-robust wrappers that compose around a linear aggregator (fedit, fedsb, ffa).

Each wrapper works on what clients train and upload (``inner.trainable``: A and B for
fedit, B for ffa, R for fedsb) plus the dense extras, flattened into one vector per client
by :func:`flatten_trainables` (a fixed layout: modules by name, then extras by name).

- :class:`NormBound` clips each client's update delta (upload minus the round's reference,
  all tensors together) to an L2 bound, then hands the clipped updates to the inner
  aggregator, which keeps its own p_k weighting and math (Sun et al., "Can You Really
  Backdoor Federated Learning?", 2019).
- :class:`CoordinateMedian` and :class:`TrimmedMean` compute the robust estimate
  coordinate by coordinate over the clients (Yin et al., "Byzantine-Robust Distributed
  Learning", ICML 2018), with uniform weights: a client claiming a huge n_k must not buy a
  larger say. The estimate is itself the aggregate; the inner aggregator is then reused
  only to build its result format (frozen A/B of fedsb, shared A of ffa, metrics), by
  aggregating the single synthetic update that carries the estimate. That relies on the
  one-client-is-identity invariant every aggregator is tested for.

None of them subclasses an algorithm; they share :class:`~fedft.aggregation.wrapper.Wrapper`,
the shell that delegates the interface to ``inner`` and keeps the round's reference. The
flat layout and the clip live in :mod:`fedft.aggregation.flat` (re-exported here).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from torch import Tensor

from fedft.aggregation.base import Aggregator
from fedft.aggregation.flat import (
    clip_l2,
    flatten_trainables,
    stack_trainables,
    trainable_tensors,
    unflatten_trainables,
)
from fedft.aggregation.wrapper import Wrapper
from fedft.types import AggregationResult, ClientUpdate, LoraFactors

__all__ = [
    "CoordinateMedian",
    "NormBound",
    "TrimmedMean",
    "flatten_trainables",
    "make_robust",
    "trainable_tensors",
    "unflatten_trainables",
]

logger = logging.getLogger(__name__)


class _Composed(Wrapper):
    """The robust estimators' shell: the inner aggregator formats their estimate."""

    def _finish(
        self, estimate: Tensor, updates: Sequence[ClientUpdate], metrics: Mapping[str, float]
    ) -> AggregationResult:
        """Wrap a robust estimate (D,) as one synthetic update and let ``inner`` format it."""
        total_n = sum(int(u.num_examples) for u in updates)
        synthetic = unflatten_trainables(
            estimate,
            updates[0],
            self.trainable,
            client_id=f"{self.name}-aggregate",
            num_examples=total_n,
        )
        result = self.inner.aggregate([synthetic])
        return AggregationResult(
            adapters=result.adapters,
            base_delta=result.base_delta,
            metrics={**result.metrics, **metrics, "clients": float(len(updates))},
            extras=result.extras,
        )


def _median(stacked: Tensor) -> Tensor:
    """Coordinate-wise median of (K, D) over K; the mean of the middle two when K is even."""
    k = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    if k % 2:
        return ordered[k // 2]
    return 0.5 * (ordered[k // 2 - 1] + ordered[k // 2])


def _trimmed_mean(stacked: Tensor, trim: int) -> Tensor:
    """Drop the ``trim`` smallest and largest values per coordinate of (K, D), average the rest."""
    k = stacked.shape[0]
    ordered = stacked.sort(dim=0).values
    return ordered[trim : k - trim].mean(dim=0)


class CoordinateMedian(_Composed):
    """Coordinate-wise median of the uploads (uniform weights), formatted by ``inner``.

    Tolerates fewer than half of the clients being arbitrary (breakdown point 1/2).
    """

    name: ClassVar[str] = "median"

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return the median of each uploaded coordinate as the aggregate."""
        stacked = stack_trainables(updates, self.trainable)  # (K, D)
        return self._finish(_median(stacked), updates, {})


class TrimmedMean(_Composed):
    """Coordinate-wise trimmed mean (uniform weights), formatted by ``inner``.

    Args:
        inner: a linear aggregator.
        trim_fraction: beta in [0, 0.5); floor(beta * K) values are dropped at each end of
            every coordinate. Tolerates up to that many arbitrary clients.
    """

    name: ClassVar[str] = "trimmed_mean"

    def __init__(self, inner: Aggregator, *, trim_fraction: float) -> None:
        super().__init__(inner)
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim_fraction={trim_fraction} must be in [0, 0.5)")
        self.trim_fraction = float(trim_fraction)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return the trimmed mean of each uploaded coordinate as the aggregate."""
        stacked = stack_trainables(updates, self.trainable)  # (K, D)
        trim = math.floor(self.trim_fraction * stacked.shape[0])
        estimate = _trimmed_mean(stacked, trim)
        return self._finish(estimate, updates, {"trimmed_per_side": float(trim)})


class NormBound(_Composed):
    """Clip each client's update delta to an L2 bound, then aggregate with ``inner``.

    The delta is the upload minus the reference (the adapters and extras every client
    started this round from), over all uploaded tensors together. A client with
    ||delta|| > bound is replaced by reference + delta * bound / ||delta||; the clipped
    updates go to ``inner`` with their own n_k, so its math and weighting are untouched.

    Args:
        inner: a linear aggregator.
        bound: the L2 bound (> 0) on the whole flattened delta.
        reference: the round's global adapters; set it each round with
            :meth:`set_reference` before :meth:`aggregate`.
        reference_extras: the round's global extras (needed when updates carry extras).
    """

    name: ClassVar[str] = "norm_bound"

    def __init__(
        self,
        inner: Aggregator,
        *,
        bound: float,
        reference: Mapping[str, LoraFactors] | None = None,
        reference_extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(inner)
        if not bound > 0 or not math.isfinite(bound):
            raise ValueError(f"bound={bound} must be a positive finite L2 norm")
        self.bound = float(bound)
        if reference is not None:
            self.set_reference(reference, extras=reference_extras)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Clip every client's delta to ``bound`` and aggregate the clipped updates."""
        reference = self.reference_update()
        stacked = stack_trainables(updates, self.trainable)  # (K, D)
        template = updates[0]
        missing = sorted(set(template.extras) - set(reference.extras))
        if missing:
            raise ValueError(f"NormBound: no reference extras for {missing}; pass extras=")
        ref_update = ClientUpdate(
            client_id="reference",
            adapters=reference.adapters,
            num_examples=1,
            extras={k: reference.extras[k] for k in template.extras},
        )
        ref = stack_trainables([template, ref_update], self.trainable)[1]  # (D,), checks layout
        clipped: list[ClientUpdate] = []
        norms: list[float] = []
        for u, vec in zip(updates, stacked, strict=True):
            delta, norm = clip_l2(vec - ref, self.bound)
            norms.append(norm)
            if norm > self.bound:
                logger.info(
                    "norm_bound: client %s update norm %.4g clipped to %.4g",
                    u.client_id,
                    norm,
                    self.bound,
                )
            clipped.append(
                unflatten_trainables(
                    ref + delta,
                    u,
                    self.trainable,
                    client_id=u.client_id,
                    num_examples=u.num_examples,
                )
            )
        result = self.inner.aggregate(clipped)
        return AggregationResult(
            adapters=result.adapters,
            base_delta=result.base_delta,
            metrics={
                **result.metrics,
                "clipped_clients": float(sum(n > self.bound for n in norms)),
                "max_update_norm": max(norms),
            },
            extras=result.extras,
        )


_KINDS: dict[str, Callable[..., Aggregator]] = {
    "norm_bound": NormBound,
    "median": CoordinateMedian,
    "trimmed_mean": TrimmedMean,
}


def make_robust(kind: str, inner: Aggregator, **options: Any) -> Aggregator:
    """Wrap ``inner`` in the robust aggregator named ``kind``.

    Args:
        kind: ``"norm_bound"`` (options: bound, reference, reference_extras),
            ``"median"`` (no options) or ``"trimmed_mean"`` (options: trim_fraction).
        inner: a linear aggregator (fedit, fedsb, ffa).
        **options: keyword options of the chosen wrapper.

    Raises:
        ValueError: an unknown kind (listing the known ones) or bad options.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown robust aggregator {kind!r}; choose one of {sorted(_KINDS)}")
    try:
        return _KINDS[kind](inner, **options)
    except TypeError as exc:
        raise ValueError(f"bad options for robust aggregator {kind!r}: {exc}") from exc
