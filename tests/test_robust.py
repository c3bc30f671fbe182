"""Robust wrappers: one poisoned client among honest ones, oracles, and the interface."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import Tensor

from fedft.aggregation import Aggregator, get_aggregator
from fedft.aggregation.robust import (
    CoordinateMedian,
    NormBound,
    TrimmedMean,
    flatten_trainables,
    make_robust,
    unflatten_trainables,
)
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

SHAPES = {"q": (16, 12), "v": (8, 12)}
RANK, SCALING = 4, 2.0
LINEAR = ["fedit", "ffa", "fedsb"]


def _inner(name: str) -> tuple[Aggregator, ClientUpdate]:
    """A linear aggregator and the round's reference update (global adapters + head)."""
    gen = torch.Generator().manual_seed(1)
    agg = get_aggregator(name)
    if name == "fedsb":
        grads = {m: torch.randn(s, generator=gen) for m, s in SHAPES.items()}
        start = agg.initialise_from_gradients(grads, rank=RANK, lr=0.01, scaling=SCALING)  # type: ignore[attr-defined]
    else:
        start = agg.init_global(SHAPES, rank=RANK, scaling=SCALING, generator=gen)
    head = torch.randn(2, 8, generator=gen)
    return agg, ClientUpdate("global", start, 1, extras={"head": head})


def _clients(
    ref: ClientUpdate, parts: Parts, *, honest: int = 9, poison: float | None = 1000.0
) -> tuple[list[ClientUpdate], Tensor]:
    """Honest deltas = common direction + noise; the poisoned one is -poison x a delta."""
    gen = torch.Generator().manual_seed(2)
    base = flatten_trainables(ref, parts)
    common = 0.05 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
    deltas = [
        common + 0.02 * torch.randn(base.shape, generator=gen, dtype=torch.float64)
        for _ in range(honest)
    ]
    if poison is not None:
        deltas.append(-poison * deltas[0])
    ups = [
        unflatten_trainables(base + d, ref, parts, client_id=f"c{k}", num_examples=20)
        for k, d in enumerate(deltas)
    ]
    return ups, base


def _flat(result: AggregationResult, parts: Parts) -> Tensor:
    upd = ClientUpdate("r", result.adapters, 1, extras=result.extras)
    return flatten_trainables(upd, parts)


@pytest.mark.parametrize("name", LINEAR)
def test_poisoned_client_pulls_mean_but_not_robust_aggregates(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    agg, ref = _inner(name)
    parts = agg.trainable
    ups, base = _clients(ref, parts)
    honest = ups[:-1]
    honest_mean = _flat(_inner(name)[0].aggregate(honest), parts)
    spread = torch.stack([flatten_trainables(u, parts) - honest_mean for u in honest]).norm(dim=1)
    scale = float(spread.mean())  # typical honest client's distance from the honest mean

    plain = _flat(_inner(name)[0].aggregate(ups), parts)
    d_plain = float((plain - honest_mean).norm())
    honest_norm = float((flatten_trainables(honest[0], parts) - base).norm())
    wrappers: dict[str, Aggregator] = {
        "median": CoordinateMedian(_inner(name)[0]),
        "trimmed_mean": TrimmedMean(_inner(name)[0], trim_fraction=0.1),
        "norm_bound": NormBound(
            _inner(name)[0],
            bound=1.5 * honest_norm,
            reference=ref.adapters,
            reference_extras=ref.extras,
        ),
    }
    dist = {}
    with caplog.at_level(logging.INFO, logger="fedft.aggregation.robust"):
        for kind, w in wrappers.items():
            dist[kind] = float((_flat(w.aggregate(ups), parts) - honest_mean).norm())
    print(f"{name}: honest scale {scale:.4f} plain mean {d_plain:.2f}", dist)
    assert d_plain > 100 * scale  # the plain mean is dragged far away
    for kind in ("median", "trimmed_mean"):  # closer than a typical honest client
        assert dist[kind] < 0.5 * scale, (kind, dist[kind], scale)
    # Norm bounding limits, not removes, the attacker: its pull on the mean of K = 10 is at
    # most (bound + |honest mean delta|) / K.
    bound_pull = (1.5 * honest_norm + float((honest_mean - base).norm())) / len(ups)
    assert dist["norm_bound"] <= bound_pull + 1e-9
    assert dist["norm_bound"] < d_plain / 100
    assert "client c9 update norm" in caplog.text  # the poisoned one was clipped and logged


@pytest.mark.parametrize("name", LINEAR)
def test_median_and_trimmed_mean_match_oracles(name: str) -> None:
    agg, ref = _inner(name)
    parts = agg.trainable
    ups, _ = _clients(ref, parts, honest=7, poison=None)
    stacked = torch.stack([flatten_trainables(u, parts) for u in ups])  # (7, D)
    med = _flat(CoordinateMedian(agg).aggregate(ups), parts)
    torch.testing.assert_close(med, stacked.median(dim=0).values, atol=1e-6, rtol=0)
    # trimming 1 of 7 at each end: mean of the middle five, computed another way
    tm = _flat(TrimmedMean(_inner(name)[0], trim_fraction=0.15).aggregate(ups), parts)
    oracle = (stacked.sum(0) - stacked.max(0).values - stacked.min(0).values) / 5
    torch.testing.assert_close(tm, oracle, atol=1e-6, rtol=0)
    # no trimming and equal n_k: exactly the inner aggregator's weighted mean
    tm0 = _flat(TrimmedMean(_inner(name)[0], trim_fraction=0.0).aggregate(ups), parts)
    torch.testing.assert_close(tm0, _flat(_inner(name)[0].aggregate(ups), parts), atol=1e-6, rtol=0)


def test_median_of_even_count_averages_middle_pair() -> None:
    agg, ref = _inner("fedit")
    ups, _ = _clients(ref, "ab", honest=4, poison=None)
    stacked = torch.stack([flatten_trainables(u, "ab") for u in ups]).sort(0).values
    med = _flat(CoordinateMedian(agg).aggregate(ups), "ab")
    torch.testing.assert_close(med, (stacked[1] + stacked[2]) / 2, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", LINEAR)
def test_norm_bound_clips_to_bound_and_is_identity_below_it(name: str) -> None:
    agg, ref = _inner(name)
    parts = agg.trainable
    ups, base = _clients(ref, parts, honest=3, poison=None)
    nb = NormBound(agg, bound=1e-3)
    with pytest.raises(ValueError, match="set_reference"):
        nb.aggregate(ups)
    nb.set_reference(ref.adapters, extras=ref.extras)
    for u in ups:  # one client at a time: the result is reference + the clipped delta
        delta = _flat(nb.aggregate([u]), parts) - base
        assert abs(float(delta.norm()) - 1e-3) < 1e-6
        full = flatten_trainables(u, parts) - base
        cos = torch.dot(delta, full) / (delta.norm() * full.norm())
        assert float(cos) > 1 - 1e-6  # same direction
    loose = NormBound(
        _inner(name)[0], bound=1e9, reference=ref.adapters, reference_extras=ref.extras
    )
    torch.testing.assert_close(
        _flat(loose.aggregate(ups), parts), _flat(_inner(name)[0].aggregate(ups), parts)
    )
    assert loose.aggregate(ups).metrics["clipped_clients"] == 0.0


def test_fedsb_result_keeps_frozen_factors() -> None:
    agg, ref = _inner("fedsb")
    ups, _ = _clients(ref, "r")
    out = CoordinateMedian(agg).aggregate(ups)
    for m, f in ref.adapters.items():
        assert torch.equal(out.adapters[m].a, f.a) and torch.equal(out.adapters[m].b, f.b)
        assert out.adapters[m].r is not None


def test_interface_delegation_and_state() -> None:
    agg, ref = _inner("ffa")
    w = make_robust("trimmed_mean", agg, trim_fraction=0.2)
    assert w.trainable == "b" and w.name == "trimmed_mean"
    gen = torch.Generator().manual_seed(5)
    start = w.client_start(ref.adapters, rank=RANK, scaling=SCALING, generator=gen)
    assert all(torch.equal(start[m].a, ref.adapters[m].a) for m in SHAPES)
    state = w.state_dict()
    fresh = make_robust("trimmed_mean", get_aggregator("ffa"), trim_fraction=0.2)
    fresh.load_state_dict(state)
    ups, _ = _clients(ref, "b", honest=5, poison=None)
    a, b = w.aggregate(ups), fresh.aggregate(ups)
    for m in SHAPES:
        assert torch.equal(a.adapters[m].a, b.adapters[m].a)
        assert torch.equal(a.adapters[m].b, b.adapters[m].b)
    with pytest.raises(ValueError, match="cannot load"):
        make_robust("median", get_aggregator("ffa")).load_state_dict(state)


def test_factory_and_wrapper_validation() -> None:
    with pytest.raises(ValueError, match="linear"):
        CoordinateMedian(get_aggregator("flora"))
    with pytest.raises(ValueError, match="unknown robust"):
        make_robust("krum", get_aggregator("fedit"))
    with pytest.raises(ValueError, match="bad options"):
        make_robust("median", get_aggregator("fedit"), bound=1.0)
    with pytest.raises(ValueError, match="trim_fraction"):
        make_robust("trimmed_mean", get_aggregator("fedit"), trim_fraction=0.5)
    with pytest.raises(ValueError, match="bound"):
        make_robust("norm_bound", get_aggregator("fedit"), bound=0.0)


def test_flatten_round_trip_keeps_frozen_parts() -> None:
    agg, ref = _inner("fedsb")
    vec = flatten_trainables(ref, "r")
    assert vec.numel() == len(SHAPES) * RANK * RANK + 16
    back = unflatten_trainables(vec * 2, ref, "r", client_id="x", num_examples=3)
    for m, f in ref.adapters.items():
        assert torch.equal(back.adapters[m].a, f.a) and torch.equal(back.adapters[m].b, f.b)
        assert f.r is not None and back.adapters[m].r is not None
        torch.testing.assert_close(back.adapters[m].r, 2 * f.r)
    torch.testing.assert_close(back.extras["head"], 2 * ref.extras["head"])
    with pytest.raises(ValueError, match="layout"):
        unflatten_trainables(vec[:-1], ref, "r", client_id="x", num_examples=3)
    # nothing trained (no adapters, no extras): an empty float64 vector, and back
    empty = ClientUpdate("e", {}, 1)
    flat = flatten_trainables(empty, "ab")
    assert flat.shape == (0,) and flat.dtype == torch.float64
    assert unflatten_trainables(flat, empty, "ab", client_id="e", num_examples=1).adapters == {}
    no_r = ClientUpdate(
        "x", {"q": LoraFactors(a=torch.ones(1, 2), b=torch.ones(3, 1), scaling=1.0)}, 1
    )
    with pytest.raises(ValueError, match="^module 'q' has no Fed-SB middle matrix r$"):
        flatten_trainables(no_r, "r")


def test_layout_mismatch_is_rejected() -> None:
    agg, ref = _inner("fedit")
    ups, _ = _clients(ref, "ab", honest=3, poison=None)
    odd = ClientUpdate("odd", {"q": ups[0].adapters["q"]}, 5, extras=ups[0].extras)
    with pytest.raises(ValueError, match="different layout"):
        CoordinateMedian(agg).aggregate([*ups, odd])


@pytest.mark.parametrize("kind", ["median", "trimmed_mean", "norm_bound"])
def test_a_round_with_one_reply_returns_that_reply(kind: str) -> None:
    """A round where only one client answered: the robust estimate is that client."""
    agg, ref = _inner("fedsb")
    (up,), _ = _clients(ref, "r", honest=1, poison=None)
    opts = {"trim_fraction": 0.2} if kind == "trimmed_mean" else {}
    if kind == "norm_bound":
        opts = {"bound": 1e9, "reference": ref.adapters, "reference_extras": ref.extras}
    res = make_robust(kind, agg, **opts).aggregate([up])
    torch.testing.assert_close(_flat(res, "r"), flatten_trainables(up, "r"), atol=1e-6, rtol=0)
    assert res.metrics["clients"] == 1.0


def test_robust_metrics_count_clients_and_what_was_trimmed() -> None:
    """The metrics a run records for the robust wrappers (metrics.jsonl)."""
    agg, ref = _inner("fedit")
    ups, _ = _clients(ref, "ab", honest=6, poison=None)
    med = CoordinateMedian(agg).aggregate(ups)
    assert med.metrics["clients"] == 6.0
    tm = TrimmedMean(_inner("fedit")[0], trim_fraction=0.34).aggregate(ups)
    assert tm.metrics["clients"] == 6.0 and tm.metrics["trimmed_per_side"] == 2.0


def test_norm_bound_at_exactly_the_bound_is_not_clipped_and_the_metrics_say_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Deltas of norm exactly 5 (3 and 4 on the head) and 10: only the second is clipped,
    counted and logged; ``max_update_norm`` is the largest norm before clipping."""
    agg, ref = _inner("fedit")
    zero_head = {"head": torch.zeros(2, 8)}
    nb = NormBound(agg, bound=5.0, reference=ref.adapters, reference_extras=zero_head)

    def client(cid: str, scale: float) -> ClientUpdate:
        head = torch.zeros(2, 8)
        head[0, 0], head[1, 7] = 3.0 * scale, 4.0 * scale
        return ClientUpdate(cid, ref.adapters, 10, extras={"head": head})

    with caplog.at_level(logging.INFO, logger="fedft.aggregation.robust"):
        res = nb.aggregate([client("at", 1.0), client("over", 2.0)])
    assert res.metrics["clipped_clients"] == 1.0 and res.metrics["max_update_norm"] == 10.0
    assert res.metrics["clients"] == 2.0
    assert caplog.messages == ["norm_bound: client over update norm 10 clipped to 5"]
    # both end at norm 5 in the same direction: the mean head is the one at the bound
    torch.testing.assert_close(res.extras["head"], client("at", 1.0).extras["head"])


def test_norm_bound_names_the_extras_it_has_no_reference_for() -> None:
    agg, ref = _inner("fedit")
    nb = NormBound(agg, bound=1.0, reference=ref.adapters)  # no reference extras
    ups, _ = _clients(ref, "ab", honest=2, poison=None)
    with pytest.raises(
        ValueError, match=r"^NormBound: no reference extras for \['head'\]; pass extras=$"
    ):
        nb.aggregate(ups)


def test_layouts_are_compared_from_the_second_client_on() -> None:
    """Two clients, the second with another layout: refused by name, before any stacking."""
    agg, ref = _inner("fedit")
    ups, _ = _clients(ref, "ab", honest=1, poison=None)
    odd = ClientUpdate("odd", {"q": ups[0].adapters["q"]}, 5, extras=ups[0].extras)
    with pytest.raises(
        ValueError, match=r"^client 'odd' uploads a different layout than client 'c0'"
    ):
        CoordinateMedian(agg).aggregate([ups[0], odd])
    with pytest.raises(ValueError, match="^no client updates to aggregate$"):
        CoordinateMedian(agg).aggregate([])


@pytest.mark.parametrize("kind", ["median", "trimmed_mean", "norm_bound"])
def test_wrappers_refuse_every_non_linear_or_mixed_rank_aggregator(kind: str) -> None:
    """The estimate is handed to ``inner`` as one synthetic client: only an aggregator whose
    result is the p_k-mean of its inputs (fedit, ffa, fedsb) may format it."""
    opts = {"trim_fraction": 0.1} if kind == "trimmed_mean" else {}
    if kind == "norm_bound":
        opts = {"bound": 1.0}
    for name in ("flora", "lora_fair", "hetlora", "fedex"):
        with pytest.raises(
            ValueError,
            match=rf"^{kind} composes around a linear, single-rank aggregator \(fedit, fedsb, "
            rf"ffa\); '{name}' is not one$",
        ):
            make_robust(kind, get_aggregator(name), **opts)


def test_wrapper_init_follows_the_run_seed_and_states_load_only_into_their_kind() -> None:
    gen = torch.Generator().manual_seed(3)
    wrapped = CoordinateMedian(get_aggregator("fedit")).init_global(
        SHAPES, rank=RANK, scaling=SCALING, generator=gen
    )
    plain = get_aggregator("fedit").init_global(
        SHAPES, rank=RANK, scaling=SCALING, generator=torch.Generator().manual_seed(3)
    )
    for m in SHAPES:
        assert torch.equal(wrapped[m].a, plain[m].a)
    state = CoordinateMedian(get_aggregator("fedit")).state_dict()
    with pytest.raises(ValueError, match="^cannot load a 'median' state into 'trimmed_mean'$"):
        TrimmedMean(get_aggregator("fedit"), trim_fraction=0.1).load_state_dict(state)
    with pytest.raises(
        ValueError,
        match=r"^norm_bound measures updates against what clients started from: call "
        r"set_reference\(global_adapters, extras=\.\.\.\) before aggregate$",
    ):
        NormBound(get_aggregator("fedit"), bound=1.0).aggregate([])
