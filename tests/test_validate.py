"""Update validation and de-duplication: each bad input is caught, a good one passes."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import pytest
import torch

from fedft.aggregation.validate import dedupe, filter_valid, validate_update
from fedft.types import ClientUpdate, LoraFactors, Parts


def _expected(parts: Parts) -> dict[str, LoraFactors]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for m, (o, i) in {"q": (6, 5), "v": (4, 5)}.items():
        r = torch.randn(3, 3, generator=gen) if parts == "r" else None
        out[m] = LoraFactors(
            a=torch.randn(3, i, generator=gen), b=torch.randn(o, 3, generator=gen), scaling=2.0, r=r
        )
    return out


HEAD = {"head": torch.zeros(2, 4)}


def _good(parts: Parts, cid: str = "c1", step: float = 0.01) -> ClientUpdate:
    exp = _expected(parts)
    adapters = {
        m: LoraFactors(
            a=f.a + step if parts == "ab" else f.a.clone(),
            b=f.b + step if parts in ("ab", "b") else f.b.clone(),
            scaling=f.scaling,
            r=None if f.r is None else f.r + step,
        )
        for m, f in exp.items()
    }
    return ClientUpdate(cid, adapters, 32, extras={"head": HEAD["head"] + step})


def _check(u: ClientUpdate, parts: Parts = "ab", max_norm: float | None = 10.0) -> list[str]:
    return validate_update(
        u, expected=_expected(parts), parts=parts, extras_expected=HEAD, max_norm=max_norm
    )


@pytest.mark.parametrize("parts", ["ab", "b", "r"])
def test_good_update_passes(parts: Parts) -> None:
    assert _check(_good(parts), parts) == []


def _with_module(u: ClientUpdate, name: str, f: LoraFactors) -> ClientUpdate:
    return dataclasses.replace(u, adapters={**u.adapters, name: f})


def _bad_cases() -> dict[str, tuple[Callable[[ClientUpdate], ClientUpdate], str]]:
    def nan(u: ClientUpdate) -> ClientUpdate:
        f = u.adapters["q"]
        a = f.a.clone()
        a[0, 0] = float("nan")
        return _with_module(u, "q", dataclasses.replace(f, a=a))

    def inf_head(u: ClientUpdate) -> ClientUpdate:
        return dataclasses.replace(u, extras={"head": torch.full((2, 4), float("inf"))})

    def rank(u: ClientUpdate) -> ClientUpdate:
        f = u.adapters["v"]
        return _with_module(u, "v", LoraFactors(a=f.a[:2], b=f.b[:, :2], scaling=f.scaling))

    def shape(u: ClientUpdate) -> ClientUpdate:
        f = u.adapters["q"]
        return _with_module(u, "q", LoraFactors(a=f.a[:, :4], b=f.b, scaling=f.scaling))

    def renamed(u: ClientUpdate) -> ClientUpdate:
        adapters = dict(u.adapters)
        adapters["k"] = adapters.pop("v")
        return dataclasses.replace(u, adapters=adapters)

    def missing_extra(u: ClientUpdate) -> ClientUpdate:
        return dataclasses.replace(u, extras={})

    def head_shape(u: ClientUpdate) -> ClientUpdate:
        return dataclasses.replace(u, extras={"head": torch.zeros(3, 4)})

    def huge(u: ClientUpdate) -> ClientUpdate:
        return dataclasses.replace(u, extras={"head": torch.full((2, 4), 100.0)})

    def scaling(u: ClientUpdate) -> ClientUpdate:
        return _with_module(u, "q", dataclasses.replace(u.adapters["q"], scaling=1.0))

    def too_many_examples(u: ClientUpdate) -> ClientUpdate:
        return dataclasses.replace(u, num_examples=10**12)

    return {
        "nan": (nan, "non-finite"),
        "inf": (inf_head, "non-finite"),
        "rank": (rank, "rank 2, expected 3"),
        "shape": (shape, "shape (3, 4), expected (3, 5)"),
        "names": (renamed, "missing ['v'], unexpected ['k']"),
        "missing_extra": (missing_extra, "extras differ: missing ['head']"),
        "head_shape": (head_shape, "extras.head: shape (3, 4)"),
        "norm": (huge, "exceeds the bound"),
        "scaling": (scaling, "scaling 1.0, expected 2.0"),
        "examples": (too_many_examples, "num_examples=1000000000000 outside"),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
def test_each_bad_update_is_caught(case: str) -> None:
    make, message = _bad_cases()[case]
    problems = _check(make(_good("ab")))
    assert problems, case
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("n", [0, -3])
def test_zero_or_negative_examples(n: int) -> None:
    with pytest.raises(ValueError, match="num_examples"):
        ClientUpdate("c", _good("ab").adapters, n)
    # A deserialised object that skipped the constructor check is still refused.
    u = _good("ab")
    object.__setattr__(u, "num_examples", n)
    assert any("num_examples" in p for p in _check(u))


def test_frozen_factors_must_come_back_unchanged() -> None:
    u = _good("b")
    f = u.adapters["q"]
    moved = _with_module(u, "q", dataclasses.replace(f, a=f.a + 1e-3))
    assert any("q.a: the frozen factor was changed" in p for p in _check(moved, "b"))
    u = _good("r")
    f = u.adapters["v"]
    moved = _with_module(u, "v", dataclasses.replace(f, b=f.b * 1.01))
    assert any("v.b: the frozen factor was changed" in p for p in _check(moved, "r"))
    no_r = _with_module(u, "v", LoraFactors(a=f.a, b=f.b, scaling=f.scaling))
    assert any("middle matrix" in p for p in _check(no_r, "r"))


def test_norm_bound_is_on_the_delta() -> None:
    # delta = 0.01 on every trained entry and on the head: a known norm
    u = _good("ab", step=0.01)
    exp = _expected("ab")
    count = sum(f.a.numel() + f.b.numel() for f in exp.values()) + 8
    norm = 0.01 * count**0.5
    assert _check(u, max_norm=norm * 1.001) == []
    assert any("exceeds" in p for p in _check(u, max_norm=norm * 0.999))
    assert _check(u, max_norm=None) == []


def test_filter_valid_splits_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    good1, good2 = _good("ab", "a"), _good("ab", "c")
    bad = _bad_cases()["nan"][0](_good("ab", "b"))
    with caplog.at_level(logging.WARNING, logger="fedft.aggregation.validate"):
        accepted, rejected = filter_valid(
            [good1, bad, good2], expected=_expected("ab"), parts="ab", extras_expected=HEAD
        )
    assert [u.client_id for u in accepted] == ["a", "c"]
    assert [cid for cid, _ in rejected] == ["b"] and "non-finite" in rejected[0][1]
    assert "rejected update from client b" in caplog.text


def test_dedupe_drops_stale_and_counts_replays_once(caplog: pytest.LogCaptureFixture) -> None:
    first, replay = _good("ab", "x", step=0.01), _good("ab", "x", step=0.02)
    other, stale = _good("ab", "y"), _good("ab", "z")
    with caplog.at_level(logging.WARNING, logger="fedft.aggregation.validate"):
        kept = dedupe(
            [(5, first), (4, stale), (5, other), (5, replay), (5, first), (6, stale)],
            current_round=5,
        )
    assert [u.client_id for u in kept] == ["x", "y"]
    assert kept[0] is first  # the first reply wins
    assert "duplicate update from client x" in caplog.text
    assert "client z for round 4" in caplog.text


def _transposed_head(cid: str) -> ClientUpdate:
    """A head with the right element count in the wrong layout: (4, 2) for (2, 4)."""
    return dataclasses.replace(_good("ab", cid), extras={"head": torch.zeros(4, 2)})


def test_transposed_head_is_a_shape_problem_not_a_count_match() -> None:
    problems = _check(_transposed_head("t"))
    assert problems == ["extras.head: shape (4, 2), expected (2, 4)"]


def test_transposed_head_is_rejected_alone_and_the_round_goes_on() -> None:
    accepted, rejected = filter_valid(
        [_good("ab", "a"), _transposed_head("t"), _good("ab", "c")],
        expected=_expected("ab"),
        parts="ab",
        extras_expected=HEAD,
        max_norm=10.0,
    )
    assert [u.client_id for u in accepted] == ["a", "c"]
    assert [cid for cid, _ in rejected] == ["t"] and "extras.head" in rejected[0][1]


def test_an_update_that_breaks_the_checks_is_rejected_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Defence in depth: if a check itself raises on one hostile update (here: a shape
    check weakened to compare element counts, so the norm of (4, 2) - (2, 4) fails), that
    update is rejected with the reason and the others are still aggregated; the server
    never crashes on what one client sent."""
    import math

    import fedft.aggregation.validate as v

    def by_count(name: str, t: object, shape: tuple[int, ...], problems: list[str]) -> bool:
        assert isinstance(t, torch.Tensor)
        return t.numel() == math.prod(shape)

    monkeypatch.setattr(v, "_check_tensor", by_count)
    problems = _check(_transposed_head("t"))
    assert len(problems) == 1 and "could not be checked" in problems[0]
    accepted, rejected = filter_valid(
        [_good("ab", "a"), _transposed_head("t"), _good("ab", "c")],
        expected=_expected("ab"),
        parts="ab",
        extras_expected=HEAD,
        max_norm=10.0,
    )
    assert [u.client_id for u in accepted] == ["a", "c"]
    assert [cid for cid, _ in rejected] == ["t"]


def _forced(f: LoraFactors, **fields: object) -> LoraFactors:
    """A LoraFactors whose fields skipped the constructor's checks (as a hostile decoder's)."""
    out = dataclasses.replace(f)
    for name, value in fields.items():
        object.__setattr__(out, name, value)
    return out


def test_each_problem_names_the_tensor_once_and_the_checks_never_crash() -> None:
    """What an operator reads in the rejection: the tensor, what is wrong, one line each.

    A wrong tensor is reported and then left alone: no second problem about it, and no
    crash of a later check on it (which would replace every reason by 'could not be
    checked')."""
    u = _good("ab")
    q, v = u.adapters["q"], u.adapters["v"]
    not_tensor = _with_module(u, "q", _forced(q, b=[[0.0] * 3] * 6))
    assert _check(not_tensor) == ["q.b: not a tensor (list)"]
    # an integer B of the wrong shape: the dtype is the problem, the shape is not reached
    int_b = _with_module(u, "v", _forced(v, b=torch.zeros(4, 2, dtype=torch.int64)))
    assert _check(int_b) == ["v.b: dtype torch.int64 is not floating point"]
    bad_r = _good("r")
    f = bad_r.adapters["q"]
    wrong_r = _with_module(bad_r, "q", _forced(f, r=torch.zeros(2, 2)))
    assert _check(wrong_r, "r") == ["q.r: shape (2, 2), expected (3, 3)"]
    wrong_b = _with_module(bad_r, "q", _forced(f, b=torch.zeros(6, 2)))
    assert _check(wrong_b, "r") == ["q.b: shape (6, 2), expected (6, 3)"]
    # three non-finite values counted; under "b" the non-finite frozen A is not also
    # reported as changed
    a = q.a.clone()
    a[0, 0], a[1, 1], a[2, 2] = float("nan"), float("inf"), -float("inf")
    assert _check(_with_module(u, "q", dataclasses.replace(q, a=a))) == [
        "q.a: 3 non-finite values (NaN/inf)"
    ]
    frozen = _good("b")
    fa = frozen.adapters["q"].a.clone()
    fa[0, 0] = float("nan")
    nan_frozen = _with_module(frozen, "q", dataclasses.replace(frozen.adapters["q"], a=fa))
    assert _check(nan_frozen, "b") == ["q.a: 1 non-finite values (NaN/inf)"]
    with_r = _with_module(u, "v", dataclasses.replace(v, r=torch.eye(3)))
    assert _check(with_r) == ["v: unexpected middle matrix r (only Fed-SB sends one)"]
    # every module is checked: a first one that is not LoraFactors does not hide the next
    both = dataclasses.replace(
        u, adapters={"q": {"a": q.a}, "v": dataclasses.replace(v, scaling=3.0)}
    )
    assert _check(both) == ["q: not LoraFactors (dict)", "v: scaling 3.0, expected 2.0"]


@pytest.mark.parametrize("n", [True, 2.5])
def test_a_non_integer_example_count_is_refused(n: object) -> None:
    """n_k sets the client's FedAvg weight: a bool or a fraction is not a count."""
    u = dataclasses.replace(_good("ab"), num_examples=n)
    assert _check(u) == [f"num_examples={n!r} is not an integer"]


def test_example_count_bounds_are_inclusive_and_name_the_setting() -> None:
    u = _good("ab")
    for n in (1, 500):
        ok = validate_update(
            dataclasses.replace(u, num_examples=n),
            expected=_expected("ab"),
            parts="ab",
            extras_expected=HEAD,
            max_examples=500,
        )
        assert ok == [], n
    too_many = validate_update(
        dataclasses.replace(u, num_examples=501),
        expected=_expected("ab"),
        parts="ab",
        extras_expected=HEAD,
        max_examples=500,
    )
    assert too_many == [
        "num_examples=501 outside [1, 500] (a client's FedAvg weight is capped at "
        "aggregation.max_examples; raise it if clients hold more data)"
    ]


def test_norm_bound_holds_at_exactly_the_bound_and_measures_extras_from_the_reference() -> None:
    """Delta 3 and 4 on two head entries: norm exactly 5. The reference head is not zero,
    so the extras' delta must be measured against it (an unchanged head moves nothing)."""
    ref_head = {"head": torch.full((2, 4), 7.0)}
    u = _good("ab", step=0.0)
    head = ref_head["head"].clone()
    head[0, 0] += 3.0
    head[1, 3] -= 4.0
    moved = dataclasses.replace(u, extras={"head": head})

    def check(x: ClientUpdate, bound: float) -> list[str]:
        return validate_update(
            x, expected=_expected("ab"), parts="ab", extras_expected=ref_head, max_norm=bound
        )

    assert check(moved, 5.0) == []
    assert check(moved, 4.999) == ["update norm 5 exceeds the bound 4.999"]
    unchanged = dataclasses.replace(u, extras={"head": ref_head["head"].clone()})
    assert check(unchanged, 1e-9) == []


def test_filter_valid_applies_the_norm_and_example_bounds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The bounds given to filter_valid reach every check: an oversized update and a client
    claiming more examples than allowed are rejected, each reason in full, joined by '; '."""
    good, big = _good("ab", "a"), _good("ab", "b", step=1.0)
    greedy = dataclasses.replace(_good("ab", "c"), num_examples=10**6)
    two = dataclasses.replace(
        _bad_cases()["nan"][0](_good("ab", "d")), extras={"head": torch.zeros(3, 4)}
    )
    with caplog.at_level(logging.WARNING, logger="fedft.aggregation.validate"):
        accepted, rejected = filter_valid(
            [good, big, greedy, two],
            expected=_expected("ab"),
            parts="ab",
            extras_expected=HEAD,
            max_norm=1.0,
            max_examples=1000,
        )
    assert [x.client_id for x in accepted] == ["a"]
    reasons = dict(rejected)
    assert set(reasons) == {"b", "c", "d"}
    assert reasons["b"].startswith("update norm ") and "exceeds the bound 1" in reasons["b"]
    assert reasons["c"].startswith("num_examples=1000000 outside [1, 1000]")
    assert reasons["d"] == (
        "q.a: 1 non-finite values (NaN/inf); extras.head: shape (3, 4), expected (2, 4)"
    )
    assert f"rejected update from client d: {reasons['d']}" in caplog.messages


def test_a_check_that_fails_is_logged_with_the_client_and_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import fedft.aggregation.validate as v

    def broken(name: str, t: object, shape: tuple[int, ...], problems: list[str]) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(v, "_check_tensor", broken)
    with caplog.at_level(logging.WARNING, logger="fedft.aggregation.validate"):
        problems = _check(_good("ab", "t"))
    assert problems == ["update could not be checked (RuntimeError: boom)"]
    (record,) = caplog.records
    assert record.getMessage() == "checking the update of client t failed"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_dedupe_keeps_the_clients_after_a_replay_and_logs_each_drop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    x1, x2, y, z = _good("ab", "x"), _good("ab", "x", step=0.02), _good("ab", "y"), _good("ab", "z")
    with caplog.at_level(logging.WARNING, logger="fedft.aggregation.validate"):
        kept = dedupe([(3, x1), (3, x2), (2, z), (3, y), (3, z)], current_round=3)
    assert [u.client_id for u in kept] == ["x", "y", "z"]
    assert caplog.messages == [
        "dropped duplicate update from client x",
        "dropped update from client z for round 2 (current round 3)",
    ]
