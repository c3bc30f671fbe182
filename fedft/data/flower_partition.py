"""Flower Datasets' partitioners over fedft's examples, by the names Flower users know.

Each method builds a local ``datasets.Dataset`` with one row per example (its partition key
and its index; no hub, nothing downloaded), shuffled by ``seed`` as Flower's own
``FederatedDataset`` does, hands it to the flwr-datasets partitioner and reads back, per
client, the indices it assigned. So the split is Flower's, the indices are fedft's.

- ``pathological``: each client holds ``classes_per_client`` labels (McMahan et al. 2017's
  "pathological non-IID"); ``class_assignment`` = random / deterministic / first-deterministic.
- ``shard``: examples sorted by label, cut into shards, ``shards_per_client`` shards (or
  shards of ``shard_size``) per client (McMahan et al. 2017).
- ``inner_dirichlet``: client sizes fixed (``partition_sizes``, equal when empty), each
  client's label mix drawn from Dir(alpha) (Yurochkin et al. 2019).
- ``linear`` / ``square`` / ``exponential``: client k gets a share of the examples
  proportional to k + 1, (k + 1)² or e^(k + 1): quantity skew with IID labels.
- ``size``: the given ``partition_sizes``, IID labels.
- ``natural_id``: one client per group (movie, category, a file's ``group`` column).
- ``grouped_natural``: ``group_size`` whole groups per client (``group_mode`` for the rest).

Flower's ``DirichletPartitioner`` and ``IidPartitioner`` are not routed here: fedft's own
``dirichlet`` / ``iid`` (``fedft.data.partition``) keep their splits (and the quickstart's
metrics), and importing flwr-datasets costs seconds in every process that builds data.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from fedft.config import LibraryPartition

log = logging.getLogger(__name__)

LibraryMethod = LibraryPartition
LIBRARY_METHODS: tuple[LibraryMethod, ...] = get_args(LibraryPartition)
#: methods that derive the number of clients from the data (it must equal num_clients).
DERIVED_COUNT = ("natural_id", "grouped_natural")


@dataclass(frozen=True, kw_only=True)
class PartitionOptions:
    """Parameters of the flwr-datasets partitioners (each method reads its own).

    Attributes:
        classes_per_client: ``pathological``: labels per client.
        class_assignment: ``pathological``: how labels go to clients.
        shards_per_client: ``shard``: shards per client (0 = from ``shard_size``).
        shard_size: ``shard``: examples per shard (0 = from ``shards_per_client``).
        partition_sizes: ``size`` / ``inner_dirichlet``: examples per client (empty = equal).
        group_size: ``grouped_natural``: groups per client.
        group_mode: ``grouped_natural``: what happens to the groups left over.
    """

    classes_per_client: int = 2
    class_assignment: Literal["random", "deterministic", "first-deterministic"] = "random"
    shards_per_client: int = 2
    shard_size: int = 0
    partition_sizes: tuple[int, ...] = ()
    group_size: int = 2
    group_mode: Literal["allow-smaller", "allow-bigger", "drop-reminder", "strict"] = (
        "allow-smaller"
    )


def _equal_sizes(n: int, num_clients: int) -> list[int]:
    return [n // num_clients + (k < n % num_clients) for k in range(num_clients)]


def _partitioner(
    method: str, *, num_clients: int, n: int, alpha: float, seed: int, options: PartitionOptions
) -> Any:
    """The flwr-datasets partitioner for ``method`` (imported here: the import is slow)."""
    from flwr_datasets import partitioner as fp

    o, by = options, "key"
    sizes = list(o.partition_sizes) or _equal_sizes(n, num_clients)
    if method == "pathological":
        return fp.PathologicalPartitioner(
            num_partitions=num_clients,
            partition_by=by,
            num_classes_per_partition=o.classes_per_client,
            class_assignment_mode=o.class_assignment,
            seed=seed,
        )
    if method == "shard":
        return fp.ShardPartitioner(
            num_partitions=num_clients,
            partition_by=by,
            num_shards_per_partition=o.shards_per_client or None,
            shard_size=o.shard_size or None,
            seed=seed,
        )
    if method == "inner_dirichlet":
        return fp.InnerDirichletPartitioner(
            partition_sizes=sizes, partition_by=by, alpha=alpha, seed=seed
        )
    if method in ("linear", "square", "exponential"):
        cls = {
            "linear": fp.LinearPartitioner,
            "square": fp.SquarePartitioner,
            "exponential": fp.ExponentialPartitioner,
        }[method]
        return cls(num_partitions=num_clients)
    if method == "size":
        return fp.SizePartitioner(partition_sizes=sizes)
    if method == "natural_id":
        return fp.NaturalIdPartitioner(partition_by=by)
    if method == "grouped_natural":
        return fp.GroupedNaturalIdPartitioner(
            partition_by=by, group_size=o.group_size, mode=o.group_mode
        )
    raise ValueError(f"method = {method!r} is not allowed: one of {', '.join(LIBRARY_METHODS)}")


def library_partition(
    keys: Sequence[Hashable],
    *,
    method: str,
    num_clients: int,
    alpha: float,
    seed: int,
    options: PartitionOptions,
) -> list[list[int]]:
    """Split ``0..len(keys)-1`` over ``num_clients`` clients with flwr-datasets' ``method``.

    Args:
        keys: one partition key per example (label or group; ignored by the size-skew ones).
        method: one of :data:`LIBRARY_METHODS`.
        num_clients: clients; must equal the count a natural method derives from the data.
        alpha: Dirichlet concentration (``inner_dirichlet``).
        seed: shuffles the examples and seeds the partitioner.
        options: the methods' own parameters.

    Returns:
        Per client, its sorted example indices (disjoint; ``size`` and a ``shard`` split
        with leftovers may leave examples unassigned, as in Flower).

    Raises:
        ValueError: the method cannot give ``num_clients`` clients some data, naming the
            config keys to change.
    """
    from datasets import Dataset, disable_progress_bars

    disable_progress_bars()
    n = len(keys)
    order = np.random.default_rng(seed).permutation(n)
    column = [keys[i] for i in order]
    dataset = Dataset.from_dict({"key": column, "index": order.tolist()})
    where = f"data.partition = {method!r} ({n} examples, {num_clients} clients)"
    try:
        p = _partitioner(
            method, num_clients=num_clients, n=n, alpha=alpha, seed=seed, options=options
        )
        p.dataset = dataset
        count = p.num_partitions
        if count != num_clients:
            hint = (
                "one client per group: set federation.num_clients to that"
                if method == "natural_id"
                else "set federation.num_clients to that, or change data.group_size"
            )
            raise ValueError(f"the data gives {count} clients, not {num_clients}; {hint}")
        parts = [sorted(p.load_partition(k)["index"]) for k in range(num_clients)]
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"{where}: {exc}") from exc
    for k, part in enumerate(parts):
        if not part:
            raise ValueError(
                f"{where}: client {k} gets 0 examples; use fewer clients "
                "(federation.num_clients) or another data.partition"
            )
    log.debug("partition %s (flwr-datasets): client sizes %s", method, [len(p) for p in parts])
    return parts
