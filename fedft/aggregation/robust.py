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

None of them subclasses an algorithm; they share the :class:`_Composed` shell that
delegates the interface to ``inner``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from fedft.aggregation.base import Aggregator
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

Parts = Literal["ab", "b", "r"]


def trainable_tensors(
    adapters: Mapping[str, LoraFactors], extras: Mapping[str, Tensor], parts: Parts
) -> list[tuple[str, Tensor]]:
    """List the uploaded tensors in the canonical layout order.

    Args:
        adapters: module -> LoraFactors.
        extras: name -> dense tensor (classifier head, soft prompt).
        parts: what is trained: ``"ab"`` (a then b), ``"b"`` or ``"r"`` (Fed-SB middle).

    Returns:
        [(key, tensor)] with keys ``"<module>.a"``, ``"<module>.b"``, ``"<module>.r"``,
        ``"extras.<name>"``; modules and extras sorted by name.

    Raises:
        ValueError: ``parts`` is ``"r"`` but a module has no middle matrix.
    """
    out: list[tuple[str, Tensor]] = []
    for mod in sorted(adapters):
        f = adapters[mod]
        if parts == "ab":
            out += [(f"{mod}.a", f.a), (f"{mod}.b", f.b)]
        elif parts == "b":
            out.append((f"{mod}.b", f.b))
        else:
            if f.r is None:
                raise ValueError(f"module {mod!r} has no Fed-SB middle matrix r")
            out.append((f"{mod}.r", f.r))
    out += [(f"extras.{name}", extras[name]) for name in sorted(extras)]
    return out


def flatten_trainables(update: ClientUpdate, parts: Parts) -> Tensor:
    """Concatenate a client's uploaded tensors into one float64 vector (D,)."""
    tensors = trainable_tensors(update.adapters, update.extras, parts)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for _, t in tensors])


def unflatten_trainables(
    vector: Tensor,
    template: ClientUpdate,
    parts: Parts,
    *,
    client_id: str,
    num_examples: int,
) -> ClientUpdate:
    """Inverse of :func:`flatten_trainables`: put ``vector`` back into ``template``'s shape.

    Frozen tensors (A and B under ``"r"``, A under ``"b"``) and scalings come from
    ``template``; trainable tensors take ``template``'s dtypes.

    Args:
        vector: (D,) with D = the template's trainable element count.
        template: gives names, shapes, dtypes and the frozen tensors.
        parts: the layout, as in :func:`trainable_tensors`.
        client_id: id of the returned update.
        num_examples: n of the returned update (>= 1).
    """
    layout = trainable_tensors(template.adapters, template.extras, parts)
    total = sum(t.numel() for _, t in layout)
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"vector has shape {tuple(vector.shape)}, layout needs ({total},)")
    values: dict[str, Tensor] = {}
    offset = 0
    for key, t in layout:
        values[key] = vector[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
        offset += t.numel()
    adapters = {
        mod: LoraFactors(
            a=values.get(f"{mod}.a", f.a),
            b=values.get(f"{mod}.b", f.b),
            scaling=f.scaling,
            r=values.get(f"{mod}.r", f.r),
        )
        for mod, f in template.adapters.items()
    }
    extras = {name: values[f"extras.{name}"] for name in template.extras}
    return ClientUpdate(
        client_id=client_id,
        adapters=adapters,
        num_examples=num_examples,
        extras=extras,
    )


def _stack(updates: Sequence[ClientUpdate], parts: Parts) -> Tensor:
    """(K, D): one flattened upload per client, checking that the layouts agree."""
    if not updates:
        raise ValueError("no client updates to aggregate")
    first = trainable_tensors(updates[0].adapters, updates[0].extras, parts)
    layout = [(k, tuple(t.shape)) for k, t in first]
    for u in updates[1:]:
        mine = [(k, tuple(t.shape)) for k, t in trainable_tensors(u.adapters, u.extras, parts)]
        if mine != layout:
            raise ValueError(
                f"client {u.client_id!r} uploads a different layout than client "
                f"{updates[0].client_id!r}: validate updates first (fedft.aggregation.validate)"
            )
    return torch.stack([flatten_trainables(u, parts) for u in updates])


def _require_linear(inner: Aggregator, wrapper: str) -> None:
    if not inner.linear or inner.supports_mixed_ranks:
        raise ValueError(
            f"{wrapper} composes around a linear, single-rank aggregator (fedit, fedsb, ffa); "
            f"got {inner.name!r}"
        )


class _Composed(Aggregator):
    """Shared shell of the wrappers: delegates everything but ``aggregate`` to ``inner``."""

    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = False

    def __init__(self, inner: Aggregator) -> None:
        super().__init__()
        _require_linear(inner, type(self).__name__)
        self.inner = inner

    # A ClassVar in the interface, but a wrapper uploads whatever its inner one trains.
    @property
    def trainable(self) -> Parts:  # type: ignore[override]
        """What clients train and upload: the inner aggregator's ``trainable``."""
        return self.inner.trainable

    def init_global(
        self,
        shapes: Mapping[str, tuple[int, int]],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Delegate to the inner aggregator."""
        return self.inner.init_global(shapes, rank=rank, scaling=scaling, generator=generator)

    def client_start(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        rank: int,
        scaling: float,
        generator: torch.Generator,
    ) -> dict[str, LoraFactors]:
        """Delegate to the inner aggregator."""
        return self.inner.client_start(
            global_adapters, rank=rank, scaling=scaling, generator=generator
        )

    def state_dict(self) -> dict[str, Any]:
        """Return this wrapper's name and the inner aggregator's state."""
        return {"name": self.name, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if state.get("name") != self.name:
            raise ValueError(f"cannot load a {state.get('name')!r} state into {self.name!r}")
        self.inner.load_state_dict(state["inner"])

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
        stacked = _stack(updates, self.trainable)  # (K, D)
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
        stacked = _stack(updates, self.trainable)  # (K, D)
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
        self._reference: Mapping[str, LoraFactors] | None = None
        self._reference_extras: Mapping[str, Tensor] = {}
        if reference is not None:
            self.set_reference(reference, extras=reference_extras)

    def set_reference(
        self,
        global_adapters: Mapping[str, LoraFactors],
        *,
        extras: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Set what every client started this round from (module -> LoraFactors, extras)."""
        self._reference = dict(global_adapters)
        self._reference_extras = dict(extras or {})

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Clip every client's delta to ``bound`` and aggregate the clipped updates."""
        if self._reference is None:
            raise ValueError("NormBound: call set_reference(global_adapters) before aggregate")
        stacked = _stack(updates, self.trainable)  # (K, D)
        template = updates[0]
        missing = sorted(set(template.extras) - set(self._reference_extras))
        if missing:
            raise ValueError(f"NormBound: no reference extras for {missing}; pass extras=")
        ref_update = ClientUpdate(
            client_id="reference",
            adapters=self._reference,
            num_examples=1,
            extras={k: self._reference_extras[k] for k in template.extras},
        )
        ref = _stack([template, ref_update], self.trainable)[1]  # (D,), checks the layout
        deltas = stacked - ref  # (K, D)
        norms = deltas.norm(dim=1)  # (K,)
        factors = torch.clamp(self.bound / norms.clamp_min(1e-300), max=1.0)  # (K,)
        clipped: list[ClientUpdate] = []
        for u, vec, norm, factor in zip(updates, deltas, norms, factors, strict=True):
            if factor < 1.0:
                logger.info(
                    "norm_bound: client %s update norm %.4g clipped to %.4g",
                    u.client_id,
                    float(norm),
                    self.bound,
                )
            clipped.append(
                unflatten_trainables(
                    ref + factor * vec,
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
                "clipped_clients": float(int((factors < 1.0).sum())),
                "max_update_norm": float(norms.max()),
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
