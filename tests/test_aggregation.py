"""Each aggregator's own exactness, hand-computed numbers, and the registry's errors."""

from __future__ import annotations

import logging
import re
from dataclasses import replace

import pytest
import torch
from torch import Tensor

from fedft.adapters import effective_delta as _effective
from fedft.aggregation import (
    FedIT,
    FedSB,
    LoraFair,
    client_weights,
    fair_correction,
    get_aggregator,
    weighted_mean,
)
from fedft.aggregation.lora_fair import _stacked_product_norm
from fedft.types import ClientUpdate, LoraFactors


def _update(cid: str, n: int, **factors: LoraFactors) -> ClientUpdate:
    return ClientUpdate(cid, factors, n)


def _rand(g: torch.Generator, out: int, inn: int, r: int, s: float) -> LoraFactors:
    return LoraFactors(
        a=0.5 * torch.randn(r, inn, generator=g),
        b=0.5 * torch.randn(out, r, generator=g),
        scaling=s,
    )


def _ideal(ups: list[ClientUpdate], module: str) -> Tensor:
    """sum_k p_k s_k B_k [R_k] A_k in float64 (the oracle)."""
    total = sum(u.num_examples for u in ups)
    acc = torch.zeros(ups[0].adapters[module].shape, dtype=torch.float64)
    for u in ups:
        f = u.adapters[module]
        mid = f.a.double() if f.r is None else f.r.double() @ f.a.double()
        acc += (u.num_examples / total) * f.scaling * (f.b.double() @ mid)
    return acc


def _cos(x: Tensor, y: Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(x.double().flatten(), y.double().flatten(), 0)
    )


def _one(value: float) -> LoraFactors:
    return LoraFactors(a=torch.tensor([[value]]), b=torch.tensor([[value]]), scaling=1.0)


# -- the two-client example of docs/algorithms.md (FedIT) --------------------------------
def test_design_two_client_example_fedit_is_wrong_exact_ones_are_right():
    ups = [_update("x", 1, w=_one(1.0)), _update("y", 1, w=_one(-1.0))]
    assert float(_ideal(ups, "w")) == 1.0
    assert float(_effective(get_aggregator("fedit").aggregate(ups))["w"]) == 0.0
    for name in ("flora", "fedex"):
        assert float(_effective(get_aggregator(name).aggregate(ups))["w"]) == pytest.approx(1.0)


# -- hand-computed two-client numbers -----------------------------------------------------
def test_fedit_hand_computed():
    c0 = LoraFactors(a=torch.tensor([[1.0, 2.0]]), b=torch.tensor([[4.0], [0.0]]), scaling=2.0)
    c1 = LoraFactors(a=torch.tensor([[3.0, -2.0]]), b=torch.tensor([[0.0], [8.0]]), scaling=2.0)
    res = FedIT().aggregate([_update("c0", 1, w=c0), _update("c1", 3, w=c1)])  # p = 1/4, 3/4
    f = res.adapters["w"]
    assert torch.equal(f.a, torch.tensor([[2.5, -1.0]]))
    assert torch.equal(f.b, torch.tensor([[1.0], [6.0]]))
    assert f.scaling == 2.0
    # delta = 2 * [[1],[6]] @ [[2.5, -1]]
    assert torch.equal(_effective(res)["w"], torch.tensor([[5.0, -2.0], [30.0, -12.0]]))


def test_hetlora_hand_computed_pad_average_truncate():
    lo = LoraFactors(a=torch.tensor([[1.0, 2.0]]), b=torch.tensor([[1.0], [3.0]]), scaling=1.0)
    hi = LoraFactors(a=torch.eye(2), b=2 * torch.eye(2), scaling=1.0)
    agg = get_aggregator("hetlora")
    res = agg.aggregate([_update("lo", 1, w=lo), _update("hi", 3, w=hi)])  # p = 1/4, 3/4
    g = res.adapters["w"]
    assert torch.equal(g.a, torch.tensor([[1.0, 0.5], [0.0, 0.75]]))
    assert torch.equal(g.b, torch.tensor([[1.75, 0.0], [0.75, 1.5]]))
    start = agg.client_start(res.adapters, rank=1, scaling=0.5, generator=torch.Generator())
    s = start["w"]
    assert s.rank == 1 and s.scaling == 0.5
    assert torch.equal(s.a, torch.tensor([[1.0, 0.5]]))
    assert torch.equal(s.b, torch.tensor([[3.5], [1.5]]))  # rescaled: 0.5 * b = 1.0 * B[:, :1]
    with pytest.raises(ValueError, match="exceeds the global rank"):
        agg.client_start(res.adapters, rank=3, scaling=1.0, generator=torch.Generator())


def test_hetlora_folds_scalings_into_b():
    lo = LoraFactors(a=torch.tensor([[1.0, 0.0]]), b=torch.tensor([[1.0], [0.0]]), scaling=4.0)
    hi = LoraFactors(a=torch.eye(2), b=torch.eye(2), scaling=2.0)
    res = get_aggregator("hetlora").aggregate([_update("lo", 1, w=lo), _update("hi", 1, w=hi)])
    g = res.adapters["w"]
    assert g.scaling == 2.0  # the largest-rank client's scaling
    assert torch.equal(g.b, torch.tensor([[1.5, 0.0], [0.0, 0.5]]))  # 0.5*(2*[1,0]) + 0.5*I


# -- exactness through effective deltas ---------------------------------------------------
def test_flora_exact_with_mixed_ranks_and_scalings():
    g = torch.Generator().manual_seed(0)
    ranks, scalings, ns = [1, 8, 4, 2], [16.0, 0.5, 1.0, 3.0], [10, 3, 7, 1]
    ups = [
        _update(f"c{i}", n, q=_rand(g, 12, 9, r, s), v=_rand(g, 5, 9, r, s))
        for i, (r, s, n) in enumerate(zip(ranks, scalings, ns))
    ]
    agg = get_aggregator("flora")
    agg.init_global({"q": (12, 9), "v": (5, 9)}, rank=4, scaling=1.0, generator=g)
    res = agg.aggregate(ups)
    assert res.adapters == {}
    eff = _effective(res)
    for m in ("q", "v"):
        assert res.base_delta[m].rank == sum(ranks)
        ideal = _ideal(ups, m)
        assert (eff[m].double() - ideal).abs().max() <= 1e-6 * ideal.abs().max()  # fp32 rounding
    # clients restart fresh at their own rank: A random, B = 0
    start = agg.client_start(res.adapters, rank=2, scaling=8.0, generator=g)
    assert start["q"].rank == 2 and start["q"].shape == (12, 9)
    assert torch.count_nonzero(start["q"].b) == 0 and torch.count_nonzero(start["q"].a) > 0


def test_fedsb_exact_and_init_from_gradients():
    g = torch.Generator().manual_seed(1)
    grad = torch.randn(10, 8, generator=g)
    agg = FedSB()
    with pytest.raises(ValueError, match="initialise_from_gradients"):
        agg.init_global({"w": (10, 8)}, rank=3, scaling=2.0, generator=g)
    init = agg.initialise_from_gradients({"w": grad}, rank=3, lr=0.1, scaling=2.0)["w"]
    # s B R A is the best rank-3 approximation of U = -lr sign(G)
    u = -0.1 * torch.sign(grad.double())
    q, sv, ph = torch.linalg.svd(u)
    best = q[:, :3] @ torch.diag(sv[:3]) @ ph[:3]
    assert torch.allclose(init.delta().double(), best, atol=1e-6)
    assert torch.allclose(init.b.T @ init.b, torch.eye(3), atol=1e-5)  # B has orthonormal columns
    glob = agg.init_global({"w": (10, 8)}, rank=3, scaling=2.0, generator=g)
    rs = [torch.randn(3, 3, generator=g) for _ in range(3)]
    ups = [
        _update(f"c{i}", n, w=replace(glob["w"], r=r))
        for i, (r, n) in enumerate(zip(rs, [2, 5, 9]))
    ]
    res = agg.aggregate(ups)
    p = [2 / 16, 5 / 16, 9 / 16]
    assert torch.allclose(res.adapters["w"].r, sum(pk * r for pk, r in zip(p, rs)), atol=1e-6)
    assert torch.equal(res.adapters["w"].a, glob["w"].a) and torch.equal(
        res.adapters["w"].b, glob["w"].b
    )
    assert (_effective(res)["w"].double() - _ideal(ups, "w")).abs().max() <= 1e-6
    tampered = replace(ups[0].adapters["w"], a=ups[0].adapters["w"].a + 1e-3)
    with pytest.raises(ValueError, match="frozen"):
        agg.aggregate([_update("c0", 2, w=tampered), ups[1]])


def test_ffa_exact_and_a_must_stay_frozen():
    g = torch.Generator().manual_seed(2)
    agg = get_aggregator("ffa")
    glob = agg.init_global({"w": (6, 4)}, rank=2, scaling=2.0, generator=g)
    assert torch.count_nonzero(glob["w"].b) == 0
    bound = 1 / 4**0.5  # peft / nn.Linear init: U(-1/sqrt(in), 1/sqrt(in))
    assert glob["w"].a.abs().max() <= bound and glob["w"].a.abs().max() > 0.3 * bound
    ups = [
        _update(f"c{i}", n, w=replace(glob["w"], b=torch.randn(6, 2, generator=g)))
        for i, n in enumerate([3, 1, 4])
    ]
    res = agg.aggregate(ups)
    assert (_effective(res)["w"].double() - _ideal(ups, "w")).abs().max() <= 1e-6
    moved = replace(ups[1].adapters["w"], a=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="'c1' changed the frozen A"):
        agg.aggregate([ups[0], _update("c1", 1, w=moved)])


def test_fedex_adapters_are_fedit_and_base_makes_it_exact():
    g = torch.Generator().manual_seed(3)
    ups = [_update(f"c{i}", n, w=_rand(g, 7, 5, 3, 2.0)) for i, n in enumerate([4, 9, 1])]
    res = get_aggregator("fedex").aggregate(ups)
    fedit = FedIT().aggregate(ups)
    assert torch.equal(res.adapters["w"].a, fedit.adapters["w"].a)
    assert torch.equal(res.adapters["w"].b, fedit.adapters["w"].b)
    assert (_effective(res)["w"].double() - _ideal(ups, "w")).abs().max() <= 1e-5
    # the base delta is exactly the FedIT error sum p_k s (B_k - B)(A_k - A)
    resid = res.base_delta["w"]
    assert isinstance(resid, LoraFactors) and resid.rank == 3 * 3 + 3
    fedit_err = _ideal(ups, "w") - fedit.adapters["w"].delta().double()
    assert torch.allclose(resid.delta().double(), fedit_err, atol=1e-5)
    assert fedit_err.abs().max() > 0.1  # FedIT alone would have been wrong


# -- LoRA-FAIR ----------------------------------------------------------------------------
def _fair_clients(seed: int, shared_a: bool = False) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(seed)
    a0 = torch.randn(3, 8, generator=g)
    ups = []
    for i, n in enumerate([5, 3, 8]):
        f = _rand(g, 10, 8, 3, 2.0)
        ups.append(_update(f"c{i}", n, w=replace(f, a=a0) if shared_a else f))
    return ups


def test_lora_fair_improves_the_cosine_over_fedit():
    ups = _fair_clients(4)
    ideal = _ideal(ups, "w")
    fedit = FedIT().aggregate(ups)
    fair = LoraFair(fair_lambda=0.01, fair_steps=200, fair_lr=0.01).aggregate(ups)
    cos_fedit = _cos(ideal, _effective(fedit)["w"])
    cos_fair = _cos(ideal, _effective(fair)["w"])
    assert cos_fair >= cos_fedit + 0.05, (cos_fedit, cos_fair)
    assert fair.metrics["fair_cos_before"] == pytest.approx(cos_fedit, abs=1e-6)
    assert fair.metrics["fair_cos_after"] == pytest.approx(cos_fair, abs=1e-5)
    assert torch.equal(fair.adapters["w"].a, fedit.adapters["w"].a)  # only B is corrected
    assert fair.base_delta == {}


# (40 x 30): K r = 6 takes the Gram route (6 * 70 <= 1200), K r = 120 the dense one; the
# tiny scale checks that no floor distorts small norms (LoRA updates are small)
@pytest.mark.parametrize("clients", [2, 40])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_lora_fair_norm_of_the_stacked_product_either_route(clients: int, scale: float) -> None:
    g = torch.Generator().manual_seed(clients)
    b_s = scale * torch.randn(40, 3 * clients, generator=g, dtype=torch.float64)
    a_s = torch.randn(3 * clients, 30, generator=g, dtype=torch.float64)
    expected = torch.linalg.matrix_norm(b_s @ a_s)
    assert float(_stacked_product_norm(b_s, a_s)) == pytest.approx(float(expected), rel=1e-12)


def test_lora_fair_no_correction_when_clients_share_a():
    ups = _fair_clients(5, shared_a=True)
    fix = fair_correction(
        [u.adapters["w"] for u in ups], [5 / 16, 3 / 16, 8 / 16], lam=0.01, steps=100, lr=0.01
    )
    assert fix.cos_before == pytest.approx(1.0, abs=1e-12)
    assert float(fix.delta_b.norm()) <= 1e-9


def test_lora_fair_correction_shrinks_as_lambda_grows():
    ups = _fair_clients(6)
    fs, p = [u.adapters["w"] for u in ups], [5 / 16, 3 / 16, 8 / 16]
    norms = []
    for lam in (0.0, 0.01, 0.1, 1.0, 10.0):
        fix = fair_correction(fs, p, lam=lam, steps=150, lr=0.01)
        norm = float(fix.delta_b.norm())
        assert fix.cos_after >= fix.cos_before
        if lam > 0:  # the returned iterate beats dB = 0 on the objective
            assert norm <= (1 - fix.cos_before) / lam + 1e-9
        norms.append(norm)
    assert norms[0] > 0 and norms[-1] < 0.05 * norms[0]
    assert all(x >= y - 1e-9 for x, y in zip(norms[1:], norms[2:]))


# -- the "FedAvg kept only client 0" bug class --------------------------------------------
class _OnlyFirstClient(FedIT):
    """A deliberately broken FedAvg (the bug STYLE.md names) to show the checks catch it."""

    def aggregate(self, updates):
        return super().aggregate(list(updates)[:1])


def _mixes_every_client(agg, ups: list[ClientUpdate]) -> bool:
    """The invariant: the aggregate is exactly the p_k-weighted factor mean."""
    res = agg.aggregate(ups)
    total = sum(u.num_examples for u in ups)
    expect_b = sum((u.num_examples / total) * u.adapters["w"].b for u in ups)
    return torch.allclose(res.adapters["w"].b, expect_b, atol=1e-6)


def test_only_client_zero_bug_is_caught():
    g = torch.Generator().manual_seed(7)
    ups = [_update(f"c{i}", n, w=_rand(g, 4, 4, 2, 1.0)) for i, n in enumerate([2, 6])]
    assert _mixes_every_client(FedIT(), ups)
    assert not _mixes_every_client(_OnlyFirstClient(), ups)


# -- validation and the registry ----------------------------------------------------------
def test_mixed_ranks_refused_by_single_rank_algorithms_naming_clients():
    g = torch.Generator().manual_seed(8)
    ups = [
        _update("alice", 1, w=_rand(g, 4, 4, 2, 1.0)),
        _update("bob", 1, w=_rand(g, 4, 4, 3, 1.0)),
    ]
    for name in ("fedit", "lora_fair", "fedex", "ffa"):
        with pytest.raises(
            ValueError, match="'alice'.*'bob'.*use 'flora' or 'hetlora' for mixed ranks$"
        ):
            get_aggregator(name).aggregate(ups)
    same_rank_other_scale = [ups[0], _update("bob", 1, w=_rand(g, 4, 4, 2, 2.0))]
    with pytest.raises(ValueError, match="scaling"):
        FedIT().aggregate(same_rank_other_scale)
    with pytest.raises(ValueError, match="middle matrix"):
        FedSB().aggregate(ups[:1])


def test_get_aggregator_errors():
    with pytest.raises(
        ValueError, match=r"unknown aggregation algorithm 'fedprox'.*'fedit'.*'flora'"
    ):
        get_aggregator("fedprox")
    with pytest.raises(
        ValueError,
        match=r"^aggregation algorithm 'fedit' takes no option\(s\) \['fair_lambda'\]; it takes "
        r"\[\]$",
    ):
        get_aggregator("fedit", fair_lambda=0.1)
    fair = get_aggregator("lora_fair", fair_lambda=0.5, fair_steps=3, fair_lr=0.1)
    assert isinstance(fair, LoraFair) and fair.fair_lambda == 0.5 and fair.fair_steps == 3
    with pytest.raises(ValueError, match="fair_lr"):
        get_aggregator("lora_fair", fair_lr=0.0)


def test_frozen_factor_algorithms_refuse_unknown_modules():
    g = torch.Generator().manual_seed(9)
    ffa = get_aggregator("ffa")
    glob = ffa.init_global({"w": (4, 3)}, rank=2, scaling=1.0, generator=g)
    stranger = LoraFactors(a=glob["w"].a, b=torch.ones(4, 2), scaling=1.0)
    with pytest.raises(ValueError, match="shared A covers"):
        ffa.aggregate([_update("c0", 1, u=stranger)])
    sb = FedSB()
    init = sb.initialise_from_gradients(
        {"w": torch.randn(4, 3, generator=g)}, rank=2, lr=1.0, scaling=1.0
    )
    with pytest.raises(ValueError, match="shared factors cover"):
        sb.aggregate([_update("c0", 1, u=init["w"])])


def test_hetlora_keeps_global_rank_when_largest_clients_sit_out():
    """A round sampled only rank-4/8 clients: the rank-16 client must still be served next."""
    from fedft.aggregation import get_aggregator
    from fedft.types import ClientUpdate

    agg = get_aggregator("hetlora")
    gen = torch.Generator().manual_seed(0)
    glob = agg.init_global({"m": (6, 5)}, rank=16, scaling=16 / 16, generator=gen)
    ups = []
    for k, r in enumerate((4, 8)):
        start = agg.client_start(glob, rank=r, scaling=16 / r, generator=gen)["m"]
        trained = LoraFactors(
            a=start.a + 0.1, b=torch.randn(6, r, generator=gen), scaling=start.scaling
        )
        ups.append(ClientUpdate(client_id=str(k), adapters={"m": trained}, num_examples=10))
    result = agg.aggregate(ups)
    assert result.adapters["m"].rank == 16
    start16 = agg.client_start(result.adapters, rank=16, scaling=1.0, generator=gen)["m"]
    assert start16.rank == 16
    # rows no participating client trained are zero-padded, as HetLoRA prescribes
    assert torch.count_nonzero(result.adapters["m"].a[8:]) == 0
    # rows 0-3 average both clients, rows 4-7 average client 1 with client 0's zero padding
    a0, a1 = ups[0].adapters["m"].a, ups[1].adapters["m"].a
    assert torch.allclose(result.adapters["m"].a[:4], 0.5 * (a0 + a1[:4]), atol=1e-6)
    assert torch.allclose(result.adapters["m"].a[4:8], 0.5 * a1[4:], atol=1e-6)


# -- what survived mutation testing (docs/benchmarks.md §13) ------------------------------
@pytest.mark.parametrize("name", ["ffa", "fedsb"])
def test_frozen_factors_changed_by_every_client_alike_are_refused(name: str) -> None:
    """The frozen factors are the server's, not the first client's: a lone client (or all
    clients in collusion) changing them must be refused, else its A / B would become
    everyone's next frozen factors."""
    g = torch.Generator().manual_seed(11)
    agg = get_aggregator(name)
    if name == "fedsb":
        init = agg.initialise_from_gradients(  # type: ignore[attr-defined]
            {"w": torch.randn(6, 4, generator=g)}, rank=2, lr=1.0, scaling=2.0
        )
        f = replace(init["w"], b=init["w"].b + 0.5, r=torch.ones(2, 2))
        message = (
            r"^fedsb: client 'c0' sent a B or A for module 'w' that differs from the "
            r"shared, frozen one; Fed-SB trains only R$"
        )
    else:
        glob = agg.init_global({"w": (6, 4)}, rank=2, scaling=2.0, generator=g)
        f = replace(glob["w"], a=glob["w"].a + 0.5, b=torch.ones(6, 2))
        message = r"^ffa: client 'c0' changed the frozen A of module 'w'; FFA-LoRA trains only B$"
    with pytest.raises(ValueError, match=message):
        agg.aggregate([_update("c0", 3, w=f)])
    with pytest.raises(ValueError, match=message):
        agg.aggregate([_update("c0", 3, w=f), _update("c1", 5, w=f)])


@pytest.mark.parametrize("name", ["ffa", "fedsb"])
def test_frozen_factor_algorithms_without_an_init_take_the_clients_common_factors(
    name: str,
) -> None:
    """Never initialised (no frozen factors known yet): the clients must agree on their
    frozen factors, and what they train is averaged by p_k."""
    g = torch.Generator().manual_seed(12)
    a, b = torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g)
    trained = [
        torch.randn(2, 2, generator=g) if name == "fedsb" else torch.randn(6, 2) for _ in "xy"
    ]
    fs = [
        LoraFactors(a=a, b=b, scaling=2.0, r=t) if name == "fedsb" else LoraFactors(a, t, 2.0)
        for t in trained
    ]
    res = get_aggregator(name).aggregate([_update("x", 1, w=fs[0]), _update("y", 3, w=fs[1])])
    out = res.adapters["w"]
    assert torch.equal(out.a, a)
    mean = 0.25 * trained[0] + 0.75 * trained[1]
    assert torch.allclose(out.r if name == "fedsb" else out.b, mean, atol=1e-6)  # type: ignore[arg-type]
    other = replace(fs[1], a=a + 1.0)
    with pytest.raises(ValueError, match="'y'"):
        get_aggregator(name).aggregate([_update("x", 1, w=fs[0]), _update("y", 3, w=other)])


def test_fedsb_init_arguments_are_checked_at_their_boundaries() -> None:
    g = torch.Generator().manual_seed(13)
    grads = {"w": torch.randn(5, 3, generator=g)}
    with pytest.raises(ValueError, match="^fedsb: no gradients given for the initialisation$"):
        FedSB().initialise_from_gradients({}, rank=1, lr=1.0, scaling=1.0)
    for rank, lr, scaling in ((0, 1.0, 1.0), (1, 0.0, 1.0), (1, 1.0, 0.0)):
        with pytest.raises(
            ValueError,
            match=rf"^fedsb: need rank >= 1, lr > 0, scaling != 0; got {rank}, {lr}, {scaling}$",
        ):
            FedSB().initialise_from_gradients(grads, rank=rank, lr=lr, scaling=scaling)
    # rank 1 and rank = min(out, in) are allowed; one more, or a 1-D gradient, is not
    for rank in (1, 3):
        assert (
            FedSB().initialise_from_gradients(grads, rank=rank, lr=1.0, scaling=1.0)["w"].rank
            == rank
        )
    with pytest.raises(ValueError, match=r"^fedsb: module 'w': gradient of shape \(5, 3\) cannot"):
        FedSB().initialise_from_gradients(grads, rank=4, lr=1.0, scaling=1.0)
    with pytest.raises(ValueError, match=r"gradient of shape \(5,\) cannot give rank 1"):
        FedSB().initialise_from_gradients({"w": torch.ones(5)}, rank=1, lr=1.0, scaling=1.0)


def test_fedsb_init_global_must_match_the_initialisation() -> None:
    agg = FedSB()
    with pytest.raises(
        ValueError,
        match=r"^fedsb: call initialise_from_gradients\(grads, rank=\.\.\., lr=\.\.\., "
        r"scaling=\.\.\.\) before init_global; Fed-SB's B and A come from a gradient, not "
        r"from a seed$",
    ):
        agg.init_global({"w": (5, 3)}, rank=2, scaling=1.0, generator=torch.Generator())
    agg.initialise_from_gradients({"w": torch.randn(5, 3)}, rank=2, lr=1.0, scaling=1.0)
    gen = torch.Generator()
    with pytest.raises(ValueError, match=r"^fedsb: shapes \{'w': \(5, 4\)\} differ from"):
        agg.init_global({"w": (5, 4)}, rank=2, scaling=1.0, generator=gen)
    for rank, scaling in ((2, 2.0), (1, 1.0)):  # the scaling alone, the rank alone
        with pytest.raises(
            ValueError,
            match=rf"^fedsb: module 'w' was initialised at rank 2, scaling 1.0; asked for "
            rf"rank {rank}, scaling {scaling}$",
        ):
            agg.init_global({"w": (5, 3)}, rank=rank, scaling=scaling, generator=gen)


def test_fedsb_init_from_a_gradient_with_zeros_is_finite_and_in_its_dtype(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A weight row no example touched has a zero gradient (sign 0): U is 0 there, and the
    factors stay finite, in the gradient's dtype (what goes on the wire)."""
    grad = torch.randn(6, 4, generator=torch.Generator().manual_seed(14))
    grad[2] = 0.0
    with caplog.at_level(logging.DEBUG, logger="fedft.aggregation.fedsb"):
        init = FedSB().initialise_from_gradients({"w": grad}, rank=2, lr=0.5, scaling=2.0)["w"]
    assert init.r is not None
    for t in (init.a, init.b, init.r):
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
    u = -0.5 * torch.sign(grad.double())
    top = float(torch.linalg.matrix_norm(u, ord=2))
    assert caplog.messages == [f"fedsb init w: top singular value {top:.4g}"]
    assert float(init.delta().double()[2].abs().max()) <= 1e-6


def test_flora_refuses_rank_zero_and_a_start_before_init_global() -> None:
    gen = torch.Generator()
    with pytest.raises(ValueError, match="^rank = 0 is not allowed: a LoRA rank must be >= 1$"):
        get_aggregator("flora").init_global({"w": (4, 3)}, rank=0, scaling=1.0, generator=gen)
    assert (
        get_aggregator("flora").init_global({"w": (4, 3)}, rank=1, scaling=1.0, generator=gen) == {}
    )
    with pytest.raises(
        ValueError, match=r"^flora: call init_global\(shapes, \.\.\.\) before client_start$"
    ):
        get_aggregator("flora").client_start({}, rank=2, scaling=1.0, generator=gen)


def test_flora_reports_the_stacked_rank_it_sends() -> None:
    """``stacked_rank`` is what FLoRA's download scales with: sum r_k (largest over modules)."""
    g = torch.Generator().manual_seed(15)
    ups = [_update(f"c{i}", 1, w=_rand(g, 4, 3, r, 1.0)) for i, r in enumerate([1, 4, 2])]
    res = get_aggregator("flora").aggregate(ups)
    assert res.metrics["stacked_rank"] == 7.0


def test_hetlora_refuses_a_client_of_rank_zero_or_scaling_zero() -> None:
    agg = get_aggregator("hetlora")
    glob = agg.init_global({"w": (4, 3)}, rank=4, scaling=1.0, generator=torch.Generator())
    for rank, scaling in ((0, 1.0), (2, 0.0)):
        with pytest.raises(
            ValueError,
            match=rf"^hetlora: need rank >= 1 and scaling != 0, got {rank}, {scaling}$",
        ):
            agg.client_start(glob, rank=rank, scaling=scaling, generator=torch.Generator())


def test_hetlora_checkpoint_without_global_rank_restores_as_before_any_round() -> None:
    """A checkpoint written before HetLoRA kept its global rank (no such keys) still loads."""
    old = {"name": "hetlora", "shapes": {"w": [4, 3]}}
    agg = get_aggregator("hetlora")
    agg.load_state_dict(old)
    assert agg.state_dict() == {**old, "global_rank": 0, "global_scaling": 0.0}


def test_lora_fair_metrics_summarise_every_module() -> None:
    """The metrics the run records: the mean cosine before / after over modules, the worst
    module after, and the norm of the whole correction (all modules together)."""
    g = torch.Generator().manual_seed(16)
    ups = [
        _update(f"c{i}", n, q=_rand(g, 10, 8, 3, 2.0), v=_rand(g, 6, 8, 3, 2.0))
        for i, n in enumerate([5, 3, 8])
    ]
    agg = LoraFair(fair_lambda=0.01, fair_steps=30, fair_lr=0.05)
    res = agg.aggregate(ups)
    p = [5 / 16, 3 / 16, 8 / 16]
    fixes = [
        fair_correction([u.adapters[m] for u in ups], p, lam=0.01, steps=30, lr=0.05)
        for m in ("q", "v")
    ]
    assert res.metrics["clients"] == 3.0
    assert res.metrics["fair_cos_before"] == pytest.approx(
        (fixes[0].cos_before + fixes[1].cos_before) / 2, rel=1e-9
    )
    assert res.metrics["fair_cos_after"] == pytest.approx(
        (fixes[0].cos_after + fixes[1].cos_after) / 2, rel=1e-9
    )
    assert res.metrics["fair_cos_after_min"] == min(f.cos_after for f in fixes)
    norm = sum(float(f.delta_b.pow(2).sum()) for f in fixes) ** 0.5
    assert norm > 0 and res.metrics["fair_delta_b_norm"] == pytest.approx(norm, rel=1e-9)
    for m in ("q", "v"):  # the corrected B is sent in the clients' dtype, like A
        assert res.adapters[m].b.dtype == res.adapters[m].a.dtype == torch.float32


def _best_cosine_with_a_fixed(fs: list[LoraFactors], p: list[float]) -> float:
    """The best cos(dW, s (B + dB) A) over every dB: dW projected on the row space of A."""
    dw = sum(pk * f.scaling * f.b.double() @ f.a.double() for pk, f in zip(p, fs, strict=True))
    a_bar = sum(pk * f.a.double() for pk, f in zip(p, fs, strict=True))
    proj = a_bar.T @ torch.linalg.solve(a_bar @ a_bar.T, a_bar)  # (in, in)
    return float((dw @ proj).norm() / dw.norm())  # type: ignore[union-attr]


def test_lora_fair_without_penalty_reaches_the_best_cosine_a_fixed_a_allows():
    """With lambda = 0 the correction solves max cos over dB; its optimum is known in closed
    form (dW projected on the row space of A), and the server's Adam reaches it."""
    fs, p = [u.adapters["w"] for u in _fair_clients(4)], [5 / 16, 3 / 16, 8 / 16]
    best = _best_cosine_with_a_fixed(fs, p)
    fix = fair_correction(fs, p, lam=0.0, steps=300, lr=0.05)
    assert fix.cos_before < best - 0.1
    assert best - 1e-6 <= fix.cos_after <= best + 1e-9
    one = fair_correction(fs, p, lam=0.0, steps=1, lr=1e-3)  # a single step already helps
    assert one.cos_after > one.cos_before


def test_lora_fair_is_relative_to_the_scale_of_b_and_exact_on_tiny_updates():
    """LoRA updates are small (B starts at 0). Scaling every B_k by c scales dB by c and
    leaves the cosines as they were (fair_lr is relative to rms(B)); the cosines of tiny
    factors are the dense ones, not distorted by a floor on the norms."""
    fs, p = [u.adapters["w"] for u in _fair_clients(4)], [5 / 16, 3 / 16, 8 / 16]
    c = 1e-3
    tiny = [replace(f, b=f.b * c, a=f.a * 1e-2) for f in fs]
    big = fair_correction([replace(f, a=f.a * 1e-2) for f in fs], p, lam=0.0, steps=50, lr=0.05)
    small = fair_correction(tiny, p, lam=0.0, steps=50, lr=0.05)
    assert small.cos_after == pytest.approx(big.cos_after, abs=1e-7)
    torch.testing.assert_close(small.delta_b, c * big.delta_b, rtol=1e-5, atol=0.0)
    dw = _ideal([_update(f"c{i}", n, w=f) for i, (f, n) in enumerate(zip(tiny, [5, 3, 8]))], "w")
    fedit = FedIT().aggregate(
        [_update(f"c{i}", n, w=f) for i, (f, n) in enumerate(zip(tiny, [5, 3, 8]))]
    )
    assert small.cos_before == pytest.approx(_cos(dw, _effective(fedit)["w"]), abs=1e-6)


def test_lora_fair_options_defaults_and_boundaries():
    """The Python API's defaults are the config's (a run and a script agree); lambda = 0
    and 0 steps are allowed (plain FedIT), negatives are refused by name."""
    from fedft.config import load_config

    agg = load_config(None, []).aggregation
    assert get_aggregator("lora_fair").state_dict() == {
        "name": "lora_fair",
        "shapes": {},
        "fair_lambda": agg.fair_lambda,
        "fair_steps": agg.fair_steps,
        "fair_lr": agg.fair_lr,
    }
    LoraFair(fair_lambda=0.0, fair_steps=0)
    for opts in ({"fair_lambda": -0.1}, {"fair_steps": -1}, {"fair_lr": 0.0}):
        with pytest.raises(
            ValueError, match="^lora_fair: need fair_lambda >= 0, fair_steps >= 0, fair_lr > 0"
        ):
            LoraFair(**opts)  # type: ignore[arg-type]


def test_refusals_of_inconsistent_replies_name_what_differs():
    """What the operator reads when clients disagree: which clients, modules and shapes."""
    g = torch.Generator().manual_seed(17)
    w, v = _rand(g, 4, 3, 2, 1.0), _rand(g, 5, 3, 2, 1.0)
    with pytest.raises(
        ValueError,
        match=r"^fedit: client 'b' adapts different modules than client 'a' \(missing \['v'\], "
        r"extra \['u'\]\)$",
    ):
        FedIT().aggregate([_update("a", 1, w=w, v=v), _update("b", 1, w=w, u=v)])
    heads = [
        ClientUpdate(c, {"w": w}, 1, extras={"head": torch.zeros(s)})
        for c, s in zip("ab", [(2, 3), (3, 2)])
    ]
    with pytest.raises(
        ValueError, match=r"^extras 'head': client 'a' sends shape \(2, 3\), client 'b' \(3, 2\)$"
    ):
        FedIT().aggregate(heads)
    with_r = replace(w, r=torch.eye(2))
    with pytest.raises(
        ValueError,
        match="^fedit: module 'w' of client 'a' must come without a Fed-SB middle matrix r$",
    ):
        FedIT().aggregate([_update("a", 1, w=with_r)])
    with pytest.raises(
        ValueError,
        match="^fedsb: module 'w' of client 'a' must come with a Fed-SB middle matrix r$",
    ):
        FedSB().aggregate([_update("a", 1, w=w)])
    with pytest.raises(ValueError, match="^fedit: client 'a' sends no adapters or extras$"):
        FedIT().aggregate([ClientUpdate("a", {}, 1)])
    with pytest.raises(
        ValueError, match="^no client updates to aggregate: at least one client must reply$"
    ):
        client_weights([])


def test_prompt_tuning_replies_carry_only_extras_and_are_averaged():
    """Soft-prompt clients send no adapters, only the prompt (and head): that is a reply."""
    ups = [
        ClientUpdate(c, {}, n, extras={"prompt": torch.full((2, 3), x)})
        for c, n, x in (("a", 1, 4.0), ("b", 3, 0.0))
    ]
    res = FedIT().aggregate(ups)
    assert res.adapters == {} and torch.equal(res.extras["prompt"], torch.ones(2, 3))


def test_fresh_lora_is_peft_init_and_refuses_rank_zero():
    """A is U(-1/sqrt(in), 1/sqrt(in)) as peft / nn.Linear draw it (the bound is reached on
    a large draw), B = 0; rank 0 is refused, rank 1 and a 1-wide weight are fine."""
    gen = torch.Generator().manual_seed(18)
    glob = FedIT().init_global({"w": (3, 100), "t": (1, 1)}, rank=64, scaling=1.0, generator=gen)
    top = float(glob["w"].a.abs().max())
    assert 0.99 * 0.1 < top <= 0.1 and torch.count_nonzero(glob["w"].b) == 0
    assert FedIT().init_global({"w": (3, 4)}, rank=1, scaling=1.0, generator=gen)["w"].rank == 1
    with pytest.raises(ValueError, match="^rank = 0 is not allowed: a LoRA rank must be >= 1$"):
        FedIT().init_global({"w": (3, 4)}, rank=0, scaling=1.0, generator=gen)
    for bad in ((3, 0), (3, 4, 5)):
        with pytest.raises(
            ValueError, match=rf"^module 'w': shape {re.escape(str(bad))} is not \(out, in\) > 0$"
        ):
            FedIT().init_global({"w": bad}, rank=1, scaling=1.0, generator=gen)  # type: ignore[dict-item]


def test_a_state_loads_only_into_its_own_algorithm():
    state = get_aggregator("ffa").state_dict()
    with pytest.raises(ValueError, match="^cannot load a 'ffa' aggregator state into 'fedit'$"):
        FedIT().load_state_dict(state)


def test_weighted_mean_accumulates_in_float64_and_checks_its_arguments():
    """Float32 uploads whose large terms cancel: the float64 sum keeps the small one."""
    ones = torch.ones(3)
    got = weighted_mean([ones, 1e8 * ones, -1e8 * ones], [1 / 3] * 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.full((3,), 1 / 3), rtol=1e-6, atol=0.0)
    with pytest.raises(ValueError, match="^need one weight per tensor; got 2 and 1$"):
        weighted_mean([ones, ones], [1.0])
    with pytest.raises(ValueError, match="^need one weight per tensor; got 0 and 0$"):
        weighted_mean([], [])


def test_lora_fair_first_step_is_adams_sign_step_of_size_lr_relative_to_b():
    """One Adam step with bias correction moves every coordinate by lr (a sign step), and
    fair_lr is relative to rms(B): each entry of the first correction is lr * rms(B)."""
    fs, p = [u.adapters["w"] for u in _fair_clients(4)], [5 / 16, 3 / 16, 8 / 16]
    b_bar = sum(pk * f.b.double() for pk, f in zip(p, fs, strict=True))
    rms = float(b_bar.pow(2).mean().sqrt())  # type: ignore[union-attr]
    fix = fair_correction(fs, p, lam=0.0, steps=1, lr=1e-3)
    assert fix.cos_after > fix.cos_before
    torch.testing.assert_close(
        fix.delta_b.abs(), torch.full_like(fix.delta_b, 1e-3 * rms), rtol=1e-4, atol=0.0
    )


def test_fedsb_checkpoint_before_the_first_round_keeps_the_initial_r():
    """Stopped after the init, resumed: round 1 must start from the same B, R, A."""
    agg = FedSB()
    agg.initialise_from_gradients({"w": torch.randn(5, 3)}, rank=2, lr=0.5, scaling=2.0)
    restored = FedSB()
    restored.load_state_dict(agg.state_dict())
    gen = torch.Generator()
    a = agg.init_global({"w": (5, 3)}, rank=2, scaling=2.0, generator=gen)["w"]
    b = restored.init_global({"w": (5, 3)}, rank=2, scaling=2.0, generator=gen)["w"]
    assert a.r is not None and b.r is not None and torch.equal(a.r, b.r)
    assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b)
