"""One invariant matrix over every registered aggregator (STYLE.md item 9)."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from fedft.adapters import effective_delta as _effective
from fedft.aggregation import AGGREGATORS, Aggregator, get_aggregator
from fedft.config import ALGORITHMS, LINEAR_ALGORITHMS, MIXED_RANK_ALGORITHMS
from fedft.types import ClientUpdate, LoraFactors

NAMES = ["fedit", "flora", "fedsb", "lora_fair", "hetlora", "ffa", "fedex"]
SHAPES = {"l0.q": (6, 5), "l1.v": (4, 7)}
RANK = 3
SCALING = 2.0
MIXED_RANKS = [1, 4, 2, 3]  # client i trains rank MIXED_RANKS[i % 4] (flora, hetlora)
EXACT = {"flora", "fedsb", "ffa", "fedex"}  # effective delta = sum p_k (client's delta)
EXTRAS = {"head.weight": (2, 5), "prompt": (3, 5)}

Maker = Callable[[int, int], ClientUpdate]  # (client index, num_examples) -> update


def _scenario(name: str, seed: int = 0) -> tuple[Aggregator, dict[str, LoraFactors], Maker]:
    """Build an aggregator, its round-1 global adapters, and a maker of valid updates."""
    gen = torch.Generator().manual_seed(seed)
    agg = get_aggregator(name)
    if name == "fedsb":
        grads = {m: torch.randn(s, generator=gen) for m, s in SHAPES.items()}
        agg.initialise_from_gradients(grads, rank=RANK, lr=0.1, scaling=SCALING)
    rank = max(MIXED_RANKS) if name in MIXED_RANK_ALGORITHMS else RANK
    glob = agg.init_global(SHAPES, rank=rank, scaling=SCALING, generator=gen)

    def make(i: int, n: int) -> ClientUpdate:
        g = torch.Generator().manual_seed(1000 * seed + i)
        adapters: dict[str, LoraFactors] = {}
        for m, (out, inn) in SHAPES.items():
            if name == "fedsb":
                f = glob[m]
                adapters[m] = replace(f, r=torch.randn(RANK, RANK, generator=g))
            elif name == "ffa":
                f = glob[m]
                adapters[m] = replace(f, b=torch.randn(out, RANK, generator=g))
            elif name in MIXED_RANK_ALGORITHMS:
                r = MIXED_RANKS[i % len(MIXED_RANKS)]
                adapters[m] = LoraFactors(
                    a=torch.randn(r, inn, generator=g),
                    b=torch.randn(out, r, generator=g),
                    scaling=8.0 / r,
                )
            else:
                adapters[m] = LoraFactors(
                    a=torch.randn(RANK, inn, generator=g),
                    b=torch.randn(out, RANK, generator=g),
                    scaling=SCALING,
                )
        extras = {k: torch.randn(s, generator=g) for k, s in EXTRAS.items()}
        return ClientUpdate(f"c{i}", adapters, n, {"loss": 1.0}, extras)

    return agg, glob, make


def _renamed(u: ClientUpdate, cid: str, n: int) -> ClientUpdate:
    return ClientUpdate(cid, u.adapters, n, u.metrics, u.extras)


def _perturbed(u: ClientUpdate) -> ClientUpdate:
    """Change what the client trained (R for Fed-SB, B otherwise)."""
    adapters = {
        m: replace(f, r=f.r + 0.5) if f.r is not None else replace(f, b=f.b + 0.5)
        for m, f in u.adapters.items()
    }
    return ClientUpdate(u.client_id, adapters, u.num_examples, u.metrics, u.extras)


def _factors(adapters: Mapping[str, LoraFactors]) -> dict[str, Tensor]:
    out = {}
    for m, f in adapters.items():
        out[f"{m}.a"], out[f"{m}.b"] = f.a, f.b
        if f.r is not None:
            out[f"{m}.r"] = f.r
    return out


def _close(x: Mapping[str, Tensor], y: Mapping[str, Tensor], atol: float = 1e-5) -> bool:
    return set(x) == set(y) and all(
        torch.allclose(x[k].double(), y[k].double(), atol=atol, rtol=1e-5) for k in x
    )


def _equal(x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> bool:
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def _mean(ups: list[ClientUpdate], per_update: Callable[[ClientUpdate], Mapping[str, Tensor]]):
    total = sum(u.num_examples for u in ups)
    keys = per_update(ups[0]).keys()
    return {k: sum((u.num_examples / total) * per_update(u)[k].double() for u in ups) for k in keys}


def test_matrix_covers_the_whole_registry():
    assert set(NAMES) == set(AGGREGATORS) == set(ALGORITHMS)
    for name, cls in AGGREGATORS.items():
        assert cls.name == name
        assert cls.linear == (name in LINEAR_ALGORITHMS)
        assert cls.supports_mixed_ranks == (name in MIXED_RANK_ALGORITHMS)
        assert cls.trainable == {"ffa": "b", "fedsb": "r"}.get(name, "ab")


@pytest.mark.parametrize("name", NAMES)
def test_one_client_is_the_identity(name):
    agg, _, make = _scenario(name)
    u = make(1, 17)
    res = agg.aggregate([u])
    assert _close(_effective(res), _effective(u))
    assert _close(res.extras, u.extras, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_identical_updates_are_the_identity(name):
    agg, _, make = _scenario(name)
    u = make(2, 5)
    copies = [_renamed(u, f"copy{j}", n) for j, n in enumerate([3, 11, 40])]
    res = agg.aggregate(copies)
    assert _close(_effective(res), _effective(u))
    assert _close(res.extras, u.extras)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_invariant(name):
    agg, _, make = _scenario(name)
    ups = [make(i, n) for i, n in enumerate([5, 9, 2, 7])]
    a = agg.aggregate(ups)
    b = agg.aggregate([ups[2], ups[0], ups[3], ups[1]])
    assert _equal(_effective(a), _effective(b))
    assert _equal(a.extras, b.extras)


@pytest.mark.parametrize("name", NAMES)
def test_every_client_and_its_weight_count(name):
    """The 'FedAvg kept only client 0' bug class: changing any one client changes the result."""
    agg, _, make = _scenario(name)
    ups = [make(i, n) for i, n in enumerate([5, 9, 2, 7])]
    base = _effective(agg.aggregate(ups))
    for k in range(len(ups)):
        changed = list(ups)
        changed[k] = _perturbed(ups[k])
        assert not _close(_effective(agg.aggregate(changed)), base), f"client {k} ignored"
        reweighted = list(ups)
        reweighted[k] = _renamed(ups[k], ups[k].client_id, ups[k].num_examples + 20)
        assert not _close(_effective(agg.aggregate(reweighted)), base), f"n_{k} ignored"
    # Only the ratios n_k / sum n matter.
    scaled = [_renamed(u, u.client_id, 3 * u.num_examples) for u in ups]
    assert _close(_effective(agg.aggregate(scaled)), base)


@pytest.mark.parametrize("name", NAMES)
def test_dropped_clients_are_excluded(name):
    agg, _, make = _scenario(name)
    ups = [make(i, n) for i, n in enumerate([5, 9, 2, 7])]
    agg.aggregate(ups)  # a full round first: no state may leak into the next
    survivors = [ups[1], ups[3]]
    res = agg.aggregate(survivors)
    fresh, _, _ = _scenario(name)
    alone = fresh.aggregate(survivors)
    assert _equal(_effective(res), _effective(alone))
    # weights are renormalised over the survivors only: 9/16 and 7/16
    assert _close(res.extras, _mean(survivors, lambda u: u.extras))
    if AGGREGATORS[name].linear:
        assert _close(_factors(res.adapters), _mean(survivors, lambda u: _factors(u.adapters)))


@pytest.mark.parametrize("name", NAMES)
def test_extras_are_averaged_by_examples(name):
    agg, _, make = _scenario(name)
    ups = [make(i, n) for i, n in enumerate([1, 3])]
    res = agg.aggregate(ups)
    for k, v in res.extras.items():
        expect = 0.25 * ups[0].extras[k] + 0.75 * ups[1].extras[k]
        assert torch.allclose(v, expect, atol=1e-6)
        assert v.dtype == ups[0].extras[k].dtype


@pytest.mark.parametrize("name", NAMES)
def test_linear_means_and_exactness(name):
    agg, _, make = _scenario(name)
    ups = [make(i, n) for i, n in enumerate([4, 1, 6])]
    res = agg.aggregate(ups)
    # linear: the whole result (no base delta) is the p_k-mean of what clients uploaded
    linear = (
        name not in MIXED_RANK_ALGORITHMS
        and not res.base_delta
        and _close(_factors(res.adapters), _mean(ups, lambda u: _factors(u.adapters)))
    )
    assert linear == AGGREGATORS[name].linear
    # exact: the effective global update is the p_k-mean of the clients' effective updates
    exact = _close(_effective(res), _mean(ups, _effective))
    assert exact == (name in EXACT)


def _same_state(x: object, y: object) -> bool:
    """Equal checkpoint states: same keys, equal tensors (dtype included), equal values."""
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        return (
            isinstance(x, Tensor)
            and isinstance(y, Tensor)
            and x.dtype == y.dtype
            and (torch.equal(x, y))
        )
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        return set(x) == set(y) and all(_same_state(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_state(a, b) for a, b in zip(x, y, strict=True))
    return type(x) is type(y) and x == y


@pytest.mark.parametrize("name", NAMES)
def test_state_before_the_first_round_restores(name):
    """A checkpoint written before any round (a run stopped at once) resumes."""
    state = get_aggregator(name).state_dict()
    restored = get_aggregator(name)
    restored.load_state_dict(state)
    assert _same_state(restored.state_dict(), state)


@pytest.mark.parametrize("name", NAMES)
def test_clients_metric_counts_the_replies(name):
    """metrics.jsonl's ``clients``: how many replies this round's aggregate is made of."""
    agg, _, make = _scenario(name)
    for count in (1, 3):
        res = agg.aggregate([make(i, 4 + i) for i in range(count)])
        assert res.metrics["clients"] == float(count)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    agg, glob, make = _scenario(name)
    agg.aggregate([make(i, n) for i, n in enumerate([5, 9, 2])])
    buf = io.BytesIO()
    torch.save(agg.state_dict(), buf)  # plain types and tensors only
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = get_aggregator(name)
    restored.load_state_dict(state)
    assert _same_state(restored.state_dict(), agg.state_dict())
    nxt = [make(i, n) for i, n in enumerate([3, 4, 8], start=4)]
    a, b = agg.aggregate(nxt), restored.aggregate(nxt)
    assert _equal(_effective(a), _effective(b))
    rank = RANK if name not in MIXED_RANK_ALGORITHMS else 2
    starts = [
        x.client_start(a.adapters, rank=rank, scaling=SCALING, generator=torch.Generator())
        for x in (agg, restored)
    ]
    assert _equal(_effective(starts[0]), _effective(starts[1]))
    other = "ffa" if name != "ffa" else "fedit"
    with pytest.raises(ValueError, match="cannot load"):
        get_aggregator(other).load_state_dict(state)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_a_seed(name):
    def run(seed: int):
        agg, glob, make = _scenario(name, seed)
        start = agg.client_start(
            glob, rank=RANK, scaling=SCALING, generator=torch.Generator().manual_seed(seed)
        )
        res = agg.aggregate([make(i, n) for i, n in enumerate([5, 9, 2])])
        return glob, start, res

    g1, s1, r1 = run(0)
    g2, s2, r2 = run(0)
    _, s3, _ = run(1)
    assert _equal(_effective(g1), _effective(g2))
    assert all(torch.equal(s1[m].a, s2[m].a) and torch.equal(s1[m].b, s2[m].b) for m in s1)
    assert _equal(_effective(r1), _effective(r2)) and r1.metrics == r2.metrics
    assert any(not torch.equal(s1[m].a, s3[m].a) for m in s1)  # the seed is actually used


@pytest.mark.parametrize("name", NAMES)
def test_client_start_shapes(name):
    agg, glob, _ = _scenario(name)
    rank = 2 if name in MIXED_RANK_ALGORITHMS else RANK
    start = agg.client_start(glob, rank=rank, scaling=SCALING, generator=torch.Generator())
    assert set(start) == set(SHAPES)
    for m, f in start.items():
        assert f.shape == SHAPES[m] and f.rank == rank and f.scaling == SCALING
        assert torch.count_nonzero(f.a) > 0  # A is never all zero (LoRA's B carries the zeros)
    if name not in MIXED_RANK_ALGORITHMS:
        assert _equal(_effective(start), _effective(glob))
        with pytest.raises(ValueError, match="rank"):
            agg.client_start(glob, rank=RANK + 1, scaling=SCALING, generator=torch.Generator())


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_are_refused_naming_clients(name):
    agg, _, make = _scenario(name)
    # every refusal starts with the algorithm's name: the operator reads which one refused
    with pytest.raises(ValueError, match=f"^{name}: no client updates"):
        agg.aggregate([])
    u0, u1 = make(0, 5), make(1, 5)
    with pytest.raises(ValueError, match=rf"^{name}: client\(s\) \['c0'\] reply more than once"):
        agg.aggregate([u0, _renamed(u1, "c0", 3)])
    missing = ClientUpdate("c1", {"l0.q": u1.adapters["l0.q"]}, 5)
    with pytest.raises(ValueError, match="'c1'.*different modules"):
        agg.aggregate([u0, missing])
    bad_extras = ClientUpdate("c1", u1.adapters, 5, {}, {"prompt": torch.zeros(9, 5)})
    with pytest.raises(ValueError, match="extras"):
        agg.aggregate([u0, bad_extras])
    if not AGGREGATORS[name].supports_mixed_ranks:
        wrong_rank = ClientUpdate(
            "c9",
            {
                m: LoraFactors(a=torch.ones(1, s[1]), b=torch.ones(s[0], 1), scaling=SCALING)
                if name != "fedsb"
                else LoraFactors(
                    a=torch.ones(1, s[1]),
                    b=torch.ones(s[0], 1),
                    scaling=SCALING,
                    r=torch.ones(1, 1),
                )
                for m, s in SHAPES.items()
            },
            5,
        )
        with pytest.raises(ValueError, match="'c0'.*'c9'"):
            agg.aggregate([u0, wrong_rank])
    else:
        wrong_shape = ClientUpdate(
            "c9", {**u1.adapters, "l0.q": LoraFactors(torch.ones(1, 3), torch.ones(6, 1), 1.0)}, 5
        )
        with pytest.raises(ValueError, match="shape"):
            agg.aggregate([u0, wrong_shape])
