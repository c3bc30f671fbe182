"""Server-side checks on client updates before any aggregation (reliability, issue 7).

An update that arrives over the network is checked against what the server sent this
round (module names, shapes, ranks, scalings, the frozen factors) and against sanity
bounds (finite values, a plausible example count, an L2 bound on the update delta). One
bad client must not crash or poison a round: :func:`filter_valid` keeps the good updates
and reports each rejection with the client id. :func:`dedupe` drops stale replies (an
older round) and replays (a client id twice).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from fedft.types import PARTS_FIELDS, ClientUpdate, LoraFactors, Parts

__all__ = ["DEFAULT_MAX_EXAMPLES", "dedupe", "filter_valid", "validate_update"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_EXAMPLES = 10_000_000
"""Largest n_k accepted by default: a client claiming more would dominate p_k."""


def _check_tensor(name: str, t: object, shape: tuple[int, ...], problems: list[str]) -> bool:
    """Append problems for a non-tensor, wrong shape or non-finite tensor; True if usable."""
    if not isinstance(t, Tensor):
        problems.append(f"{name}: not a tensor ({type(t).__name__})")
        return False
    if not t.is_floating_point():
        problems.append(f"{name}: dtype {t.dtype} is not floating point")
        return False
    if tuple(t.shape) != shape:
        problems.append(f"{name}: shape {tuple(t.shape)}, expected {shape}")
        return False
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        problems.append(f"{name}: {bad} non-finite values (NaN/inf)")
        return False
    return True


def _check_module(
    mod: str,
    got: LoraFactors,
    want: LoraFactors,
    parts: Parts,
    problems: list[str],
) -> list[Tensor]:
    """Check one module's factors; return the delta tensors of its trainable parts."""
    if got.rank != want.rank:
        problems.append(f"{mod}: rank {got.rank}, expected {want.rank}")
        return []
    if got.scaling != want.scaling:
        problems.append(f"{mod}: scaling {got.scaling}, expected {want.scaling}")
    ok_a = _check_tensor(f"{mod}.a", got.a, tuple(want.a.shape), problems)
    ok_b = _check_tensor(f"{mod}.b", got.b, tuple(want.b.shape), problems)
    ok_r = True
    if parts == "r":
        if want.r is None or got.r is None:
            problems.append(f"{mod}: Fed-SB update without a middle matrix r")
            return []
        ok_r = _check_tensor(f"{mod}.r", got.r, tuple(want.r.shape), problems)
    elif got.r is not None:
        problems.append(f"{mod}: unexpected middle matrix r (only Fed-SB sends one)")
    if not (ok_a and ok_b and ok_r):
        return []
    frozen = {"ab": (), "b": ("a",), "r": ("a", "b")}[parts]
    for part in frozen:
        mine, theirs = getattr(got, part), getattr(want, part)
        if not torch.equal(mine.to(theirs.dtype), theirs):
            problems.append(f"{mod}.{part}: the frozen factor was changed")
    trained = PARTS_FIELDS[parts]
    return [
        getattr(got, p).detach().to(torch.float64) - getattr(want, p).detach().to(torch.float64)
        for p in trained
    ]


def validate_update(
    update: ClientUpdate,
    *,
    expected: Mapping[str, LoraFactors],
    parts: Parts,
    extras_expected: Mapping[str, Tensor] | None = None,
    max_norm: float | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> list[str]:
    """List what is wrong with one client update (an empty list means it is acceptable).

    Never raises on what a client sent: should a check itself fail on a hostile update,
    that failure is the update's one problem, so the caller rejects this update alone and
    the round goes on with the others.

    Args:
        update: the client's reply.
        expected: module -> the LoraFactors the server sent this round (names, shapes,
            ranks, scalings; frozen factors must come back bit-identical).
        parts: what the client trains: ``"ab"``, ``"b"`` (A frozen) or ``"r"`` (A and B
            frozen, Fed-SB).
        extras_expected: name -> the dense extras the server sent (head, soft prompt).
        max_norm: bound on the L2 norm of the whole update delta (trained tensors minus
            ``expected``, plus extras minus ``extras_expected``); None for no bound.
        max_examples: largest plausible n_k.

    Returns:
        Human-readable problems, each naming the module/tensor and what was expected.
    """
    try:
        return _problems(
            update,
            expected=expected,
            parts=parts,
            extras_expected=extras_expected or {},
            max_norm=max_norm,
            max_examples=max_examples,
        )
    except Exception as exc:  # untrusted input: one update's failure is that update's problem
        logger.warning("checking the update of client %s failed", update.client_id, exc_info=True)
        return [f"update could not be checked ({type(exc).__name__}: {exc})"]


def _problems(
    update: ClientUpdate,
    *,
    expected: Mapping[str, LoraFactors],
    parts: Parts,
    extras_expected: Mapping[str, Tensor],
    max_norm: float | None,
    max_examples: int,
) -> list[str]:
    """The checks of :func:`validate_update` (which turns an exception into a problem)."""
    problems: list[str] = []
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int):
        problems.append(f"num_examples={n!r} is not an integer")
    elif not 0 < n <= max_examples:
        problems.append(
            f"num_examples={n} outside [1, {max_examples}] (a client's FedAvg weight is capped "
            "at aggregation.max_examples; raise it if clients hold more data)"
        )
    names, want_names = set(update.adapters), set(expected)
    if names != want_names:
        problems.append(
            f"module names differ: missing {sorted(want_names - names)}, "
            f"unexpected {sorted(names - want_names)}"
        )
    deltas: list[Tensor] = []
    for mod in sorted(names & want_names):
        got = update.adapters[mod]
        if not isinstance(got, LoraFactors):
            problems.append(f"{mod}: not LoraFactors ({type(got).__name__})")
            continue
        deltas += _check_module(mod, got, expected[mod], parts, problems)
    extra_names, want_extras = set(update.extras), set(extras_expected)
    if extra_names != want_extras:
        problems.append(
            f"extras differ: missing {sorted(want_extras - extra_names)}, "
            f"unexpected {sorted(extra_names - want_extras)}"
        )
    for name in sorted(extra_names & want_extras):
        want = extras_expected[name]
        if _check_tensor(f"extras.{name}", update.extras[name], tuple(want.shape), problems):
            deltas.append(
                update.extras[name].detach().to(torch.float64) - want.detach().to(torch.float64)
            )
    if max_norm is not None and not problems:
        norm = math.sqrt(sum(float(d.square().sum()) for d in deltas))
        if not norm <= max_norm:
            problems.append(f"update norm {norm:.4g} exceeds the bound {max_norm:.4g}")
    return problems


def filter_valid(
    updates: Sequence[ClientUpdate],
    *,
    expected: Mapping[str, LoraFactors],
    parts: Parts,
    extras_expected: Mapping[str, Tensor] | None = None,
    max_norm: float | None = None,
    max_examples: int = DEFAULT_MAX_EXAMPLES,
) -> tuple[list[ClientUpdate], list[tuple[str, str]]]:
    """Split updates into accepted and rejected ones (see :func:`validate_update`).

    Returns:
        (accepted updates in input order, [(client_id, reason)] for the rejected ones).
    """
    accepted: list[ClientUpdate] = []
    rejected: list[tuple[str, str]] = []
    for u in updates:
        problems = validate_update(
            u,
            expected=expected,
            parts=parts,
            extras_expected=extras_expected,
            max_norm=max_norm,
            max_examples=max_examples,
        )
        if problems:
            reason = "; ".join(problems)
            logger.warning("rejected update from client %s: %s", u.client_id, reason)
            rejected.append((u.client_id, reason))
        else:
            accepted.append(u)
    return accepted, rejected


def dedupe(
    updates: Sequence[tuple[int, ClientUpdate]], *, current_round: int
) -> list[ClientUpdate]:
    """Keep one reply per client for the current round.

    Args:
        updates: (round the reply answers, update) in arrival order.
        current_round: the round being aggregated.

    Returns:
        The updates for ``current_round``, the first one per client id, in arrival order.
        Replies for another round (stale, or claiming a future round) are dropped; a
        replayed or duplicated client id counts once. Each drop is logged.
    """
    seen: set[str] = set()
    kept: list[ClientUpdate] = []
    for rnd, u in updates:
        if rnd != current_round:
            logger.warning(
                "dropped update from client %s for round %d (current round %d)",
                u.client_id,
                rnd,
                current_round,
            )
            continue
        if u.client_id in seen:
            logger.warning("dropped duplicate update from client %s", u.client_id)
            continue
        seen.add(u.client_id)
        kept.append(u)
    return kept
