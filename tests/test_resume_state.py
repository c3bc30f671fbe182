"""A resumed Coordinator is the one that was saved: same state, bit-identical next round.

``fedft server --resume`` and ``fedft simulate --resume`` build a fresh Coordinator from the
config, then load the checkpoint into it. Whatever the aggregator carries across rounds (the
user-level DP accountant and reference, HetLoRA's global rank, Fed-SB's frozen factors,
LoRA-FAIR's carried factors, FLoRA's folded base) must come back, or the resumed run silently
diverges (user-level ε restarting at zero is the worst case: it under-reports privacy loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import Tensor

from fedft.aggregation import Aggregator, get_aggregator
from fedft.aggregation.robust import make_robust
from fedft.checkpoint import load_checkpoint, save_checkpoint
from fedft.privacy.accountant import Mechanism
from fedft.privacy.central import CentralDP
from fedft.training.coordinator import Coordinator
from fedft.types import ClientUpdate, LoraFactors

SHAPES = {"l0.q": (6, 5), "l1.v": (4, 7)}
MIXED = [2, 4, 3]


def _central(inner: str, accountant: Mechanism) -> Aggregator:
    return CentralDP(
        get_aggregator(inner),
        accountant=accountant,
        clip_norm=1.5,
        noise_multiplier=0.8,
        expected_clients=3,
        num_clients=10,
        seed=7,
        epsilon_budget=50.0,
        delta=1e-5,
    )


def _fedsb() -> Aggregator:
    agg = get_aggregator("fedsb")
    gen = torch.Generator().manual_seed(11)
    grads = {m: torch.randn(s, generator=gen) for m, s in SHAPES.items()}
    agg.initialise_from_gradients(grads, rank=3, lr=0.1, scaling=8.0 / 3)  # type: ignore[attr-defined]
    return agg


#: name -> (build a fresh aggregator, client rank function, max rank)
CASES: dict[str, tuple[Callable[[], Aggregator], Callable[[int], int], int]] = {
    "central_dp(fedit)": (lambda: _central("fedit", "prv"), lambda i: 3, 0),
    "central_dp(ffa)": (lambda: _central("ffa", "rdp"), lambda i: 3, 0),
    "hetlora": (lambda: get_aggregator("hetlora"), lambda i: MIXED[i % 3], 4),
    "flora": (lambda: get_aggregator("flora"), lambda i: MIXED[i % 3], 4),
    "lora_fair": (lambda: get_aggregator("lora_fair"), lambda i: 3, 0),
    "fedsb": (_fedsb, lambda i: 3, 0),
    "norm_bound(fedit)": (
        lambda: make_robust("norm_bound", get_aggregator("fedit"), bound=0.7),
        lambda i: 3,
        0,
    ),
    "trimmed_mean(ffa)": (
        lambda: make_robust("trimmed_mean", get_aggregator("ffa"), trim_fraction=0.2),
        lambda i: 3,
        0,
    ),
}


def _coordinator(case: str) -> Coordinator:
    build, rank_of, max_rank = CASES[case]
    return Coordinator(
        aggregator=build(),
        shapes=SHAPES,
        rank_of=rank_of,
        alpha=8.0,
        extras={"head": torch.zeros(2, 5)},
        seed=3,
        max_rank=max_rank,
    )


def _trained(coord: Coordinator, client: int, round_: int) -> ClientUpdate:
    """What client ``client`` would send: its start, with what it trains moved by noise."""
    start = coord.start_for(client)
    g = torch.Generator().manual_seed(100 * round_ + client)
    parts = coord.aggregator.trainable

    def moved(x: Tensor) -> Tensor:
        return x + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)

    adapters: dict[str, LoraFactors] = {}
    for mod, f in start.adapters.items():
        if parts == "r":
            assert f.r is not None
            adapters[mod] = replace(f, r=moved(f.r))
        elif parts == "b":
            adapters[mod] = replace(f, b=moved(f.b))
        else:
            adapters[mod] = replace(f, a=moved(f.a), b=moved(f.b))
    extras = {k: moved(v) for k, v in start.extras.items()}
    return ClientUpdate(f"c{client}", adapters, 10 + 7 * client, {"loss": 1.0}, extras)


def _round(coord: Coordinator, round_: int) -> Any:
    return coord.aggregate([_trained(coord, i, round_) for i in range(3)])


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested state as {path: leaf}, tensors kept as tensors."""
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}/{k}"))
        return out
    if isinstance(obj, list | tuple):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flat(v, f"{prefix}/{i}"))
        return out
    return {prefix: obj}


def _assert_same_state(x: Mapping[str, Any], y: Mapping[str, Any]) -> None:
    fx, fy = _flat(x), _flat(y)
    assert set(fx) == set(fy)
    for key in fx:
        a, b = fx[key], fy[key]
        if isinstance(a, Tensor) or isinstance(b, Tensor):
            assert isinstance(a, Tensor) and isinstance(b, Tensor), key
            assert a.dtype == b.dtype and torch.equal(a, b), key
        else:
            assert a == b, key


def _assert_same_result(x: Any, y: Any) -> None:
    _assert_same_state(
        {"adapters": _state_of(x.adapters), "extras": dict(x.extras)},
        {"adapters": _state_of(y.adapters), "extras": dict(y.extras)},
    )
    bx = {k: v.delta() if isinstance(v, LoraFactors) else v for k, v in x.base_delta.items()}
    by = {k: v.delta() if isinstance(v, LoraFactors) else v for k, v in y.base_delta.items()}
    _assert_same_state(bx, by)
    assert x.metrics == y.metrics


def _state_of(adapters: Mapping[str, LoraFactors]) -> dict[str, Any]:
    return {m: {"a": f.a, "b": f.b, "scaling": f.scaling, "r": f.r} for m, f in adapters.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_resumed_coordinator_has_the_saved_state_and_the_same_next_round(case, tmp_path):
    original = _coordinator(case)
    _round(original, 1)
    saved = original.state_dict()
    save_checkpoint(tmp_path / "checkpoint", {"coordinator": saved})

    resumed = _coordinator(case)  # what --resume builds from the config
    resumed.load_state_dict(load_checkpoint(tmp_path / "checkpoint")["coordinator"])

    _assert_same_state(resumed.state_dict(), original.state_dict())
    for i in range(3):  # every client starts round 2 from the same adapters
        _assert_same_state(
            _state_of(resumed.start_for(i).adapters), _state_of(original.start_for(i).adapters)
        )
    _assert_same_result(_round(resumed, 2), _round(original, 2))
    _assert_same_state(resumed.state_dict(), original.state_dict())


@pytest.mark.parametrize("case", ["central_dp(fedit)", "central_dp(ffa)"])
def test_resumed_user_level_accountant_keeps_counting(case, tmp_path):
    """User-level ε after resume covers every round: it never restarts at zero."""
    original = _coordinator(case)
    _round(original, 1)
    save_checkpoint(tmp_path / "ck", {"coordinator": original.state_dict()})
    resumed = _coordinator(case)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck")["coordinator"])
    agg = resumed.aggregator
    assert isinstance(agg, CentralDP)
    assert agg.accountant.history == [(0.8, 0.3, 1)]
    one_round = agg.epsilon(1e-5)
    assert one_round > 0
    result = _round(resumed, 2)
    assert agg.accountant.history == [(0.8, 0.3, 2)]
    assert result.metrics["epsilon_user"] == agg.epsilon(1e-5) > one_round


@pytest.mark.parametrize(("kind", "inner"), [("avgm", "fedit"), ("adam", "ffa"), ("yogi", "fedsb")])
def test_resumed_server_optimizer_continues_exactly(kind, inner, tmp_path):
    """The server optimizer's moments come back: round 3 after a resume equals round 3 of
    the uninterrupted run (a lost momentum would give a different step)."""
    from fedft.aggregation.server_opt import ServerOptimizer

    def build() -> Coordinator:
        agg = _fedsb() if inner == "fedsb" else get_aggregator(inner)
        return Coordinator(
            aggregator=agg,
            shapes=SHAPES,
            rank_of=lambda i: 3,
            alpha=8.0,
            extras={"head": torch.zeros(2, 5)},
            seed=3,
            server_opt=ServerOptimizer(kind, agg.trainable, lr=0.05, momentum=0.8),
        )

    original = build()
    _round(original, 1)
    _round(original, 2)
    assert original.server_opt is not None and original.server_opt.steps == 2
    save_checkpoint(tmp_path / "ck", {"coordinator": original.state_dict()})
    resumed = build()
    resumed.load_state_dict(load_checkpoint(tmp_path / "ck")["coordinator"])
    _assert_same_state(resumed.state_dict(), original.state_dict())
    _assert_same_result(_round(resumed, 3), _round(original, 3))
    _assert_same_state(resumed.state_dict(), original.state_dict())
    # the moments matter: a resume that lost them steps elsewhere
    forgetful = build()
    state = original.state_dict()
    forgetful.load_state_dict({**state, "server_opt": build().server_opt.state_dict()})  # type: ignore[union-attr]
    fresh, kept = _round(forgetful, 4), _round(original, 4)
    assert not torch.allclose(fresh.adapters["l0.q"].delta(), kept.adapters["l0.q"].delta())
    # a checkpoint with an optimizer does not load into a run without one, nor the reverse
    plain = _coordinator("fedsb" if inner == "fedsb" else "lora_fair")
    with pytest.raises(ValueError, match="server_opt"):
        plain.load_state_dict({**state, "aggregator": plain.aggregator.state_dict()})
