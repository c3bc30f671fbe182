"""Helpers every aggregator shares: client weights, weighted means, input checks, LoRA init.

Weights follow docs/algorithms.md: ``p_k = n_k / sum_j n_j`` over the clients that replied this
round (the updates given), never over the clients that were sampled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedft.types import ClientUpdate, LoraFactors

__all__ = [
    "average_extras",
    "check_updates",
    "client_weights",
    "fresh_lora",
    "weighted_mean",
]


def client_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """Return the aggregation weights ``p_k = n_k / sum n`` (python floats, summing to 1).

    Args:
        updates: the replies of this round, in the order the weights are wanted.

    Raises:
        ValueError: when there are no updates.
    """
    if not updates:
        raise ValueError("no client updates to aggregate: at least one client must reply")
    total = sum(int(u.num_examples) for u in updates)
    return [int(u.num_examples) / total for u in updates]


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Return ``sum_k weights[k] * tensors[k]``, accumulated in float64.

    Args:
        tensors: K tensors of one shape.
        weights: K weights (normally the p_k of :func:`client_weights`).

    Returns:
        A tensor of the common shape in the dtype of ``tensors[0]``.
    """
    if len(tensors) != len(weights) or not tensors:
        raise ValueError(f"need one weight per tensor; got {len(tensors)} and {len(weights)}")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for w, t in zip(weights, tensors, strict=True):
        acc.add_(t.detach().to(torch.float64), alpha=float(w))
    return acc.to(tensors[0].dtype)


def average_extras(updates: Sequence[ClientUpdate], weights: Sequence[float]) -> dict[str, Tensor]:
    """Average the dense trainables (classifier head, soft prompts) by ``p_k``.

    Every aggregator calls this one function, so dense extras are treated alike everywhere.

    Args:
        updates: the replies, each with the same ``extras`` names and shapes.
        weights: p_k, one per update.

    Raises:
        ValueError: when clients send different extras names or shapes (naming the clients).
    """
    first = updates[0]
    names = set(first.extras)
    for u in updates[1:]:
        if set(u.extras) != names:
            raise ValueError(
                f"clients {first.client_id!r} and {u.client_id!r} send different extras: "
                f"{sorted(names)} vs {sorted(u.extras)}"
            )
        for name in names:
            if u.extras[name].shape != first.extras[name].shape:
                raise ValueError(
                    f"extras {name!r}: client {first.client_id!r} sends shape "
                    f"{tuple(first.extras[name].shape)}, client {u.client_id!r} "
                    f"{tuple(u.extras[name].shape)}"
                )
    return {
        name: weighted_mean([u.extras[name] for u in updates], weights) for name in sorted(names)
    }


def check_updates(
    updates: Sequence[ClientUpdate],
    *,
    algorithm: str,
    mixed_ranks: bool,
    middle: bool = False,
) -> list[ClientUpdate]:
    """Validate one round's updates and return them in a canonical order (by client id).

    Sorting by client id makes every aggregate bitwise independent of the order in which
    replies arrived.

    Args:
        updates: the replies of this round.
        algorithm: the aggregator's name (used in error messages).
        mixed_ranks: whether clients may use different ranks and scalings.
        middle: whether every adapter must carry a Fed-SB middle matrix ``r``
            (and no other algorithm may receive one).

    Returns:
        The updates sorted by ``client_id``.

    Raises:
        ValueError: no updates, a client twice, different module sets, different weight
            shapes, or (when ``mixed_ranks`` is False) different ranks or scalings.
    """
    if not updates:
        raise ValueError(f"{algorithm}: no client updates to aggregate")
    ordered = sorted(updates, key=lambda u: u.client_id)
    ids = [u.client_id for u in ordered]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"{algorithm}: client(s) {dupes} reply more than once this round")
    ref = ordered[0]
    modules = set(ref.adapters)
    if not modules and not ref.extras:  # prompt tuning sends only extras; nothing is not ok
        raise ValueError(f"{algorithm}: client {ref.client_id!r} sends no adapters or extras")
    for u in ordered:
        if set(u.adapters) != modules:
            missing = sorted(modules - set(u.adapters))
            extra = sorted(set(u.adapters) - modules)
            raise ValueError(
                f"{algorithm}: client {u.client_id!r} adapts different modules than client "
                f"{ref.client_id!r} (missing {missing}, extra {extra})"
            )
        for name in modules:
            mine, theirs = u.adapters[name], ref.adapters[name]
            if (mine.r is not None) != middle:
                want = "with" if middle else "without"
                raise ValueError(
                    f"{algorithm}: module {name!r} of client {u.client_id!r} must come "
                    f"{want} a Fed-SB middle matrix r"
                )
            if mine.shape != theirs.shape:
                raise ValueError(
                    f"{algorithm}: module {name!r} has weight shape {theirs.shape} at client "
                    f"{ref.client_id!r} but {mine.shape} at client {u.client_id!r}"
                )
            if not mixed_ranks and (mine.rank != theirs.rank or mine.scaling != theirs.scaling):
                raise ValueError(
                    f"{algorithm}: module {name!r} has rank {theirs.rank} (scaling "
                    f"{theirs.scaling}) at client {ref.client_id!r} but rank {mine.rank} "
                    f"(scaling {mine.scaling}) at client {u.client_id!r}; {algorithm} averages "
                    "factors of one shape: use 'flora' or 'hetlora' for mixed ranks"
                )
    return ordered


def fresh_lora(
    shapes: Mapping[str, tuple[int, int]],
    *,
    rank: int,
    scaling: float,
    generator: torch.Generator,
) -> dict[str, LoraFactors]:
    """Return peft's default LoRA init: A kaiming-uniform (as ``nn.Linear``), B = 0.

    ``kaiming_uniform_(a=sqrt(5))`` on A (r, in) draws from U(-1/sqrt(in), 1/sqrt(in)),
    exactly what peft's ``LoraLayer.reset_lora_parameters`` does. Modules are drawn in
    sorted-name order, so the result depends only on the generator's state.

    Args:
        shapes: module -> (out_features, in_features).
        rank: r > 0.
        scaling: the LoRA scale ``alpha / r``.
        generator: the source of randomness (seed it for reproducible runs).
    """
    if rank <= 0:
        raise ValueError(f"rank = {rank} is not allowed: a LoRA rank must be >= 1")
    out: dict[str, LoraFactors] = {}
    for name in sorted(shapes):
        n_out, n_in = (int(x) for x in shapes[name])
        a = torch.empty(rank, n_in)
        torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)  # (r, in)
        out[name] = LoraFactors(a=a, b=torch.zeros(n_out, rank), scaling=float(scaling))
    return out
