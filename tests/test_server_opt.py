"""Server optimizers (FedAvgM / FedAdam / FedYogi) on the aggregate: hand-computed steps,
what they leave alone, where they are refused."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedft import builders
from fedft.aggregation import get_aggregator
from fedft.aggregation.server_opt import ServerOptimizer
from fedft.config import ConfigError, load_config
from fedft.training.coordinator import Coordinator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors


def _one(b: float, a: float = 2.0) -> dict[str, LoraFactors]:
    return {"w": LoraFactors(a=torch.tensor([[a]]), b=torch.tensor([[b]]), scaling=1.0)}


def _agg(b: float, a: float = 2.0) -> AggregationResult:
    return AggregationResult(adapters=_one(b, a))


def test_avgm_hand_computed_two_rounds():
    """x = 1, aggregates 3 then 4 (Δ = 2, then 4 - x1): m1 = 2, x1 = 1 + 0.5·2 = 2;
    Δ2 = 4 - 2 = 2, m2 = 0.9·2 + 2 = 3.8, x2 = 2 + 0.5·3.8 = 3.9 (FFA-style: only B moves)."""
    opt = ServerOptimizer("avgm", "b", lr=0.5, momentum=0.9)
    r1 = opt.step(_one(1.0), {}, _agg(3.0))
    assert float(r1.adapters["w"].b) == pytest.approx(2.0, abs=1e-6)
    assert float(r1.adapters["w"].a) == 2.0  # not trained, not moved
    r2 = opt.step(r1.adapters, {}, _agg(4.0))
    assert float(r2.adapters["w"].b) == pytest.approx(3.9, abs=1e-6)
    assert opt.steps == 2


def test_avgm_without_momentum_at_lr_one_is_plain_averaging():
    opt = ServerOptimizer("avgm", "ab", lr=1.0, momentum=0.0)
    for target in (3.0, -1.0, 0.25):
        out = opt.step(_one(0.5, 1.5), {}, _agg(target, 0.75))
        assert float(out.adapters["w"].b) == pytest.approx(target, abs=1e-7)
        assert float(out.adapters["w"].a) == pytest.approx(0.75, abs=1e-7)


@pytest.mark.parametrize("kind", ["adam", "yogi"])
def test_adaptive_first_and_second_step_hand_computed(kind: str) -> None:
    """x = 0, Δ1 = 1, Δ2 = -0.5 (β1 0.9, β2 0.99, τ 0.01, η 0.1), v starts at τ² = 1e-4.

    Step 1: m = 0.1; adam v = 0.99e-4 + 0.01 = 0.010099; yogi v = 1e-4 + 0.01·sign(1e-4 - 1)
    ·(-1) = 0.0101. Step 2 from x1: m = 0.09 - 0.05 = 0.04; Δ² = 0.25;
    adam v = 0.99 v1 + 0.0025; yogi v = v1 + 0.0025 (v1 < Δ²).
    """
    tau, eta = 0.01, 0.1
    opt = ServerOptimizer(kind, "b", lr=eta, beta1=0.9, beta2=0.99, tau=tau)  # type: ignore[arg-type]
    v1 = 0.99e-4 + 0.01 if kind == "adam" else 1e-4 + 0.01
    x1 = eta * 0.1 / (math.sqrt(v1) + tau)
    r1 = opt.step(_one(0.0), {}, _agg(1.0))
    assert float(r1.adapters["w"].b) == pytest.approx(x1, rel=1e-6)
    v2 = 0.99 * v1 + 0.0025 if kind == "adam" else v1 + 0.0025
    x2 = x1 + eta * 0.04 / (math.sqrt(v2) + tau)
    r2 = opt.step(r1.adapters, {}, _agg(x1 - 0.5))
    assert float(r2.adapters["w"].b) == pytest.approx(x2, rel=1e-6)


def test_fedsb_moves_only_r_and_the_head_moves_too():
    g = torch.Generator().manual_seed(0)
    start = {
        "w": LoraFactors(
            a=torch.randn(2, 5, generator=g),
            b=torch.randn(4, 2, generator=g),
            scaling=2.0,
            r=torch.zeros(2, 2),
        )
    }
    agg = AggregationResult(
        adapters={"w": replace(start["w"], r=torch.ones(2, 2))},
        extras={"head": torch.full((2, 3), 2.0)},
    )
    out = ServerOptimizer("avgm", "r", lr=0.5, momentum=0.0).step(
        start, {"head": torch.zeros(2, 3)}, agg
    )
    assert torch.equal(out.adapters["w"].a, start["w"].a)
    assert torch.equal(out.adapters["w"].b, start["w"].b)
    assert torch.allclose(out.adapters["w"].r, torch.full((2, 2), 0.5))  # type: ignore[arg-type]
    assert torch.allclose(out.extras["head"], torch.ones(2, 3))


def test_bad_settings_and_a_base_delta_are_refused():
    with pytest.raises(ValueError, match="momentum"):
        ServerOptimizer("avgm", "ab", momentum=1.0)
    with pytest.raises(ValueError, match="choose avgm"):
        ServerOptimizer("sgd", "ab")  # type: ignore[arg-type]
    folded = AggregationResult(adapters=_one(1.0), base_delta={"w": torch.ones(1, 1)})
    with pytest.raises(ValueError, match="base delta"):
        ServerOptimizer("adam", "ab").step(_one(0.0), {}, folded)


def _coord(opt: ServerOptimizer | None) -> Coordinator:
    return Coordinator(
        aggregator=get_aggregator("fedit"),
        shapes={"w": (6, 5)},
        rank_of=lambda k: 2,
        alpha=4.0,
        extras={"head": torch.zeros(2, 6)},
        seed=1,
        server_opt=opt,
    )


def _updates(coord: Coordinator, rnd: int) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(rnd)
    ups = []
    for k in range(3):
        s = coord.start_for(k)
        f = s.adapters["w"]
        moved = replace(f, a=f.a + torch.randn(f.a.shape, generator=g), b=f.b + 0.1 * k)
        head = s.extras["head"] + torch.randn(2, 6, generator=g)
        ups.append(ClientUpdate(str(k), {"w": moved}, 5 + k, extras={"head": head}))
    return ups


def test_coordinator_applies_it_and_agg_error_is_the_aggregators():
    plain, fast = _coord(None), _coord(ServerOptimizer("avgm", "ab", lr=2.0, momentum=0.0))
    r_plain = plain.aggregate(_updates(plain, 0))
    r_fast = fast.aggregate(_updates(fast, 0))
    # same round-1 start: the optimizer doubles the step from the same global
    x0 = _coord(None).global_adapters["w"]
    for part in ("a", "b"):
        want = getattr(x0, part) + 2.0 * (getattr(r_plain.adapters["w"], part) - getattr(x0, part))
        assert torch.allclose(getattr(fast.global_adapters["w"], part), want, atol=1e-6)
    assert torch.allclose(fast.extras["head"], 2.0 * plain.extras["head"], atol=1e-6)
    # agg_error measures the aggregator, before the optimizer's deliberate step
    assert r_fast.metrics["error"] == pytest.approx(r_plain.metrics["error"], rel=1e-9)
    assert r_fast.metrics["server_step_norm"] > 0


@pytest.mark.parametrize("algorithm", ["flora", "fedex", "lora_fair", "hetlora"])
def test_config_refuses_it_where_it_is_not_defined(algorithm: str) -> None:
    with pytest.raises(ConfigError, match=f"aggregation.server_opt.*'none' with '{algorithm}'"):
        load_config(None, [f"aggregation.algorithm='{algorithm}'", "aggregation.server_opt='adam'"])
    with pytest.raises(ConfigError, match="split"):
        load_config(None, ["adapter.method='split'", "aggregation.server_opt='avgm'"])


def test_builders_pass_the_configured_optimizer():
    cfg = load_config(
        None,
        [
            "aggregation.algorithm='ffa'",
            "aggregation.server_opt='yogi'",
            "aggregation.server_lr=0.01",
            "aggregation.server_tau=0.001",
        ],
    )
    opt = builders.build_server_opt(cfg, builders.build_aggregator(cfg))
    assert opt is not None and (opt.kind, opt.parts, opt.lr, opt.tau) == ("yogi", "b", 0.01, 1e-3)
    assert builders.build_server_opt(load_config(None, []), get_aggregator("fedit")) is None


def test_every_setting_is_checked_at_its_boundary_and_named():
    for name in ("momentum", "beta1", "beta2"):
        with pytest.raises(ValueError, match=rf"^server optimizer: {name} = 1.0 must be in"):
            ServerOptimizer("adam", "ab", **{name: 1.0})
        ServerOptimizer("adam", "ab", **{name: 0.0})  # the closed end is allowed
    for lr, tau in ((0.0, 1e-3), (-1.0, 1e-3), (math.inf, 1e-3), (1.0, 0.0)):
        with pytest.raises(
            ValueError,
            match=rf"^server optimizer: lr = {lr} and tau = {tau} must be positive$",
        ):
            ServerOptimizer("adam", "ab", lr=lr, tau=tau)


def test_refusals_of_a_step_say_what_to_do():
    folded = AggregationResult(adapters=_one(1.0), base_delta={"w": torch.ones(1, 1)})
    with pytest.raises(
        ValueError,
        match=r"^server optimizer: the aggregate folds a base delta \(flora, fedex\), which has "
        r"no optimizer state; use aggregation.server_opt = 'none'$",
    ):
        ServerOptimizer("adam", "ab").step(_one(0.0), {}, folded)
    two = {**_one(0.0), "v": _one(0.0)["w"]}
    with pytest.raises(
        ValueError,
        match=r"^server optimizer: the aggregate has 2 trained numbers, the global 4; they "
        "must share one layout$",
    ):
        ServerOptimizer("adam", "ab").step(two, {}, _agg(1.0))
    opt = ServerOptimizer("adam", "ab")
    opt.step(_one(0.0), {}, _agg(1.0))
    with pytest.raises(
        ValueError,
        match=r"^server optimizer: its state has 2 numbers, the model 4; it belongs to "
        "another model$",
    ):
        opt.step(two, {}, AggregationResult(adapters=two))


def test_yogi_leaves_v_alone_where_it_equals_the_squared_step():
    """sign(v - Δ²) = 0 when Δ² = v: Yogi's v does not move (v₀ = τ² = 0.25, Δ = 0.5)."""
    opt = ServerOptimizer("yogi", "b", lr=1.0, beta1=0.0, beta2=0.5, tau=0.5)
    out = opt.step(_one(0.0), {}, _agg(0.5))
    assert opt.v is not None and float(opt.v) == 0.25
    assert float(out.adapters["w"].b) == 0.5  # x + m / (sqrt(v) + tau) = 0.5 / 1.0


def test_step_norm_metric_is_how_far_the_server_moved():
    opt = ServerOptimizer("avgm", "ab", lr=0.5, momentum=0.0)
    out = opt.step(_one(3.0, 4.0), {}, _agg(5.0, 8.0))  # moves b by 1 and a by 2
    assert out.metrics["server_step_norm"] == pytest.approx(math.sqrt(5.0), rel=1e-12)


def test_a_checkpoint_with_mismatched_moments_is_refused():
    opt = ServerOptimizer("adam", "ab")
    opt.step(_one(0.0), {}, _agg(1.0))
    good = opt.state_dict()
    for m, v in ((None, good["v"]), (good["m"], None), (good["m"], torch.zeros(3))):
        fresh = ServerOptimizer("adam", "ab")
        with pytest.raises(
            ValueError, match="^server optimizer: checkpointed moments m and v do not match$"
        ):
            fresh.load_state_dict({**good, "m": m, "v": v})
    with pytest.raises(
        ValueError,
        match=r"^server optimizer: the checkpoint has lr = 1.0, the config 0.5; resume with "
        "the checkpoint's setting$",
    ):
        ServerOptimizer("adam", "ab", lr=0.5).load_state_dict(good)


def test_a_checkpoint_that_stepped_but_kept_no_moments_is_refused_on_the_next_step():
    opt = ServerOptimizer("adam", "ab")
    opt.load_state_dict({**opt.state_dict(), "steps": 3})
    with pytest.raises(
        ValueError, match="^server optimizer: its state has 0 numbers, the model 2; it belongs"
    ):
        opt.step(_one(0.0), {}, _agg(1.0))
