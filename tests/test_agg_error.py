"""agg_error: the relative distance of a round's actual update from sum_k p_k s_k B_k A_k.

Hand-computed numbers for the formula, then every aggregator through the real Coordinator
(what the server runs) on heterogeneous clients over two rounds, so the start (the global
adapters before the round) is non-zero in the second.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from fedft.aggregation import get_aggregator
from fedft.aggregation.error import aggregation_error
from fedft.aggregation.robust import make_robust
from fedft.training.coordinator import Coordinator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors


def _lf(a: list[list[float]], b: list[list[float]], s: float) -> LoraFactors:
    return LoraFactors(a=torch.tensor(a), b=torch.tensor(b), scaling=s)


# -- the formula, by hand --------------------------------------------------------------
def test_hand_computed_two_modules_weights_scaling_and_start():
    """FedIT on two clients (p = 1/4, 3/4, s = 2) and two modules, numbers worked by hand.

    Module w (2 x 2): client products 2·[[4],[0]]@[[1, 2]] = [[8, 16], [0, 0]] and
    2·[[0],[8]]@[[3, -2]] = [[0, 0], [48, -32]]; ideal = 1/4·first + 3/4·second =
    [[2, 4], [36, -24]]; FedIT gives 2·[[1],[6]]@[[2.5, -1]] = [[5, -2], [30, -12]]; the
    difference [[3, -6], [-6, 12]] has squared norm 225, the ideal 1892.
    Module v (1 x 1): products 2·1·1 = 2 and 2·(-1)·3 = -6, ideal 1/2 - 9/2 = -4; FedIT
    2·(-0.5)·2.5 = -2.5; squared difference 2.25, ideal 16.
    Both modules start from a global whose product is 0 (B = 0).
    """
    before = {"w": _lf([[1.0, 1.0]], [[0.0], [0.0]], 2.0), "v": _lf([[1.0]], [[0.0]], 2.0)}
    c0 = ClientUpdate(
        "c0", {"w": _lf([[1.0, 2.0]], [[4.0], [0.0]], 2.0), "v": _lf([[1.0]], [[1.0]], 2.0)}, 1
    )
    c1 = ClientUpdate(
        "c1", {"w": _lf([[3.0, -2.0]], [[0.0], [8.0]], 2.0), "v": _lf([[3.0]], [[-1.0]], 2.0)}, 3
    )
    result = get_aggregator("fedit").aggregate([c0, c1])
    got = aggregation_error(before, [c0, c1], [before, before], result)
    assert got == pytest.approx(math.sqrt((225 + 2.25) / (1892 + 16)), rel=1e-12)
    # one module alone: 15 / sqrt(1892)
    only_w = AggregationResult(adapters={"w": result.adapters["w"]})
    ups_w = [ClientUpdate(u.client_id, {"w": u.adapters["w"]}, u.num_examples) for u in (c0, c1)]
    assert aggregation_error(before, ups_w, [before, before], only_w) == pytest.approx(
        15 / math.sqrt(1892), rel=1e-12
    )


def test_the_start_is_subtracted_from_the_ideal_and_the_before_from_the_actual():
    """A round in which every client returns its start unchanged: nothing to aggregate.

    Start B A = [[6]] (s = 1). One client moves B from 2 to 5 (product 15), the other keeps
    it (6): ideal update = 1/2·(15 - 6) + 1/2·0 = 4.5. A server that kept the old global
    received 0: error exactly 1. One that received the ideal: error 0.
    """
    start = {"w": _lf([[3.0]], [[2.0]], 1.0)}
    moved = ClientUpdate("a", {"w": _lf([[3.0]], [[5.0]], 1.0)}, 2)
    kept = ClientUpdate("b", {"w": _lf([[3.0]], [[2.0]], 1.0)}, 2)
    unchanged = AggregationResult(adapters=start)
    assert aggregation_error(start, [moved, kept], [start, start], unchanged) == 1.0
    ideal = AggregationResult(adapters={"w": _lf([[3.0]], [[3.5]], 1.0)})  # 10.5 = 6 + 4.5
    assert aggregation_error(start, [moved, kept], [start, start], ideal) == 0.0
    # nothing changed anywhere: the ratio is undefined, not 0
    assert aggregation_error(start, [kept], [start], unchanged) is None
    assert aggregation_error(start, [], [], unchanged) is None


# -- every aggregator through the Coordinator ---------------------------------------------
SHAPES = {"m0": (12, 10), "m1": (8, 12)}
ALPHA = 16.0


def _coordinator(name: str, ranks: tuple[int, ...], **options: object) -> Coordinator:
    agg = get_aggregator(name, **options)
    if name == "fedsb":
        g = torch.Generator().manual_seed(5)
        grads = {m: torch.randn(*s, generator=g) for m, s in SHAPES.items()}
        agg.initialise_from_gradients(grads, rank=ranks[0], lr=0.1, scaling=ALPHA / ranks[0])
    return Coordinator(
        aggregator=agg,
        shapes=SHAPES,
        rank_of=lambda k: ranks[k % len(ranks)],
        alpha=ALPHA,
        extras={},
        seed=0,
        max_rank=max(ranks),
    )


def _bump(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return t + 0.3 * torch.randn(t.shape, generator=g)


def _round(coord: Coordinator, clients: int, seed: int) -> float:
    """Every client perturbs what it trains (heterogeneously); returns the round's agg_error."""
    g = torch.Generator().manual_seed(seed)
    parts = coord.aggregator.trainable
    ups = []
    for k in range(clients):
        start = coord.start_for(k)
        adapters = {}
        for mod, f in start.adapters.items():
            if parts == "ab":
                f = replace(f, a=_bump(f.a, g), b=_bump(f.b, g))
            elif parts == "b":
                f = replace(f, b=_bump(f.b, g))
            else:
                assert f.r is not None
                f = replace(f, r=_bump(f.r, g))
            adapters[mod] = f
        ups.append(ClientUpdate(str(k), adapters, num_examples=10 + 7 * k))
    result = coord.aggregate(ups)
    return float(result.metrics["error"])


@pytest.mark.parametrize(
    ("name", "ranks"),
    [("flora", (2, 4, 8)), ("ffa", (4,)), ("fedsb", (4,)), ("fedex", (4,))],
)
def test_exact_methods_have_no_aggregation_error(name: str, ranks: tuple[int, ...]) -> None:
    coord = _coordinator(name, ranks)
    for rnd in range(2):  # round 2 starts from a non-zero global (or folded base)
        assert _round(coord, clients=3, seed=rnd) <= 1e-5, (name, rnd)


def test_fedit_errs_and_lora_fair_errs_less_on_the_same_inputs():
    errors = {}
    for name in ("fedit", "lora_fair"):
        coord = _coordinator(name, (4,))
        errors[name] = [_round(coord, clients=4, seed=rnd) for rnd in range(2)]
    assert min(errors["fedit"]) > 0.05, errors
    # round 1: the same inputs (same global init, same client perturbations)
    assert errors["lora_fair"][0] < errors["fedit"][0], errors


def test_hetlora_errs_on_mixed_ranks():
    coord = _coordinator("hetlora", (2, 4, 8))
    assert _round(coord, clients=3, seed=0) > 0.05


def test_robust_wrappers_measure_against_the_ideal_of_what_arrived():
    """A norm bound that clips nothing keeps FFA exact; one that clips, or a median, does not."""
    loose = _coordinator("ffa", (4,))
    loose.aggregator = make_robust("norm_bound", loose.aggregator, bound=1e6)
    assert _round(loose, clients=3, seed=0) <= 1e-5
    tight = _coordinator("ffa", (4,))
    tight.aggregator = make_robust("norm_bound", tight.aggregator, bound=0.05)
    assert _round(tight, clients=3, seed=0) > 0.5
    median = _coordinator("ffa", (4,))
    median.aggregator = make_robust("median", median.aggregator)
    assert _round(median, clients=3, seed=0) > 0.05


def test_old_global_returned_unchanged_has_error_one():
    """The bug agg_error exists to catch: an aggregator that ignores its clients."""
    coord = _coordinator("fedit", (4,))
    _round(coord, clients=3, seed=0)  # a non-zero global
    real = coord.aggregator.aggregate

    def stale(updates: list[ClientUpdate]) -> AggregationResult:
        real(updates)
        return AggregationResult(adapters=dict(coord.global_adapters))

    coord.aggregator.aggregate = stale  # type: ignore[method-assign]
    assert _round(coord, clients=3, seed=1) == pytest.approx(1.0, abs=1e-12)


def test_a_module_the_aggregate_drops_or_invents_counts_in_full():
    """A module every client adapted but the result leaves out is wholly missed (error 1);
    a module no client sent that the result changes is wholly error."""
    c0 = ClientUpdate("c0", {"w": _lf([[1.0, 0.0]], [[3.0], [4.0]], 1.0)}, 1)  # ||B A|| = 5
    dropped = aggregation_error({}, [c0], [{}], AggregationResult(adapters={}))
    assert dropped == 1.0
    # w is off by 2.5 (sent at half its size), z (no client's) by 2.5: sqrt(12.5) / 5
    invented = AggregationResult(
        adapters={"w": _lf([[1.0, 0.0]], [[1.5], [2.0]], 1.0), "z": _lf([[1.0]], [[-2.5]], 1.0)}
    )
    assert aggregation_error({}, [c0], [{}], invented) == pytest.approx(math.sqrt(0.5), rel=1e-12)
    with pytest.raises(ValueError, match="^need one start per update; got 0 for 1$"):
        aggregation_error({}, [c0], [], invented)
