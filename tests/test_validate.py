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
