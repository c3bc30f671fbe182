"""Offline datasets, tokenisation and non-IID partitioners.

``build_federated_data`` is the one entry point a run needs: load → split (train / test /
public) → partition train over clients. It is memoised per process because every virtual
client served by a worker calls it with the same arguments.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

from fedft.data.datasets import (
    BUILTIN_DATASETS,
    Records,
    load_records,
    split_records,
)
from fedft.data.encode import IGNORE_INDEX, Encoded, batches, encode, eval_batches
from fedft.data.flower_partition import LIBRARY_METHODS, PartitionOptions
from fedft.data.partition import (
    LABEL_METHODS,
    METHODS,
    Method,
    PartitionSummary,
    label_skew,
    partition,
)
from fedft.data.partition import partition as _partition

__all__ = [
    "BUILTIN_DATASETS",
    "IGNORE_INDEX",
    "LIBRARY_METHODS",
    "METHODS",
    "Encoded",
    "FederatedData",
    "PartitionOptions",
    "PartitionSummary",
    "Records",
    "batches",
    "build_federated_data",
    "encode",
    "eval_batches",
    "label_skew",
    "load_records",
    "partition",
    "split_records",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FederatedData:
    """One run's data: per-client training records, a global test set and a public set.

    Shared by every caller in the process (memoised): treat it as read-only.

    Attributes:
        clients: training records of client k at index k.
        test: held-out examples no client trains on.
        public: server-side examples (e.g. Fed-SB init), in no client and not in ``test``.
        label_names: class names, index = class id; empty for causal_lm.
        summary: examples and label (causal_lm: group) mix per client.
    """

    clients: list[Records]
    test: Records
    public: Records
    label_names: tuple[str, ...]
    summary: PartitionSummary

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for causal_lm)."""
        return len(self.label_names)


@functools.lru_cache(maxsize=8)
def build_federated_data(
    *,
    dataset: str,
    task: str,
    partition: Method,
    alpha: float,
    num_clients: int,
    test_size: int,
    public_size: int,
    max_train_examples: int,
    seed: int,
    text_column: str = "text",
    label_column: str = "label",
    partition_options: PartitionOptions | None = None,
) -> FederatedData:
    """Load, split and partition a dataset (memoised per process on these arguments).

    The partition key is the label for the label-skew methods (``dirichlet``,
    ``pathological``, ``shard``, ``inner_dirichlet``) on classification, the group
    (category) for them on causal_lm and for the natural ones; the others use none.

    Args:
        dataset: ``"rotten_tomatoes"``, ``"chatterbot"`` or a local ``.csv``/``.jsonl`` path.
        task: ``"classification"`` or ``"causal_lm"``.
        partition: a name in :data:`METHODS`.
        alpha: Dirichlet concentration.
        num_clients: number of clients.
        test_size: held-out test examples.
        public_size: server-side public examples.
        max_train_examples: cap on training examples over all clients (0 = all).
        seed: seeds the split and the partition.
        text_column: text column of a local file.
        label_column: label / answer column of a local file.
        partition_options: parameters of the flwr-datasets partitioners.

    Raises:
        ValueError: see :func:`load_records`, :func:`split_records` and :func:`partition`.
    """
    records = load_records(dataset, task=task, text_column=text_column, label_column=label_column)
    if task == "classification" and len(set(records.target)) < 2:
        only = records.label_names[int(records.target[0])] if len(records) else None
        raise ValueError(
            f"data.dataset = {dataset!r}: data.label_column = {label_column!r} holds one class "
            f"({only!r}) in {len(records)} rows; a classifier needs at least 2 (set "
            "model.task = 'causal_lm' if the column holds answers)"
        )
    train, test, public = split_records(
        records,
        test_size=test_size,
        public_size=public_size,
        max_train_examples=max_train_examples,
        seed=seed,
    )
    by_label = partition in LABEL_METHODS and task == "classification"
    keys: list[int | str] = list(train.target if by_label else train.group)
    if partition == "natural" and len(set(keys)) < num_clients:
        raise ValueError(
            f"data.partition = 'natural': {dataset!r} has {len(set(keys))} groups in its "
            f"training split for {num_clients} clients; use at most that many clients, another "
            "partition, or (for a local file) a 'group' column with more distinct values"
        )
    parts = _partition(
        keys,
        num_clients=num_clients,
        method=partition,
        alpha=alpha,
        seed=seed,
        options=partition_options,
    )
    clients = [train.subset(part) for part in parts]
    if task == "classification":
        summary = PartitionSummary.of(
            parts, train.target, records.label_names, method=partition, by="label"
        )
    else:
        groups = sorted(set(train.group))
        summary = PartitionSummary.of(parts, train.group, groups, method=partition, by="group")
    log.info(
        "%s: %d clients (%s), sizes %s; test %d, public %d",
        dataset,
        num_clients,
        partition,
        [len(c) for c in clients],
        len(test),
        len(public),
    )
    return FederatedData(
        clients=clients,
        test=test,
        public=public,
        label_names=records.label_names,
        summary=summary,
    )
