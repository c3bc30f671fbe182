"""One vector per client: the layout of what clients upload, and the one L2 clip.

Robust aggregation, user-level DP and secure aggregation all work on a client's uploads
(``parts``: A and B for fedit, B for ffa, R for fedsb) plus the dense extras, flattened
into one float64 vector in a fixed layout (modules by name, then extras by name):
:func:`flatten_trainables` and its inverse :func:`unflatten_trainables`.
:func:`clip_l2` is the one clip every bound on an update's size uses (norm bound, DP-FedAvg's
C, a secure-aggregation client clipping itself).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedft.types import ClientUpdate, LoraFactors, Parts

__all__ = [
    "clip_l2",
    "flatten_trainables",
    "stack_trainables",
    "trainable_tensors",
    "unflatten_trainables",
]


def clip_l2(delta: Tensor, bound: float) -> tuple[Tensor, float]:
    """``delta * min(1, bound / ||delta||_2)`` and ``||delta||_2`` (before the clip).

    Args:
        delta: (D,) one client's update delta (upload minus reference), float64.
        bound: the L2 bound C (> 0; ``inf`` clips nothing).
    """
    norm = float(delta.norm())
    factor = 1.0 if norm <= bound else bound / norm
    return delta * factor, norm


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


def stack_trainables(updates: Sequence[ClientUpdate], parts: Parts) -> Tensor:
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
