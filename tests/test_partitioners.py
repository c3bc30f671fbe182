"""Every partitioner name: Flower Datasets' through fedft's keys, and the partition summary."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedft.config import load_config  # noqa: E402
from fedft.data import METHODS, PartitionOptions, PartitionSummary, partition  # noqa: E402

N, CLIENTS = 1200, 6
LABELS = [i % 4 for i in range(N)]  # 4 balanced labels
GROUPS = [f"g{i % 12}" for i in range(N)]  # 12 groups of 100


def _labels_of(part: Sequence[int]) -> set[int]:
    return {LABELS[i] for i in part}


def _check_pathological(parts: list[list[int]]) -> None:
    assert all(len(_labels_of(p)) == 2 for p in parts)  # classes_per_client = 2


def _check_shard(parts: list[list[int]]) -> None:
    # 6 clients x 2 shards of 100 examples sorted by label: each shard is one label
    assert [len(p) for p in parts] == [200] * CLIENTS
    assert all(len(_labels_of(p)) <= 2 for p in parts)


def _check_inner_dirichlet(parts: list[list[int]]) -> None:
    assert [len(p) for p in parts] == [200] * CLIENTS  # equal sizes by default
    mixes = [sorted(Counter(LABELS[i] for i in p).values()) for p in parts]
    assert any(m != [50, 50, 50, 50] for m in mixes)  # the label mix is drawn, not even


def _sizes_grow(factor: Callable[[int], float]) -> Callable[[list[list[int]]], None]:
    def check(parts: list[list[int]]) -> None:
        sizes = np.array([len(p) for p in parts], dtype=float)
        want = np.array([factor(k) for k in range(CLIENTS)])
        # shares floored, the remainder to the last client (as in Flower)
        assert np.allclose(sizes / sizes.sum(), want / want.sum(), atol=CLIENTS / N)

    return check


def _check_size(parts: list[list[int]]) -> None:
    assert [len(p) for p in parts] == [200] * CLIENTS


def _check_natural_id(parts: list[list[int]]) -> None:
    assert sorted(len({GROUPS[i] for i in p}) for p in parts) == [1] * 12
    assert all(len(p) == 100 for p in parts)


def _check_grouped_natural(parts: list[list[int]]) -> None:
    assert all(len({GROUPS[i] for i in p}) == 2 for p in parts)  # group_size = 2, whole


def _check_iid(parts: list[list[int]]) -> None:
    assert [len(p) for p in parts] == [200] * CLIENTS


def _check_dirichlet(parts: list[list[int]]) -> None:
    assert all(len(p) >= 2 for p in parts)


def _check_natural(parts: list[list[int]]) -> None:
    assert all(len({GROUPS[i] for i in p}) == 2 for p in parts)  # 12 groups over 6 clients


#: name -> (keys, number of clients, what must hold); every name in METHODS is here.
CASES: dict[str, tuple[list, int, Callable[[list[list[int]]], None]]] = {
    "iid": (LABELS, CLIENTS, _check_iid),
    "dirichlet": (LABELS, CLIENTS, _check_dirichlet),
    "natural": (GROUPS, CLIENTS, _check_natural),
    "pathological": (LABELS, CLIENTS, _check_pathological),
    "shard": (LABELS, CLIENTS, _check_shard),
    "inner_dirichlet": (LABELS, CLIENTS, _check_inner_dirichlet),
    "linear": (LABELS, CLIENTS, _sizes_grow(lambda k: k + 1)),
    "square": (LABELS, CLIENTS, _sizes_grow(lambda k: (k + 1) ** 2)),
    "exponential": (LABELS, CLIENTS, _sizes_grow(lambda k: float(np.exp(k + 1)))),
    "size": (LABELS, CLIENTS, _check_size),
    "natural_id": (GROUPS, 12, _check_natural_id),
    "grouped_natural": (GROUPS, CLIENTS, _check_grouped_natural),
}


def test_every_name_has_a_case():
    assert set(CASES) == set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_partitioner_by_name(method):
    keys, clients, check = CASES[method]
    parts = partition(keys, num_clients=clients, method=method, seed=3)
    assert len(parts) == clients
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)) and set(flat) <= set(range(N))  # disjoint indices
    assert all(p == sorted(p) and p for p in parts)
    if method != "shard":  # shards of 100 cover 1200 exactly here too
        assert len(flat) == N
    check(parts)
    assert parts == partition(keys, num_clients=clients, method=method, seed=3)  # seeded


@pytest.mark.parametrize("method", ["pathological", "shard", "inner_dirichlet", "linear"])
def test_library_partitioners_follow_the_seed(method):
    keys, clients, _ = CASES[method]
    a = partition(keys, num_clients=clients, method=method, seed=3)
    assert a != partition(keys, num_clients=clients, method=method, seed=4)


def test_options_reach_the_library():
    one = partition(
        LABELS,
        num_clients=4,
        method="pathological",
        options=PartitionOptions(classes_per_client=1, class_assignment="deterministic"),
    )
    assert [_labels_of(p) for p in one] == [{0}, {1}, {2}, {3}]
    sizes = (100, 300, 200, 50)
    parts = partition(
        LABELS, num_clients=4, method="size", options=PartitionOptions(partition_sizes=sizes)
    )
    assert tuple(len(p) for p in parts) == sizes
    shards = partition(
        LABELS,
        num_clients=4,
        method="shard",
        options=PartitionOptions(shards_per_client=0, shard_size=30),
    )
    assert all(len(p) % 30 == 0 for p in shards)


def test_library_errors_name_the_keys_to_change():
    with pytest.raises(ValueError, match=r"natural_id.*gives 12 clients, not 5.*num_clients"):
        partition(GROUPS, num_clients=5, method="natural_id")
    with pytest.raises(ValueError, match=r"grouped_natural.*gives 6 clients, not 4.*group_size"):
        partition(GROUPS, num_clients=4, method="grouped_natural")
    with pytest.raises(ValueError, match=r"data\.partition = 'exponential' \(1200 examples"):
        partition(LABELS, num_clients=40, method="exponential")


def test_our_iid_is_flowers_iid_after_the_same_shuffle():
    """Why fedft keeps its two-line iid: it is exactly Flower's IidPartitioner (no import)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    n, seed = 1003, 5
    order = np.random.default_rng(seed).permutation(n)
    p = IidPartitioner(num_partitions=7)
    p.dataset = Dataset.from_dict({"index": order.tolist()})
    flower = [sorted(p.load_partition(k)["index"]) for k in range(7)]
    assert flower == partition([0] * n, num_clients=7, method="iid", seed=seed)


def test_config_keys_select_and_parameterise_partitioners():
    cfg = load_config(
        None,
        ["data.partition=pathological", "data.classes_per_client=1", "data.shard_size=5"],
    )
    assert cfg.data.partition == "pathological" and cfg.data.classes_per_client == 1
    from fedft import builders

    options = builders.data_kwargs(cfg)["partition_options"]
    assert options == PartitionOptions(classes_per_client=1, shard_size=5)
    hash(options)  # build_federated_data is memoised on its arguments
    from fedft.config import ConfigError

    with pytest.raises(ConfigError, match=r"data\.partition_sizes = \[1, 2\] is not allowed"):
        load_config(None, ["data.partition=size", "data.partition_sizes=[1, 2]"])
    with pytest.raises(ConfigError, match=r"data\.shards_per_client = 0 is not allowed"):
        load_config(None, ["data.shards_per_client=0"])
    with pytest.raises(ConfigError, match=r"data\.classes_per_client = 0 is not allowed"):
        load_config(None, ["data.classes_per_client=0"])


def test_partition_summary_counts_and_text():
    parts = [[0, 1, 2], [3]]
    summary = PartitionSummary.of(
        parts, [0, 1, 1, 0], ("rotten", "fresh"), method="iid", by="label"
    )
    assert summary.counts == ((1, 2), (1, 0))
    assert summary.examples == [3, 1]
    # overall mix (1/2, 1/2); client 0 (1/3, 2/3): TV 1/6; client 1 (1, 0): TV 1/2
    assert summary.skew() == pytest.approx((1 / 6 + 1 / 2) / 2)
    data = summary.to_dict()
    assert data["names"] == ["rotten", "fresh"] and data["counts"] == [[1, 2], [1, 0]]
    text = summary.format()
    assert "client   0:      3 examples  fresh 67%, rotten 33%" in text
    assert "client   1:      1 examples  rotten 100%" in text
    by_group = PartitionSummary.of([[0, 1]], ["b", "a"], ["a", "b"], method="natural", by="group")
    assert by_group.counts == ((1, 1),)


def test_cli_prints_the_split_and_stops_on_an_impossible_one(capsys, tmp_path):
    import subprocess
    import sys

    from fedft.cli import _show_partition

    _show_partition(load_config("simulations/quickstart.toml"))
    text = capsys.readouterr().out
    assert text.startswith("partition 'dirichlet': 10 clients, 12244 training examples")
    assert text.count("\n  client ") == 10
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedft.cli", "simulate", "simulations/quickstart.toml"]
        + ["--set", "data.partition=natural_id", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "data.partition = 'natural_id'" in proc.stderr and "not 10" in proc.stderr
    assert "ray" not in proc.stderr.lower() and not out.exists()  # stopped before Ray
