"""Split example indices over clients: fedft's own three, or Flower Datasets' by name.

fedft's own: IID, Dirichlet label skew, natural groups; the others are Flower Datasets'
partitioners (``fedft.data.flower_partition``).

Every method returns one index list per client; the lists are disjoint and deterministic
under ``seed`` (fedft's own three cover every index). A client left without data is an
error, never a silently empty client. :class:`PartitionSummary` is what a run shows of the
split: examples and label mix per client.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, get_args

import numpy as np

from fedft.config import OwnPartition, PartitionMethod
from fedft.data.flower_partition import LIBRARY_METHODS, PartitionOptions, library_partition

log = logging.getLogger(__name__)

Method = PartitionMethod
OWN_METHODS: tuple[OwnPartition, ...] = get_args(OwnPartition)
METHODS: tuple[Method, ...] = get_args(PartitionMethod)
#: methods whose key is the example's label on classification (its group on causal_lm).
LABEL_METHODS = ("dirichlet", "pathological", "shard", "inner_dirichlet")
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
    options: PartitionOptions | None = None,
) -> list[list[int]]:
    """Assign the indices ``0..len(keys)-1`` to ``num_clients`` clients.

    Args:
        keys: one key per example: the label (``dirichlet`` and the other label-skew
            methods) or the group (``natural``, ``natural_id``, ``grouped_natural``);
            ignored by ``iid`` and the size-skew methods.
        num_clients: number of clients (>= 1).
        method: ``"iid"`` (seeded shuffle, equal sizes ±1), ``"dirichlet"`` (label skew,
            Hsu et al. 2019, concentration ``alpha``: small = skewed), ``"natural"``
            (whole groups per client, balanced greedily by size), or one of Flower
            Datasets' partitioners (:data:`LIBRARY_METHODS`, see
            ``fedft.data.flower_partition``).
        alpha: Dirichlet concentration (> 0).
        seed: the only source of randomness.
        min_size: fewest examples each client must get under ``dirichlet`` (resampled until
            met); the other methods require at least one.
        options: parameters of the flwr-datasets methods (defaults when None).

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
    elif method in LIBRARY_METHODS:
        parts = library_partition(
            keys,
            method=method,
            num_clients=num_clients,
            alpha=alpha,
            seed=seed,
            options=options or PartitionOptions(),
        )
    else:
        raise ValueError(f"method = {method!r} is not allowed: one of {', '.join(METHODS)}")
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


@dataclass(frozen=True)
class PartitionSummary:
    """What each client holds: examples and the mix of labels (or groups) per client.

    Attributes:
        method: the partition method.
        by: ``"label"`` (classification) or ``"group"`` (causal_lm: category, ...).
        names: the label (group) names, one per column of ``counts``.
        counts: ``counts[k][j]`` = examples of client k with label ``names[j]``.
    """

    method: str
    by: str
    names: tuple[str, ...]
    counts: tuple[tuple[int, ...], ...]

    @classmethod
    def of(
        cls, parts: Sequence[Sequence[int]], keys: Sequence[Any], names: Sequence[str], **kw: str
    ) -> PartitionSummary:
        """Count ``keys`` (label ids indexing ``names``, or the names themselves) per part."""
        column = {key: j for j, key in enumerate(names)}
        counts = []
        for part in parts:
            row = [0] * len(names)
            for i in part:
                key = keys[i]
                row[key if isinstance(key, int) else column[key]] += 1
            counts.append(tuple(row))
        return cls(names=tuple(names), counts=tuple(counts), **kw)

    @property
    def examples(self) -> list[int]:
        """Examples per client."""
        return [sum(row) for row in self.counts]

    def skew(self) -> float:
        """Mean total-variation distance of the clients' label mix from the overall mix."""
        total = np.asarray(self.counts, dtype=float)
        if total.size == 0 or total.sum() == 0:
            return 0.0
        overall = total.sum(axis=0) / total.sum()
        rows = total[total.sum(axis=1) > 0]
        mix = rows / rows.sum(axis=1, keepdims=True)
        return float(np.mean(0.5 * np.abs(mix - overall).sum(axis=1)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``summary.json``'s ``partition``)."""
        return {
            "method": self.method,
            "by": self.by,
            "names": list(self.names),
            "counts": [list(row) for row in self.counts],
            "examples": self.examples,
            "skew": self.skew(),
        }

    def format(self, *, top: int = 3) -> str:
        """A short table: per client, its examples and its ``top`` largest labels (%)."""
        lines = [
            f"partition {self.method!r}: {len(self.counts)} clients, {sum(self.examples)} "
            f"training examples; {self.by} mix per client (mean distance from the overall "
            f"mix {self.skew():.2f}: 0 = every client alike, 1 = disjoint)"
        ]
        for k, row in enumerate(self.counts):
            n = sum(row)
            biggest = sorted(range(len(row)), key=lambda j: (-row[j], j))[:top]
            mix = ", ".join(f"{self.names[j]} {100 * row[j] / n:.0f}%" for j in biggest if row[j])
            more = sum(1 for j in range(len(row)) if row[j]) - len(biggest)
            lines.append(
                f"  client {k:>3}: {n:>6} examples  {mix}"
                + (f" (+{more} more)" if more > 0 else "")
            )
        return "\n".join(lines)
