"""Accountants, budget planning and user-level (central) DP."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedft.aggregation import get_aggregator
from fedft.privacy import (
    BudgetExceededError,
    CentralDP,
    PrivacyAccountant,
    calibrate_noise,
    check_budget,
    epsilon_of,
    format_plan,
    plan,
    plan_user_level,
    sample_rate_for,
)
from fedft.types import PARTS_FIELDS, ClientUpdate, LoraFactors

# Opacus 1.6 tests/accountants_test.py: sigma 1.5, q 0.04, delta 1e-5. The RDP test takes
# int(90 / 0.04) = 2250 steps; the PRV test int(90 // 0.04), which is 2249 in floating point.
RDP_2250 = 7.32911117143
PRV_2249 = 6.777395712150674


# -- accountant ------------------------------------------------------------------------------
def test_rdp_matches_opacus_constant_when_stepped_in_rounds():
    acc = PrivacyAccountant("rdp")
    for _ in range(9):
        acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=250)
    assert acc.steps == 2250 and acc.history == [(1.5, 0.04, 2250)]
    assert acc.epsilon(1e-5) == pytest.approx(RDP_2250, rel=1e-6)


def test_prv_matches_opacus_constant():
    acc = PrivacyAccountant("prv")
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=2000)
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=249)
    assert acc.epsilon(1e-5) == pytest.approx(PRV_2249, rel=1e-6)


def test_gdp_matches_opacus_range():
    eps = epsilon_of([(1.5, 0.04, 2249)], delta=1e-5, mechanism="gdp")
    assert 6.59 < eps < 6.6
    with pytest.raises(ValueError, match="one"):
        epsilon_of([(1.5, 0.04, 10), (1.0, 0.04, 10)], delta=1e-5, mechanism="gdp")


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_never_decreases_over_rounds(mechanism):
    acc = PrivacyAccountant(mechanism)
    rounds = [(1.0, 0.05, 20), (2.0, 0.05, 20), (2.0, 0.01, 5), (1.0, 0.05, 20)]
    last = 0.0
    for sigma, q, steps in rounds:
        predicted = acc.epsilon_if(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
        eps = acc.epsilon(1e-5)
        assert eps == pytest.approx(predicted, rel=1e-9)
        assert eps > last
        last = eps
    # a step with no steps spends nothing and changes nothing
    acc.step(noise_multiplier=1.0, sample_rate=0.5, steps=0)
    assert acc.epsilon(1e-5) == last


def test_epsilon_if_records_nothing():
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    before = acc.state_dict()
    after = acc.epsilon_if(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5)
    assert acc.state_dict() == before
    assert after > acc.epsilon(1e-5)
    assert after == pytest.approx(epsilon_of([(1.0, 0.1, 20)], delta=1e-5, mechanism="rdp"))


def test_state_dict_round_trips_through_json_and_continues():
    acc = PrivacyAccountant("rdp", level="sample")
    acc.step(noise_multiplier=1.2, sample_rate=0.02, steps=100)
    acc.step(noise_multiplier=0.9, sample_rate=0.02, steps=30)
    eps = acc.epsilon(1e-5)
    restored = PrivacyAccountant("rdp", level="sample")
    restored.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert restored.history == acc.history
    assert restored.epsilon(1e-5) == eps
    for a in (acc, restored):
        a.step(noise_multiplier=0.9, sample_rate=0.02, steps=50)
    assert restored.epsilon(1e-5) == acc.epsilon(1e-5) > eps
    with pytest.raises(ValueError, match="user"):
        PrivacyAccountant("rdp", level="user").load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="prv"):
        PrivacyAccountant("prv").load_state_dict(acc.state_dict())
    bad = {**acc.state_dict(), "history": [[1.0, 2.0, 3]]}
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyAccountant("rdp").load_state_dict(bad)


def test_no_noise_means_infinite_epsilon_and_bad_inputs_are_refused():
    acc = PrivacyAccountant("prv")
    assert acc.epsilon(1e-5) == 0.0
    acc.step(noise_multiplier=0.0, sample_rate=0.1, steps=1)
    assert math.isinf(acc.epsilon(1e-5))
    with pytest.raises(ValueError, match="sample_rate"):
        acc.step(noise_multiplier=1.0, sample_rate=0.0)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(1.5)
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant("moments")  # type: ignore[arg-type]


def test_check_budget():
    acc = PrivacyAccountant("rdp")
    kw = dict(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5)
    yes = check_budget(acc, epsilon_budget=8.0, **kw)
    no = check_budget(acc, epsilon_budget=7.0, **kw)
    assert yes.allowed and not no.allowed
    assert yes.epsilon_now == 0.0 and no.epsilon_after == pytest.approx(RDP_2250, rel=1e-6)
    assert no.level == "sample" and "refused" in no.message
    assert acc.steps == 0


# -- planner ---------------------------------------------------------------------------------
def test_sample_rate_for():
    assert sample_rate_for(1000, 16) == 0.016
    assert sample_rate_for(10, 16) == 1.0
    with pytest.raises(ValueError):
        sample_rate_for(0, 16)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_calibrate_noise_meets_the_target_tightly(mechanism):
    target, q, steps = 3.0, 0.05, 200
    sigma = calibrate_noise(
        epsilon=target, delta=1e-5, sample_rate=q, steps=steps, accountant=mechanism
    )
    eps = epsilon_of([(sigma, q, steps)], delta=1e-5, mechanism=mechanism)
    assert eps <= target
    assert eps > target - 0.05  # not wastefully noisy
    # a clearly smaller sigma would overspend
    assert epsilon_of([(0.95 * sigma, q, steps)], delta=1e-5, mechanism=mechanism) > target


def test_plan_sample_level():
    p = plan(
        epsilon=3.0, delta=1e-5, sample_rate=0.05, steps_per_round=20, rounds=10, accountant="rdp"
    )
    assert p.level == "sample"
    assert p.noise_multiplier == pytest.approx(
        calibrate_noise(epsilon=3.0, delta=1e-5, sample_rate=0.05, steps=200, accountant="rdp")
    )
    rounds = [r for r, _ in p.epsilon_by_round]
    eps = [e for _, e in p.epsilon_by_round]
    assert rounds == list(range(1, 11))
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert p.epsilon <= 3.0 and p.epsilon == eps[-1]
    alts = dict(p.alternatives)
    assert set(alts) == {5, 20}
    assert alts[5] < p.epsilon < alts[20]
    assert alts[5] == pytest.approx(eps[4])
    text = format_plan(p)
    assert "sample-level" in text and f"{p.noise_multiplier:.4f}" in text
    assert len([line for line in text.splitlines() if line.strip().startswith("10 ")]) == 1


def test_plan_user_level_uses_client_sampling_rate():
    p = plan_user_level(
        epsilon=5.0, delta=1e-4, clients_per_round=10, num_clients=100, rounds=12, accountant="rdp"
    )
    assert p.level == "user" and p.sample_rate == 0.1 and p.steps_per_round == 1
    assert p.epsilon <= 5.0
    assert "user-level" in format_plan(p)
    assert any("sigma*C/m" in n for n in p.notes)
    with pytest.raises(ValueError, match="clients_per_round"):
        plan_user_level(epsilon=1, delta=1e-5, clients_per_round=5, num_clients=2, rounds=1)


# -- central (user-level) DP -----------------------------------------------------------------
SHAPES = {"layer0.q": (64, 48), "layer0.v": (64, 48), "layer1.q": (64, 48), "layer1.v": (64, 48)}
RANK, SCALING = 8, 2.0


def make_inner(name: str):
    inner = get_aggregator(name)
    g = torch.Generator().manual_seed(0)
    if name == "fedsb":
        grads = {m: torch.randn(s, generator=g) for m, s in SHAPES.items()}
        inner.initialise_from_gradients(grads, rank=RANK, lr=1e-3, scaling=SCALING)
    ref = inner.init_global(SHAPES, rank=RANK, scaling=SCALING, generator=g)
    return inner, ref


def client_update(ref, trainable, cid, scale, *, n=10, seed=0, head=None):
    """A client that moved its trainable fields by ``scale`` * a random direction."""
    g = torch.Generator().manual_seed(seed)
    fields = PARTS_FIELDS[trainable]
    adapters = {}
    for mod, f in ref.items():
        new = {k: getattr(f, k) for k in ("a", "b", "r")}
        for k in fields:
            new[k] = new[k] + scale * torch.randn(new[k].shape, generator=g)
        adapters[mod] = LoraFactors(a=new["a"], b=new["b"], scaling=f.scaling, r=new["r"])
    extras = {} if head is None else {"head": head + scale * torch.randn(head.shape, generator=g)}
    return ClientUpdate(client_id=cid, adapters=adapters, num_examples=n, extras=extras)


def flat_trainable(adapters, extras, trainable):
    fields = PARTS_FIELDS[trainable]
    parts = [getattr(adapters[m], k).flatten() for m in sorted(adapters) for k in fields]
    parts += [extras[k].flatten() for k in sorted(extras)]
    return torch.cat(parts).to(torch.float64)


@pytest.mark.parametrize("name", ["fedit", "fedsb", "ffa"])
def test_no_noise_no_clip_equals_the_inner_uniform_mean(name):
    inner, ref = make_inner(name)
    head = torch.randn(2, 16)
    dp = CentralDP(
        make_inner(name)[0],
        clip_norm=math.inf, noise_multiplier=0.0, expected_clients=3, num_clients=10, seed=0,
    )  # fmt: skip
    dp.init_global(SHAPES, rank=RANK, scaling=SCALING, generator=torch.Generator().manual_seed(0))
    dp.set_reference(ref, extras={"head": head})
    # different n_k: user-level DP ignores them (uniform weights)
    ups = [
        client_update(
            ref, inner.trainable, f"c{k}", 0.1 * (k + 1), n=5 * (k + 1), seed=k, head=head
        )
        for k in range(3)
    ]
    got = dp.aggregate(ups)
    equal_n = [ClientUpdate(u.client_id, u.adapters, 1, extras=u.extras) for u in ups]
    want = inner.aggregate(equal_n)
    for mod in SHAPES:
        for k in ("a", "b", "r"):
            x, y = getattr(got.adapters[mod], k), getattr(want.adapters[mod], k)
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.extras["head"], want.extras["head"], rtol=1e-5, atol=1e-6)
    # and it is not the p_k-weighted mean
    weighted = inner.aggregate(ups)
    assert not torch.allclose(
        flat_trainable(got.adapters, got.extras, inner.trainable),
        flat_trainable(weighted.adapters, weighted.extras, inner.trainable),
    )


def test_clipping_bounds_each_clients_influence():
    inner, ref = make_inner("fedit")
    clip, m = 0.5, 4
    dp = CentralDP(
        inner, clip_norm=clip, noise_multiplier=0.0, expected_clients=m, num_clients=20, seed=0
    )
    dp.set_reference(ref)
    ref_flat = flat_trainable(ref, {}, "ab")
    big = client_update(ref, "ab", "big", 100.0, seed=1)
    idle = [client_update(ref, "ab", f"idle{k}", 0.0) for k in range(2)]
    out = dp.aggregate([big, *idle])
    moved = flat_trainable(out.adapters, {}, "ab") - ref_flat
    assert float(moved.norm()) == pytest.approx(clip / m, rel=1e-5)
    # direction kept: parallel to the client's own update
    own = flat_trainable(big.adapters, {}, "ab") - ref_flat
    assert float(torch.nn.functional.cosine_similarity(moved, own, dim=0)) > 0.9999
    # many large clients: the total move is at most (clients) * C / m
    dp.set_reference(ref)
    many = [client_update(ref, "ab", f"c{k}", 50.0, seed=k) for k in range(4)]
    moved = flat_trainable(dp.aggregate(many).adapters, {}, "ab") - ref_flat
    assert float(moved.norm()) <= 4 * clip / m * (1 + 1e-6)


def test_noise_std_is_sigma_c_over_m():
    inner, ref = make_inner("fedit")
    sigma, clip, m = 1.5, 2.0, 4
    dp = CentralDP(
        inner, clip_norm=clip, noise_multiplier=sigma, expected_clients=m, num_clients=40, seed=7
    )
    dp.set_reference(ref)
    same = [client_update(ref, "ab", f"c{k}", 0.0) for k in range(3)]  # zero updates
    out = dp.aggregate(same)
    noise = flat_trainable(out.adapters, {}, "ab") - flat_trainable(ref, {}, "ab")
    expected = sigma * clip / m
    assert noise.numel() > 3000
    std = float(noise.std())
    assert abs(std / expected - 1) < 0.05, (std, expected)
    assert abs(std / (1.3 * expected) - 1) > 0.15
    assert out.metrics["user_dp_noise_std"] == pytest.approx(expected)


def test_user_level_accounting_budget_and_resume():
    def build():
        inner, ref = make_inner("fedit")
        dp = CentralDP(
            inner, clip_norm=1.0, noise_multiplier=1.5, expected_clients=2, num_clients=20,
            seed=3, accountant="rdp", epsilon_budget=1.2, delta=1e-5,
        )  # fmt: skip
        dp.set_reference(ref)
        return dp, ref

    dp, ref = build()
    eps, rounds = [], 0
    while True:
        ups = [client_update(ref, "ab", f"c{k}", 0.01, seed=rounds * 2 + k) for k in range(2)]
        before = dp.state_dict()
        try:
            out = dp.aggregate(ups)
        except BudgetExceededError as err:
            assert err.decision.level == "user" and err.decision.epsilon_after > 1.2
            after = dp.state_dict()
            assert after["accountant"] == before["accountant"] and after["round"] == before["round"]
            for mod, f in before["reference"].items():
                assert torch.equal(after["reference"][mod]["a"], f["a"])
            break
        rounds += 1
        eps.append(out.metrics["epsilon_user"])
        ref = out.adapters
    assert rounds == 3  # eps 0.95, 1.06, 1.14; a 4th round would reach 1.22
    assert all(a < b for a, b in zip(eps, eps[1:])) and eps[-1] <= 1.2
    assert dp.accountant.level == "user"
    assert dp.accountant.history == [(1.5, 0.1, rounds)]

    # resume: a fresh wrapper loaded from round-1 state repeats round 2 exactly
    a, ref_a = build()
    ups1 = [client_update(ref_a, "ab", f"c{k}", 0.01, seed=k) for k in range(2)]
    r1 = a.aggregate(ups1)
    saved = a.state_dict()
    ups2 = [client_update(r1.adapters, "ab", f"c{k}", 0.01, seed=10 + k) for k in range(2)]
    r2 = a.aggregate(ups2)
    b, _ = build()
    b.load_state_dict(saved)
    r2b = b.aggregate(ups2)
    for mod in SHAPES:
        assert torch.equal(r2.adapters[mod].a, r2b.adapters[mod].a)
    assert b.epsilon(1e-5) == a.epsilon(1e-5)


def test_central_dp_refuses_what_it_cannot_protect():
    inner, ref = make_inner("ffa")
    with pytest.raises(ValueError, match="linear"):
        CentralDP(get_aggregator("flora"), clip_norm=1, noise_multiplier=1, expected_clients=2,
                  num_clients=4, seed=0)  # fmt: skip
    with pytest.raises(ValueError, match="infinite"):
        CentralDP(inner, clip_norm=math.inf, noise_multiplier=1.0, expected_clients=2,
                  num_clients=4, seed=0)  # fmt: skip
    dp = CentralDP(
        inner, clip_norm=1.0, noise_multiplier=0.0, expected_clients=2, num_clients=4, seed=0
    )
    with pytest.raises(RuntimeError, match="set_reference"):
        dp.aggregate([client_update(ref, "b", "c0", 0.1)])
    dp.set_reference(ref)
    cheat = client_update(ref, "ab", "c0", 0.1)  # moved the frozen, shared A
    with pytest.raises(ValueError, match="frozen"):
        dp.aggregate([cheat])


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_last_planned_round_at_exactly_the_budget_is_allowed(mechanism):
    """The budget is spendable to the last bit: ε after == budget is allowed, more is not."""
    sigma, q, per_round, rounds, delta = 1.1, 0.05, 20, 4, 1e-5
    budget = epsilon_of([(sigma, q, per_round * rounds)], delta=delta, mechanism=mechanism)
    acc = PrivacyAccountant(mechanism)
    for r in range(rounds):
        decision = check_budget(
            acc,
            noise_multiplier=sigma,
            sample_rate=q,
            steps=per_round,
            epsilon_budget=budget,
            delta=delta,
        )
        assert decision.allowed, (r, decision.message)
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=per_round)
    assert decision.epsilon_after == budget  # the last round lands exactly on the budget
    one_more = check_budget(
        acc, noise_multiplier=sigma, sample_rate=q, steps=1, epsilon_budget=budget, delta=delta
    )
    assert not one_more.allowed and "refused" in one_more.message


# -- what the accountant refuses, keeps and reports, to the boundary (from mutation testing) --
def test_step_arguments_are_checked_at_their_boundaries_and_named():
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=0.5, sample_rate=1.0, steps=1)  # q = 1 and σ < 1 are valid
    assert acc.history == [(0.5, 1.0, 1)]
    bad = [
        ({"noise_multiplier": -0.1}, "noise_multiplier"),
        ({"noise_multiplier": "1.0"}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.0 + 1e-12}, "sample_rate"),
        ({"sample_rate": "0.1"}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": 2.0}, "steps"),
    ]
    for change, key in bad:
        kw = {"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3, **change}
        for call in (acc.step, lambda **k: acc.epsilon_if(delta=1e-5, **k)):
            with pytest.raises(ValueError, match=f"^{key} = "):
                call(**kw)
        state = {
            **acc.state_dict(),
            "history": [[kw["noise_multiplier"], kw["sample_rate"], kw["steps"]]],
        }
        with pytest.raises(ValueError, match=f"^{key} = "):
            PrivacyAccountant("rdp").load_state_dict(state)
    assert acc.history == [(0.5, 1.0, 1)]  # nothing refused was recorded
    for delta in (0.0, 1.0, -1e-5):
        with pytest.raises(ValueError, match="^delta = "):
            epsilon_of([(1.0, 0.1, 1)], delta=delta, mechanism="rdp")
    assert math.isfinite(epsilon_of([(1.0, 0.1, 1)], delta=0.5, mechanism="rdp"))  # allowed


def test_history_merges_only_equal_consecutive_pairs():
    acc = PrivacyAccountant("rdp")
    runs = [
        (1.0, 0.1, 5),
        (1.0, 0.2, 5),
        (2.0, 0.2, 4),
        (2.0, 0.2, 3),
        (1.0, 0.1, 1),
        (1.0, 0.1, 0),
    ]
    for sigma, q, n in runs:
        acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
    assert acc.history == [(1.0, 0.1, 5), (1.0, 0.2, 5), (2.0, 0.2, 7), (1.0, 0.1, 1)]
    assert acc.steps == 18
    restored = PrivacyAccountant("rdp")
    restored.load_state_dict({**acc.state_dict(), "history": [list(r) for r in runs]})
    assert restored.history == acc.history


def test_epsilon_of_a_mixed_history_is_opacus_exactly():
    """ε of several (σ, q, steps) runs is Opacus' own accountant's ε for the same history."""
    from opacus.accountants import PRVAccountant, RDPAccountant
    from opacus.accountants.analysis import gdp as gdp_analysis

    history = [(1.1, 0.02, 300), (0.8, 0.05, 40), (1.1, 0.02, 1)]
    rdp = RDPAccountant()
    rdp.history = list(history)
    assert epsilon_of(history, delta=1e-6, mechanism="rdp") == pytest.approx(
        rdp.get_epsilon(delta=1e-6), rel=1e-12
    )
    prv = PRVAccountant()
    prv.history = list(history)
    assert epsilon_of(history, delta=1e-6, mechanism="prv") == pytest.approx(
        prv.get_epsilon(delta=1e-6), rel=1e-9
    )
    assert epsilon_of([(1.3, 0.03, 77)], delta=1e-6, mechanism="gdp") == pytest.approx(
        gdp_analysis.compute_eps_poisson(
            steps=77, noise_multiplier=1.3, sample_rate=0.03, delta=1e-6
        ),
        rel=1e-12,
    )
    # runs of zero steps spend nothing, even without noise; one step spends something
    assert epsilon_of([(0.0, 0.1, 0), *history], delta=1e-6, mechanism="rdp") == epsilon_of(
        history, delta=1e-6, mechanism="rdp"
    )
    assert epsilon_of([(1.0, 0.1, 0)], delta=1e-6, mechanism="prv") == 0.0
    assert epsilon_of([(1.0, 0.1, 1)], delta=1e-6, mechanism="rdp") > 0.0
    assert math.isinf(epsilon_of([(1.0, 0.1, 5), (0.0, 0.1, 1)], delta=1e-6, mechanism="rdp"))


def test_accountant_defaults_and_refused_settings():
    acc = PrivacyAccountant()
    assert (acc.mechanism, acc.level) == ("prv", "sample")
    assert "steps=0" in repr(acc) and "'prv'" in repr(acc)
    with pytest.raises(
        ValueError, match=r"^level = 'client' is not allowed: one of \['sample', 'user'\]$"
    ):
        PrivacyAccountant("rdp", level="client")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^accountant = 'moments'.*'prv'"):
        PrivacyAccountant("moments")  # type: ignore[arg-type]


def test_gdp_accountant_warns_that_it_can_underestimate(caplog):
    with caplog.at_level("WARNING", logger="fedft.privacy.accountant"):
        PrivacyAccountant("rdp")
        assert not caplog.records
        PrivacyAccountant("gdp", level="user")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert caplog.records[0].getMessage() == (
        "GDP accounting is an approximation that can underestimate ε (Gopi et al., 2021); "
        "prefer 'prv' for reported budgets"
    )


def test_gdp_epsilon_at_the_edges_of_its_solver_is_zero_or_inf_not_an_error():
    from opacus.accountants.analysis import gdp as gdp_analysis

    history = [(1.0, 0.01, 100)]
    mid = epsilon_of(history, delta=1e-5, mechanism="gdp")
    mu = gdp_analysis.compute_mu_poisson(steps=100, noise_multiplier=1.0, sample_rate=0.01)
    assert mid == pytest.approx(gdp_analysis.eps_from_mu(mu=mu, delta=1e-5))
    # δ >= δ(ε=0): ε = 0 already holds (Opacus' root finder raised a ValueError here)
    edge = gdp_analysis.delta_eps_mu(eps=0.0, mu=mu)
    assert epsilon_of(history, delta=min(0.99, edge * 1.01), mechanism="gdp") == 0.0
    assert epsilon_of(history, delta=0.9, mechanism="gdp") == 0.0
    # just below δ(0), a small positive ε solves it
    assert 0 < epsilon_of(history, delta=edge * 0.99, mechanism="gdp") < mid
    # ε beyond the solver's range is inf, never a smaller number
    assert epsilon_of([(0.05, 1.0, 10_000)], delta=1e-5, mechanism="gdp") == math.inf


def test_reported_epsilon_never_drops_below_what_was_reported_and_the_floor_resumes():
    tiny = [(10.0, 0.01, 1)]  # ε well below 1
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=10.0, sample_rate=0.01, steps=1)
    exact = epsilon_of(tiny, delta=1e-5, mechanism="rdp")
    assert 0 < exact < 1 and acc.epsilon(1e-5) == exact
    assert acc.state_dict()["epsilon_floor"] == {repr(1e-5): exact}
    # a resumed accountant whose floor is above its history's ε keeps reporting the floor,
    # for the δ it was reported at only
    state = {**acc.state_dict(), "epsilon_floor": {repr(1e-5): 2.5}}
    resumed = PrivacyAccountant("rdp")
    resumed.load_state_dict(json.loads(json.dumps(state)))
    assert resumed.state_dict() == state
    assert resumed.epsilon(1e-5) == 2.5
    assert resumed.epsilon_if(noise_multiplier=10.0, sample_rate=0.01, steps=1, delta=1e-5) == 2.5
    assert resumed.epsilon(1e-6) == epsilon_of(tiny, delta=1e-6, mechanism="rdp")
    assert resumed.epsilon_if(
        noise_multiplier=10.0, sample_rate=0.01, steps=1, delta=1e-6
    ) == epsilon_of([(10.0, 0.01, 2)], delta=1e-6, mechanism="rdp")
    # an infinite ε is reported but never stored: the state stays valid JSON
    acc.step(noise_multiplier=0.0, sample_rate=0.01, steps=1)
    assert math.isinf(acc.epsilon(1e-5))
    assert acc.state_dict()["epsilon_floor"] == {repr(1e-5): exact}
    json.dumps(acc.state_dict(), allow_nan=False)


def test_accountant_state_format_and_refused_states():
    acc = PrivacyAccountant("prv", level="user")
    acc.step(noise_multiplier=1.2, sample_rate=0.1, steps=3)
    acc.epsilon(1e-5)
    state = acc.state_dict()
    assert state == {
        "version": 1,
        "mechanism": "prv",
        "level": "user",
        "history": [[1.2, 0.1, 3]],
        "epsilon_floor": {repr(1e-5): acc.epsilon(1e-5)},
    }
    minimal = {"version": 1, "mechanism": "prv", "level": "user"}
    empty = PrivacyAccountant("prv", level="user")
    empty.load_state_dict(minimal)
    assert empty.history == [] and empty.state_dict()["epsilon_floor"] == {}
    zero = PrivacyAccountant("prv", level="user")
    zero.load_state_dict({**state, "epsilon_floor": {"1e-05": 0, "1e-06": 0.5}})
    assert zero.state_dict()["epsilon_floor"] == {"1e-05": 0.0, "1e-06": 0.5}
    refused = [
        ({**state, "version": 2}, "version 2"),
        ({k: v for k, v in state.items() if k != "version"}, "version None"),
        ({**state, "level": "sample"}, r"\('prv', 'sample'\)"),
        ({**state, "mechanism": "rdp"}, r"\('rdp', 'user'\)"),
        ({**state, "history": [[1.2, 0.1]]}, "history entry"),
        ({**state, "history": [[1.2, 0.1, 3, 4]]}, "history entry"),
        ({**state, "history": [7]}, "history entry"),
        ({**state, "epsilon_floor": {"1e-05": -0.1}}, "epsilon_floor"),
        ({**state, "epsilon_floor": {"1e-05": "1"}}, "epsilon_floor"),
        ({**state, "epsilon_floor": [1.0]}, "epsilon_floor"),
    ]
    for bad, message in refused:
        target = PrivacyAccountant("prv", level="user")
        with pytest.raises(ValueError, match=message):
            target.load_state_dict(bad)
        assert target.history == []  # nothing half-loaded


def test_check_budget_refusals_and_what_the_decision_reports():
    acc = PrivacyAccountant("rdp", level="user")
    acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=250)
    now = acc.epsilon(1e-5)
    for budget in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match="^epsilon_budget = "):
            check_budget(
                acc,
                noise_multiplier=1.5,
                sample_rate=0.04,
                steps=1,
                epsilon_budget=budget,
                delta=1e-5,
            )
    with pytest.raises(ValueError, match="'gdp' cannot be used for refusing rounds"):
        check_budget(
            PrivacyAccountant("gdp"),
            noise_multiplier=1.5,
            sample_rate=0.04,
            steps=1,
            epsilon_budget=1.0,
            delta=1e-5,
        )
    kw = dict(noise_multiplier=1.5, sample_rate=0.04, steps=2000, delta=1e-5)
    yes = check_budget(acc, epsilon_budget=9, **kw)
    assert (yes.allowed, yes.epsilon_now, yes.epsilon_budget, yes.delta, yes.level) == (
        True,
        now,
        9.0,
        1e-5,
        "user",
    )
    assert yes.epsilon_after == pytest.approx(RDP_2250, rel=1e-6)
    assert isinstance(yes.epsilon_budget, float)
    assert f"{now:.4f} -> {yes.epsilon_after:.4f}" in yes.message and "refused" not in yes.message
    no = check_budget(acc, epsilon_budget=7, **kw)
    assert not no.allowed and no.epsilon_after == yes.epsilon_after
    for part in (
        "2000 more steps",
        "sigma=1.5",
        "q=0.04",
        "user-level",
        f"{now:.4f}",
        "budget 7 ",
        "delta=1e-05",
    ):
        assert part in no.message, part
    err = BudgetExceededError(no)
    assert err.decision is no and str(err) == no.message
    assert acc.steps == 250  # deciding records nothing


# -- planner boundaries ----------------------------------------------------------------------
def test_planner_arguments_are_checked_at_their_boundaries():
    assert sample_rate_for(1, 1) == 1.0 and sample_rate_for(3, 1) == 1 / 3
    for n, b in ((0, 1), (1, 0), (-5, 3)):
        with pytest.raises(ValueError, match=f"num_examples = {n}, batch_size = {b}"):
            sample_rate_for(n, b)
    ok = dict(epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp")
    sigma = calibrate_noise(**{**ok, "sample_rate": 1.0, "steps": 1})
    assert epsilon_of([(sigma, 1.0, 1)], delta=1e-5, mechanism="rdp") <= 2.0
    for change, key in (
        ({"epsilon": 0.0}, "epsilon = 0.0"),
        ({"delta": 1.0}, r"^epsilon = 2\.0 must be > 0 and delta = 1\.0 in \(0, 1\)$"),
        ({"delta": 0.0}, "delta = 0.0"),
        ({"sample_rate": 0.0}, "sample_rate = 0.0"),
        ({"sample_rate": 1.5}, "sample_rate = 1.5"),
        ({"steps": 0}, "steps = 0"),
        ({"accountant": "gdp"}, "'gdp' cannot be used for calibrating noise"),
    ):
        with pytest.raises(ValueError, match=key):
            calibrate_noise(**{**ok, **change})
    for rounds, per_round in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match=f"rounds = {rounds}, steps_per_round = {per_round}"):
            plan(
                epsilon=2.0,
                delta=1e-5,
                sample_rate=0.1,
                steps_per_round=per_round,
                rounds=rounds,
                accountant="rdp",
            )
    for m in (0, 11):
        with pytest.raises(ValueError, match=f"clients_per_round = {m} must be in 1..num_clients"):
            plan_user_level(
                epsilon=2.0,
                delta=1e-5,
                clients_per_round=m,
                num_clients=10,
                rounds=2,
                accountant="rdp",
            )


def test_calibrate_noise_never_hands_out_a_sigma_over_the_target(monkeypatch):
    """Opacus' search stopping on the wrong side is corrected upwards, or refused."""
    from fedft.privacy import planner

    kw = dict(epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=50, accountant="rdp")
    right = calibrate_noise(**kw)
    low = 0.97 * right
    assert epsilon_of([(low, 0.1, 50)], delta=1e-5, mechanism="rdp") > 2.0
    monkeypatch.setattr(planner, "get_noise_multiplier", lambda **_: low)
    fixed = calibrate_noise(**kw)
    assert epsilon_of([(fixed, 0.1, 50)], delta=1e-5, mechanism="rdp") <= 2.0
    assert low < fixed <= low * 1.01**4  # raised in 1 % steps, no further than needed
    assert epsilon_of([(fixed / 1.01, 0.1, 50)], delta=1e-5, mechanism="rdp") > 2.0
    monkeypatch.setattr(planner, "get_noise_multiplier", lambda **_: 0.3 * right)
    with pytest.raises(
        ValueError, match="could not calibrate a noise multiplier for epsilon = 2.0"
    ):
        calibrate_noise(**kw)
    seen = {}
    monkeypatch.setattr(planner, "get_noise_multiplier", lambda **k: seen.update(k) or right)
    calibrate_noise(**kw)
    assert seen == dict(
        target_epsilon=2.0,
        target_delta=1e-5,
        sample_rate=0.1,
        steps=50,
        accountant="rdp",
        epsilon_tolerance=0.01,
    )


def test_long_plans_show_at_most_fifty_rounds_ending_with_the_last():
    p = plan(
        epsilon=4.0,
        delta=1e-5,
        sample_rate=0.01,
        steps_per_round=2,
        rounds=120,
        accountant="rdp",
        alternatives=(0.25, 1.0, 3.0),
    )
    rounds = [r for r, _ in p.epsilon_by_round]
    assert rounds == sorted({max(1, round(120 * i / 50)) for i in range(1, 51)})
    assert rounds[-1] == 120 and len(rounds) == 50
    for r, eps in p.epsilon_by_round:
        assert eps == epsilon_of([(p.noise_multiplier, 0.01, 2 * r)], delta=1e-5, mechanism="rdp")
    assert p.epsilon == p.epsilon_by_round[-1][1] <= 4.0
    assert [r for r, _ in p.alternatives] == [30, 360]  # 1.0 x rounds is the plan itself
    assert (
        p.epsilon_target,
        p.delta,
        p.accountant,
        p.sample_rate,
        p.steps_per_round,
        p.rounds,
    ) == (4.0, 1e-5, "rdp", 0.01, 2, 120)
    text = format_plan(p)
    rows = [line.split() for line in text.splitlines()]
    for r, eps in p.epsilon_by_round:
        assert [str(r), str(2 * r), f"{eps:.4f}"] in rows
    for r, eps in p.alternatives:
        assert [str(r), f"{eps:.4f}"] in rows
    assert f"{p.epsilon:.4f}" in text and "0.01 " in text and "eps = 4 at delta = 1e-05" in text
    short = plan(
        epsilon=4.0,
        delta=1e-5,
        sample_rate=0.01,
        steps_per_round=2,
        rounds=3,
        accountant="rdp",
        alternatives=(),
    )
    assert [r for r, _ in short.epsilon_by_round] == [1, 2, 3] and short.alternatives == ()
    assert "other round counts" not in format_plan(short)


def test_user_level_plan_notes_say_when_delta_or_noise_is_too_large():
    kw = dict(clients_per_round=2, num_clients=4, rounds=3, accountant="rdp")
    loose = plan_user_level(epsilon=2.0, delta=0.25, **kw)  # δ exactly 1/N: flagged
    assert loose.sample_rate == 0.5 and loose.level == "user" and loose.steps_per_round == 1
    assert loose.epsilon <= 2.0 and [r for r, _ in loose.alternatives] == [2, 6]
    assert "delta = 0.25 is not below 1/num_clients = 0.25" in loose.notes[0]
    assert "q = 0.5" in loose.notes[1] and "2 clients per round" in loose.notes[1]
    assert f"sigma*C/m = {loose.noise_multiplier / 2:.3g} x C" in loose.notes[2]
    text = format_plan(loose)
    assert all(f"note: {n}" in text for n in loose.notes)
    noisy = plan_user_level(epsilon=1.0, delta=1e-5, **kw)
    assert noisy.noise_multiplier > 2 and len(noisy.notes) == 2
    assert noisy.notes[1] == (
        f"noise std on the averaged update = sigma*C/m = {noisy.noise_multiplier / 2:.3g} x C "
        "(larger than any single clipped update: needs more clients)"
    )
    many = plan_user_level(
        epsilon=8.0,
        delta=1e-5,
        clients_per_round=1000,
        num_clients=1000,
        rounds=2,
        accountant="rdp",
    )
    assert many.sample_rate == 1.0 and len(many.notes) == 2
    assert not any("needs more clients" in n for n in many.notes)


def test_plans_use_the_tightest_sound_accountant_by_default():
    """Without an accountant, plans are PRV's (Opacus' default and the tightest sound one)."""
    kw = dict(epsilon=3.0, delta=1e-5, rounds=1, alternatives=())
    sample = plan(sample_rate=0.1, steps_per_round=10, **kw)
    user = plan_user_level(clients_per_round=5, num_clients=50, **kw)
    assert sample.accountant == user.accountant == "prv"
    assert sample.noise_multiplier == calibrate_noise(  # calibrate_noise's own default
        epsilon=3.0, delta=1e-5, sample_rate=0.1, steps=10
    )
    assert sample.epsilon == epsilon_of(
        [(sample.noise_multiplier, 0.1, 10)], delta=1e-5, mechanism="prv"
    )
    assert PrivacyAccountant().mechanism == "prv"


def test_resumed_central_dp_around_fedsb_keeps_the_reference_middle_matrix():
    """Fed-SB trains R only: a resumed wrapper must start from the saved reference R."""

    def build():
        inner, ref = make_inner("fedsb")
        dp = CentralDP(
            inner, clip_norm=1.0, noise_multiplier=0.5, expected_clients=2, num_clients=20,
            seed=5, accountant="rdp",
        )  # fmt: skip
        dp.set_reference(ref)
        return dp, ref

    a, ref = build()
    r1 = a.aggregate([client_update(ref, "r", f"c{k}", 0.05, seed=k) for k in range(2)])
    saved = a.state_dict()
    assert all(saved["reference"][m]["r"] is not None for m in SHAPES)
    ups2 = [client_update(r1.adapters, "r", f"c{k}", 0.05, seed=10 + k) for k in range(2)]
    r2 = a.aggregate(ups2)
    b, _ = build()
    b.load_state_dict(saved)
    for mod in SHAPES:
        assert torch.equal(b.state_dict()["reference"][mod]["r"], saved["reference"][mod]["r"])
    r2b = b.aggregate(ups2)
    for mod in SHAPES:
        assert torch.equal(r2.adapters[mod].r, r2b.adapters[mod].r)


def test_central_dp_noise_is_fresh_every_round_and_depends_on_the_seed():
    """Equal noise in two rounds would cancel in their difference: each round draws anew."""

    def build(seed):
        inner, ref = make_inner("fedit")
        dp = CentralDP(
            inner, clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, num_clients=20,
            seed=seed, accountant="rdp", delta=1e-5,
        )  # fmt: skip
        head = torch.zeros(2, 16)
        dp.set_reference(ref, extras={"head": head})
        return dp, ref, head

    dp, ref, head = build(7)
    steps = []
    for rnd in range(3):
        ups = [client_update(ref, "ab", f"c{k}", 0.01, seed=k, head=head) for k in range(2)]
        out = dp.aggregate(ups)
        assert out.metrics["clients"] == 2.0
        assert dp.state_dict()["round"] == rnd + 1
        ref_extras = dp.state_dict()["reference_extras"]
        assert torch.equal(ref_extras["head"], out.extras["head"])  # next round's reference
        steps.append(
            flat_trainable(out.adapters, out.extras, "ab")
            - flat_trainable(ref, {"head": head}, "ab")
        )
        ref, head = out.adapters, out.extras["head"]
    assert dp.accountant.history == [(1.0, 0.1, 3)]
    # same clients, same moves: the rounds differ only by their noise, which must differ
    assert not torch.allclose(steps[0], steps[1]) and not torch.allclose(steps[1], steps[2])
    other, ref2, head2 = build(8)
    ups = [client_update(ref2, "ab", f"c{k}", 0.01, seed=k, head=head2) for k in range(2)]
    again, _, _ = build(7)
    a = again.aggregate(ups)
    b = other.aggregate(ups)
    assert not torch.equal(a.adapters["layer0.q"].b, b.adapters["layer0.q"].b)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_is_never_negative_even_at_a_large_delta(mechanism: str) -> None:
    # both conversions go below 0 at delta = 0.5 (rdp -0.53, prv -0.68 for this history)
    history = [(1.0, 0.1, 10)]
    assert epsilon_of(history, delta=0.5, mechanism=mechanism) == 0.0
    assert epsilon_of(history, delta=1e-5, mechanism=mechanism) > 0.0


def test_server_ledger_reports_the_largest_epsilon_and_resumes_from_json():
    """The server's mirror of per-client ε: what metrics.jsonl shows and what a resume keeps."""
    from types import SimpleNamespace

    from fedft.privacy.ledger import EPSILON_COVERS, PrivacyLedger

    ledger = PrivacyLedger()
    assert ledger.epsilon() is None and ledger.record() == {}  # no report yet: no ε
    assert ledger.able([2, 0, 1]) == [2, 0, 1]
    ledger.update(
        SimpleNamespace(epsilon={2: 1.25, 0: 0.5}, accountants={0: "s0", 2: "s2"}, refused=[])
    )
    # a later report replaces the earlier one; refusing clients are out of the sampling
    ledger.update(SimpleNamespace(epsilon={0: 0.75}, accountants={0: "s0'"}, refused=[5, 1]))
    assert ledger.epsilon() == 1.25  # the largest any client spent, not the last reported
    assert ledger.able([0, 1, 2, 5, 7]) == [0, 2, 7]
    record = ledger.record()
    assert record == {
        "epsilon_level": "sample",
        "epsilon_covers": EPSILON_COVERS,
        "epsilon_clients": {"0": 0.75, "2": 1.25},
    }
    assert EPSILON_COVERS == "release" and list(record["epsilon_clients"]) == ["0", "2"]
    state = json.loads(json.dumps(ledger.state_dict()))  # a checkpoint is plain JSON
    assert state == {
        "accountants": {"0": "s0'", "2": "s2"},
        "exhausted": [1, 5],
        "spent": {"0": 0.75, "2": 1.25},
    }
    resumed = PrivacyLedger()
    resumed.load_state_dict(state)
    assert resumed == ledger  # int client keys again: the next round's updates replace them
    resumed.update(SimpleNamespace(epsilon={2: 1.5}, accountants={}, refused=[]))
    assert resumed.spent == {0: 0.75, 2: 1.5} and resumed.epsilon() == 1.5
    # a checkpoint written before the ledger existed restores an empty ledger
    old = PrivacyLedger(accountants={3: "x"}, spent={3: 1.0}, exhausted={3})
    old.load_state_dict({})
    assert old == PrivacyLedger()


def test_central_dp_refusals_name_the_client_and_what_differs():
    """What an operator reads when a client's reply cannot be measured against the reference."""
    from fedft.aggregation.wrapper import MissingReferenceError

    inner, ref = make_inner("ffa")  # trains B only; A is frozen and shared
    dp = CentralDP(
        inner, clip_norm=1.0, noise_multiplier=0.0, expected_clients=2, num_clients=4, seed=0
    )
    good = client_update(ref, "b", "c0", 0.1)
    with pytest.raises(
        MissingReferenceError,
        match=r"^central_dp measures updates against what clients started from: call "
        r"set_reference\(global_adapters, extras=\.\.\.\) before aggregate$",
    ):
        dp.aggregate([good])
    dp.set_reference({})  # a reference without adapters cannot measure an update either
    with pytest.raises(
        MissingReferenceError,
        match=r"^CentralDP needs the adapters clients started from: call init_global or "
        r"set_reference\(global_adapters, extras=\.\.\.\) before aggregate$",
    ):
        dp.aggregate([good])
    dp.set_reference(ref)
    with pytest.raises(
        ValueError, match=r"^central_dp: a client replies more than once: \['c0', 'c0', 'c1'\]$"
    ):
        dp.aggregate([good, client_update(ref, "b", "c1", 0.1), good])
    mod = "layer0.q"

    def changed(**fields):
        f = good.adapters[mod]
        adapters = {
            **good.adapters,
            mod: LoraFactors(**{"a": f.a, "b": f.b, "scaling": f.scaling, "r": f.r, **fields}),
        }
        return ClientUpdate("c7", adapters, 10)

    fewer = ClientUpdate("c7", {m: f for m, f in good.adapters.items() if m != mod}, 10)
    refusals = [
        (
            fewer,
            r"^client 'c7' adapts \['layer0\.v', 'layer1\.q', 'layer1\.v'\], the reference has "
            r"\['layer0\.q', 'layer0\.v', 'layer1\.q', 'layer1\.v'\]$",
        ),
        (
            ClientUpdate("c7", good.adapters, 10, extras={"head": torch.zeros(2, 16)}),
            r"^client 'c7' sends extras \['head'\]; the reference has \[\]: pass extras= to "
            r"set_reference$",
        ),
        (changed(scaling=SCALING * 2), r"^client 'c7': module 'layer0\.q' scaling differs$"),
        (
            changed(b=torch.zeros(65, RANK)),
            r"^client 'c7': module 'layer0\.q' field 'b' does not match the reference's shape$",
        ),
        (
            changed(r=torch.eye(RANK)),
            r"^client 'c7': module 'layer0\.q' field 'r' does not match the reference's shape$",
        ),
        (
            changed(a=ref[mod].a + 1e-3),
            r"^client 'c7' changed the frozen 'a' of module 'layer0\.q'; ffa trains only "
            r"\('b',\)$",
        ),
    ]
    before = dp.state_dict()
    for update, message in refusals:
        with pytest.raises(ValueError, match=message):
            dp.aggregate([update])
    assert dp.accountant.steps == 0 and dp.state_dict()["round"] == before["round"]
    # the frozen A sent back in another dtype with the same values is not a change
    wider = changed(a=ref[mod].a.to(torch.float64))
    dp.aggregate([wider])
    assert dp.accountant.steps == 1
    # extras of another shape than the reference's
    head = torch.zeros(2, 16)
    dp.set_reference(ref, extras={"head": head})
    wide = ClientUpdate("c7", good.adapters, 10, extras={"head": torch.zeros(3, 16)})
    with pytest.raises(ValueError, match=r"^client 'c7': extras 'head' shape differs$"):
        dp.aggregate([wide])


def test_whoever_knows_the_seed_removes_the_noise_and_no_seed_draws_it_fresh():
    """Why deployment runs with seed None: a known seed lets anyone subtract the noise."""
    from fedft.privacy.central import privatise_sum

    clipped = torch.linspace(-1.0, 1.0, 2000, dtype=torch.float64)  # Σ_k Δ̂_k
    sigma, c, m = 3.0, 0.5, 4
    out = privatise_sum(clipped, noise_multiplier=sigma, clip_norm=c, denominator=m, seed=1234)
    assert out.dtype == torch.float64
    # the attacker redraws the mechanism's noise (a float64 standard normal from the seed)
    z = torch.randn(2000, generator=torch.Generator().manual_seed(1234), dtype=torch.float64)
    torch.testing.assert_close(out * m - sigma * c * z, clipped, rtol=0, atol=1e-12)
    assert float((out * m - clipped).std()) == pytest.approx(sigma * c, rel=0.05)
    # without a seed every release draws fresh noise of the same size
    a, b = (
        privatise_sum(clipped, noise_multiplier=sigma, clip_norm=c, denominator=m, seed=None)
        for _ in range(2)
    )
    assert not torch.equal(a, b)
    assert float((a * m - clipped).std()) == pytest.approx(sigma * c, rel=0.05)
    # σ = 0 (tests only): the mean of the clipped sum, exactly
    assert torch.equal(
        privatise_sum(clipped, noise_multiplier=0.0, clip_norm=c, denominator=m, seed=None),
        clipped / m,
    )


def test_a_user_round_over_the_budget_is_logged_with_its_reason(caplog):
    import logging

    inner, ref = make_inner("fedit")
    dp = CentralDP(
        inner, clip_norm=1.0, noise_multiplier=0.5, expected_clients=2, num_clients=4, seed=0,
        accountant="rdp", epsilon_budget=0.1, delta=1e-5,
    )  # fmt: skip
    dp.set_reference(ref)
    with (
        caplog.at_level(logging.WARNING, logger="fedft.privacy.central"),
        pytest.raises(BudgetExceededError) as err,
    ):
        dp.aggregate([client_update(ref, "ab", "c0", 0.01)])
    message = err.value.decision.message
    assert "0.1" in message and dp.accountant.steps == 0
    assert [r.getMessage() for r in caplog.records if r.name == "fedft.privacy.central"] == [
        message
    ]


def test_central_dp_settings_are_checked_at_their_boundaries_and_named():
    def build(**kw):
        args = dict(
            clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, num_clients=4, seed=0
        )  # fmt: skip
        return CentralDP(make_inner("fedit")[0], **{**args, **kw})

    for kw, message in (
        ({"clip_norm": 0.0}, r"^clip_norm = 0\.0 must be > 0 and noise_multiplier = 1\.0 >= 0$"),
        (
            {"noise_multiplier": -0.5},
            r"^clip_norm = 1\.0 must be > 0 and noise_multiplier = -0\.5 >= 0$",
        ),
        ({"clip_norm": math.nan}, r"^clip_norm = nan must be > 0"),
        ({"expected_clients": 0}, r"^expected_clients = 0 must be in 1\.\.num_clients \(4\)$"),
        ({"expected_clients": 5}, r"^expected_clients = 5 must be in 1\.\.num_clients \(4\)$"),
        ({"epsilon_budget": 3.0}, r"^epsilon_budget needs delta$"),
        (
            {"clip_norm": math.inf},
            r"^an infinite clip_norm bounds nothing: noise std sigma\*C is inf$",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            build(**kw)
    # the edges that are allowed: σ = 0 (tests), m = 1, m = N (q = 1), C = inf without noise
    assert build(noise_multiplier=0.0).noise_multiplier == 0.0
    one, every = build(expected_clients=1), build(expected_clients=4)
    assert (one.sample_rate, every.sample_rate) == (0.25, 1.0)
    assert build(clip_norm=math.inf, noise_multiplier=0.0).clip_norm == math.inf
    dp = build(accountant="rdp", epsilon_budget=3.0, delta=1e-5, expected_clients=3, num_clients=7)
    assert (dp.expected_clients, dp.num_clients, dp.sample_rate) == (3, 7, 3 / 7)
    assert (dp.accountant.mechanism, dp.accountant.level) == ("rdp", "user")
    assert (dp.epsilon_budget, dp.delta, dp.epsilon(1e-5)) == (3.0, 1e-5, 0.0)
    assert build().accountant.mechanism == "prv"  # the tightest sound analysis by default
    assert build().budget_decision() is None  # no budget, nothing to refuse


def test_central_dp_round_one_starts_from_the_inner_init_and_measures_against_it():
    """init_global hands out the inner aggregator's init and keeps it as the reference."""
    dp = CentralDP(
        get_aggregator("fedit"), clip_norm=1.0, noise_multiplier=0.0, expected_clients=1,
        num_clients=3, seed=0,
    )  # fmt: skip
    init = dp.init_global(
        SHAPES, rank=RANK, scaling=SCALING, generator=torch.Generator().manual_seed(4)
    )
    want = get_aggregator("fedit").init_global(
        SHAPES, rank=RANK, scaling=SCALING, generator=torch.Generator().manual_seed(4)
    )
    assert set(init) == set(SHAPES)
    for mod, f in init.items():
        assert f.a.shape == (RANK, SHAPES[mod][1]) and f.scaling == SCALING
        assert torch.equal(f.a, want[mod].a) and torch.equal(f.b, want[mod].b)
        saved = dp.state_dict()["reference"][mod]
        assert torch.equal(saved["a"], f.a) and torch.equal(saved["b"], f.b)
    assert dp.state_dict()["reference_extras"] == {}
    # no set_reference needed: a client's move is measured from the init (C = 1, m = 1)
    up = client_update(init, "ab", "c0", 0.001, seed=2)
    out = dp.aggregate([up])
    moved = flat_trainable(out.adapters, {}, "ab") - flat_trainable(init, {}, "ab")
    own = flat_trainable(up.adapters, {}, "ab") - flat_trainable(init, {}, "ab")
    torch.testing.assert_close(moved, own)


def test_the_printed_plan_shows_every_figure_with_its_unit():
    """What `fedft privacy plan` prints, line for line, for a user- and a sample-level plan."""
    from fedft.privacy.planner import PrivacyPlan

    user = PrivacyPlan(
        level="user", epsilon_target=3.0, delta=1e-5, accountant="prv", sample_rate=0.1,
        steps_per_round=1, rounds=2, noise_multiplier=1.23456,
        epsilon_by_round=((1, 0.5), (2, math.inf)), alternatives=((1, 0.5), (4, 2.25)),
        notes=("first", "second"),
    )  # fmt: skip
    assert format_plan(user).split("\n") == [
        "Privacy plan, user-level (one unit = one client), accountant prv",
        "  target            eps = 3 at delta = 1e-05",
        "  sample rate q     0.1  (clients/round / clients)",
        "  steps per round   1",
        "  rounds            2",
        "  noise multiplier  sigma = 1.2346  (noise std = sigma x clip norm)",
        "  eps after run     inf",
        "",
        "    round      steps     epsilon",
        "        1          1      0.5000",
        "        2          2         inf",
        "",
        "  same sigma, other round counts:",
        "   rounds     epsilon",
        "        1      0.5000",
        "        4      2.2500",
        "",
        "  note: first",
        "  note: second",
    ]
    sample = PrivacyPlan(
        level="sample", epsilon_target=8.0, delta=1e-6, accountant="rdp", sample_rate=1 / 48,
        steps_per_round=20, rounds=3, noise_multiplier=0.9,
        epsilon_by_round=((1, 1.0), (2, 1.5), (3, 2.0)), alternatives=(),
    )  # fmt: skip
    assert format_plan(sample).split("\n") == [
        "Privacy plan, sample-level, accountant rdp",
        "  target            eps = 8 at delta = 1e-06",
        "  sample rate q     0.0208333  (batch / examples)",
        "  steps per round   20",
        "  rounds            3",
        "  noise multiplier  sigma = 0.9000  (noise std = sigma x clip norm)",
        "  eps after run     2.0000",
        "",
        "    round      steps     epsilon",
        "        1         20      1.0000",
        "        2         40      1.5000",
        "        3         60      2.0000",
    ]


def test_a_budget_below_one_is_a_budget_and_the_decision_says_what_is_left():
    acc = PrivacyAccountant("rdp")
    kw = dict(noise_multiplier=4.0, sample_rate=0.01, steps=10, delta=1e-5)
    yes = check_budget(acc, epsilon_budget=0.5, **kw)
    after = epsilon_of([(4.0, 0.01, 10)], delta=1e-5, mechanism="rdp")
    assert 0 < after < 0.5 and yes.allowed and yes.epsilon_after == after
    assert yes.message == f"sample-level eps 0.0000 -> {after:.4f} of budget 0.5 at delta=1e-05"
    no = check_budget(acc, epsilon_budget=after / 2, **kw)
    assert not no.allowed
    assert no.message == (
        f"refused: 10 more steps at sigma=4, q=0.01 would take sample-level eps from 0.0000 "
        f"to {after:.4f}, over the budget {after / 2:g} at delta=1e-05"
    )


def test_a_user_plans_notes_and_log_line_in_full(caplog):
    """The notes `fedft privacy plan --level user` prints, and the line the run's log keeps."""
    import logging

    with caplog.at_level(logging.INFO, logger="fedft.privacy.planner"):
        p = plan_user_level(
            epsilon=2.0, delta=0.25, clients_per_round=2, num_clients=4, rounds=1,
            accountant="rdp", alternatives=(0.1, 3.0),
        )  # fmt: skip
    rel = p.noise_multiplier / 2
    assert p.notes == (
        "delta = 0.25 is not below 1/num_clients = 0.25",
        "cohort: each client joins a round independently with probability q = 0.5 (secret, "
        "from the OS), 2 clients per round on average",
        f"noise std on the averaged update = sigma*C/m = {rel:.3g} x C",  # σ/m < 1: no warning
    )
    assert rel < 1
    assert [r for r, _ in p.alternatives] == [3]  # 0.1 x 1 round rounds up to the plan itself
    assert [r.getMessage() for r in caplog.records] == [
        f"privacy plan (user level): sigma={p.noise_multiplier:.4f} for eps=2.000"
    ]


def test_a_plan_curve_starts_at_round_one_and_ends_at_the_last():
    kw = dict(epsilon=4.0, delta=1e-5, sample_rate=0.01, steps_per_round=1, accountant="rdp")
    sixty = plan(rounds=60, alternatives=(), **kw)
    rounds = [r for r, _ in sixty.epsilon_by_round]
    assert rounds[:3] == [1, 2, 4] and rounds[-1] == 60 and len(rounds) == 50
    assert sixty.notes == ()  # a sample-level plan has no notes
    fifty = plan(rounds=50, alternatives=(), **kw)
    assert [r for r, _ in fifty.epsilon_by_round] == list(range(1, 51))
    eps = [e for _, e in fifty.epsilon_by_round]
    assert eps[0] == epsilon_of([(fifty.noise_multiplier, 0.01, 1)], delta=1e-5, mechanism="rdp")
    assert all(a < b for a, b in zip(eps, eps[1:]))


def test_gdp_refuses_a_history_it_cannot_account_instead_of_dropping_runs():
    """GDP composes one (σ, q) pair: a second pair is refused, never left out of ε."""
    two = [(1.0, 0.01, 100), (2.0, 0.01, 5)]
    with pytest.raises(
        ValueError,
        match=r"^the GDP accountant supports one \(noise_multiplier, sample_rate\) pair only; "
        r"this history has 2: use accountant 'prv' or 'rdp'$",
    ):
        epsilon_of(two, delta=1e-5, mechanism="gdp")
    acc = PrivacyAccountant("gdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    acc.step(noise_multiplier=1.0, sample_rate=0.01, steps=20)  # the same pair: merged
    assert acc.epsilon(1e-5) == epsilon_of([(1.0, 0.01, 120)], delta=1e-5, mechanism="gdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.02, steps=1)
    with pytest.raises(ValueError, match="this history has 2"):
        acc.epsilon(1e-5)
    # a run of zero steps is not a pair
    assert epsilon_of([*two[:1], (3.0, 0.5, 0)], delta=1e-5, mechanism="gdp") == epsilon_of(
        two[:1], delta=1e-5, mechanism="gdp"
    )


def test_one_step_by_default_and_one_client_per_round_is_a_plan():
    acc = PrivacyAccountant("rdp")
    acc.step(noise_multiplier=1.0, sample_rate=0.1)
    assert acc.history == [(1.0, 0.1, 1)] and acc.steps == 1
    one = plan_user_level(
        epsilon=8.0, delta=1e-5, clients_per_round=1, num_clients=4, rounds=1,
        accountant="rdp", alternatives=(),
    )  # fmt: skip
    assert one.sample_rate == 0.25 and one.epsilon <= 8.0
    # noise std on the mean just above C (σ/m ≈ 1.02): already more than one clipped update
    close = plan_user_level(
        epsilon=1.5, delta=1e-5, clients_per_round=2, num_clients=4, rounds=1,
        accountant="rdp", alternatives=(),
    )  # fmt: skip
    assert 1 < close.noise_multiplier / 2 < 1.1
    assert close.notes[-1].endswith(
        " x C (larger than any single clipped update: needs more clients)"
    )


def test_a_plan_curve_never_drops_even_where_the_estimate_does(monkeypatch):
    """PRV is a numerical estimate: a dip between rounds is shown as the ε already reached."""
    from fedft.privacy import planner

    estimate = {1: 0.5, 2: 0.4, 3: 0.9, 6: 1.7}  # ε after k steps, with a dip at 2
    monkeypatch.setattr(planner, "get_noise_multiplier", lambda **_: 1.0)
    monkeypatch.setattr(planner, "epsilon_of", lambda history, **_: estimate[int(history[0][2])])
    p = plan(
        epsilon=1.0, delta=1e-5, sample_rate=0.1, steps_per_round=1, rounds=3,
        accountant="rdp", alternatives=(2.0,),
    )  # fmt: skip
    assert p.epsilon_by_round == ((1, 0.5), (2, 0.5), (3, 0.9))
    assert p.alternatives == ((6, 1.7),)
