"""Split example indices over clients: IID, Dirichlet label skew, or natural groups.

Every method returns one index list per client; the lists are disjoint, cover every index,
and are deterministic under ``seed``. A client left without data is an error, never a
silently empty client.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)

Method = Literal["iid", "dirichlet", "natural"]
#: resampling attempts of the Dirichlet split before giving up.
MAX_DIRICHLET_TRIES = 1000


def _check_sizes(parts: list[list[int]], *, min_size: int, method: str, hint: str) -> None:
    for k, part in enumerate(parts):
        if len(part) < min_size:
            raise ValueError(
                f"partition {method!r}: client {k} gets {len(part)} examples "
                f"(needs at least {min_size}); {hint}"
            )


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    perm = rng.permutation(n)
    return [sorted(chunk.tolist()) for chunk in np.array_split(perm, num_clients)]


def _dirichlet(
    keys: Sequence[Hashable],
    num_clients: int,
    alpha: float,
    min_size: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    """Label-skew split of Hsu et al. (2019), as implemented in NIID-Bench (Li et al., 2022).

    For each label, client proportions are drawn from Dir(alpha · 1); a client already
    holding more than n / num_clients examples gets no more (keeps sizes from exploding).
    The whole draw is repeated until every client has ``min_size`` examples.
    """
    n = len(keys)
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    labels = sorted(members, key=repr)
    by_label = {label: np.array(members[label], dtype=np.int64) for label in labels}
    parts: list[list[int]] = []
    for _ in range(MAX_DIRICHLET_TRIES):
        parts = [[] for _ in range(num_clients)]
        for label in labels:
            idx = by_label[label].copy()
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(part) < n / num_clients for part in parts])
            if p.sum() == 0:  # every client is full: spread this label evenly.
                p = np.full(num_clients, 1.0)
            p = p / p.sum()
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.extend(chunk.tolist())
        if min(len(part) for part in parts) >= min_size:
            return [sorted(part) for part in parts]
    smallest = int(np.argmin([len(part) for part in parts]))
    raise ValueError(
        f"partition 'dirichlet': client {smallest} got fewer than {min_size} examples in "
        f"{MAX_DIRICHLET_TRIES} draws ({n} examples, {num_clients} clients, alpha={alpha}); "
        "use fewer clients (federation.num_clients) or a larger data.alpha"
    )


def _natural(
    keys: Sequence[Hashable], num_clients: int, rng: np.random.Generator
) -> list[list[int]]:
    """Whole groups to clients: largest group first, each to the least-loaded client.

    Groups of equal size are ordered by a seeded shuffle; load ties go to the lowest client.
    """
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        members.setdefault(key, []).append(i)
    groups = sorted(members, key=repr)
    order = rng.permutation(len(groups))
    shuffled = [groups[j] for j in order]
    shuffled.sort(key=lambda g: -len(members[g]))  # stable: seeded order among equal sizes
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for group in shuffled:
        k = min(range(num_clients), key=lambda c: (len(parts[c]), c))
        parts[k].extend(members[group])
    return [sorted(part) for part in parts]


def partition(
    keys: Sequence[int | str],
    *,
    num_clients: int,
    method: Method,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 2,
) -> list[list[int]]:
    """Assign the indices ``0..len(keys)-1`` to ``num_clients`` clients.

    Args:
        keys: one key per example: the label (``dirichlet``) or the group (``natural``);
            ignored by ``iid``.
        num_clients: number of clients (>= 1).
        method: ``"iid"`` (seeded shuffle, equal sizes ±1), ``"dirichlet"`` (label skew,
            Hsu et al. 2019, concentration ``alpha``: small = skewed) or ``"natural"``
            (whole groups per client, balanced greedily by size).
        alpha: Dirichlet concentration (> 0).
        seed: the only source of randomness.
        min_size: fewest examples each client must get under ``dirichlet`` (resampled until
            met); the other methods require at least one.

    Returns:
        Per client, its sorted example indices; disjoint, covering all indices.

    Raises:
        ValueError: bad arguments, or a client that would get no (or too little) data.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients = {num_clients} is not allowed: an integer >= 1")
    if alpha <= 0:
        raise ValueError(f"alpha = {alpha} is not allowed: the Dirichlet concentration must be > 0")
    n = len(keys)
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = _iid(n, num_clients, rng)
        _check_sizes(
            parts,
            min_size=1,
            method=method,
            hint="use fewer clients (federation.num_clients) or more data",
        )
    elif method == "dirichlet":
        if n < num_clients * min_size:
            raise ValueError(
                f"partition 'dirichlet': {n} examples cannot give {num_clients} clients "
                f"{min_size} each; use fewer clients (federation.num_clients)"
            )
        parts = _dirichlet(keys, num_clients, alpha, min_size, rng)
    elif method == "natural":
        num_groups = len(set(keys))
        parts = _natural(keys, num_clients, rng)
        _check_sizes(
            parts,
            min_size=1,
            method=method,
            hint=f"there are only {num_groups} groups: use at most that many clients "
            "(federation.num_clients) or another data.partition",
        )
    else:
        raise ValueError(
            f"method = {method!r} is not allowed: one of 'iid', 'dirichlet', 'natural'"
        )
    log.debug("partition %s: client sizes %s", method, [len(p) for p in parts])
    return parts


def label_skew(parts: Sequence[Sequence[int]], labels: Sequence[int | str]) -> float:
    """Mean total-variation distance between each client's label distribution and the global.

    TV(p, q) = ½ Σ_c |p_c − q_c| ∈ [0, 1]; 0 means every client has the global label mix.

    Args:
        parts: per client, its example indices (non-empty).
        labels: the label of every example.
    """
    classes = sorted(set(labels), key=repr)
    total = Counter(labels)
    q = np.array([total[c] / len(labels) for c in classes])
    distances = []
    for part in parts:
        if not part:
            raise ValueError("label_skew needs non-empty clients")
        counts = Counter(labels[i] for i in part)
        p = np.array([counts[c] / len(part) for c in classes])
        distances.append(0.5 * float(np.abs(p - q).sum()))
    return float(np.mean(distances))
