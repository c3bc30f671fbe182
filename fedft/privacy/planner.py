"""Budget planning: calibrate the noise for a target (ε, δ) and show what it buys.

``fedft privacy plan`` prints :func:`format_plan` of :func:`plan` (sample-level DP-SGD) or
:func:`plan_user_level` (user-level DP over rounds).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from opacus.accountants.utils import get_noise_multiplier

from fedft.privacy.accountant import Level, Mechanism, epsilon_of, require_sound

logger = logging.getLogger(__name__)

#: per-round ε is evaluated at most this many rounds (evenly spaced, always the last one):
#: a PRV evaluation takes ~0.5 s on 2 CPU cores.
MAX_CURVE_POINTS = 50


def sample_rate_for(num_examples: int, batch_size: int) -> float:
    """Poisson sampling rate q = batch_size / num_examples (capped at 1).

    Args:
        num_examples: n, the examples a client holds (or clients, for user-level DP).
        batch_size: the expected logical batch size (clients per round).
    """
    if num_examples < 1 or batch_size < 1:
        raise ValueError(
            f"num_examples = {num_examples}, batch_size = {batch_size}: both must be >= 1"
        )
    return min(1.0, batch_size / num_examples)


def calibrate_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Mechanism = "prv",
    epsilon_tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier σ (to ``epsilon_tolerance``) with ε(σ) ≤ ``epsilon``.

    Binary search by Opacus ``get_noise_multiplier``; the result is checked again with the
    same analysis the accountants use, so ε after ``steps`` steps at (σ, q) is ≤ ``epsilon``.

    Args:
        epsilon: target ε (> 0).
        delta: target δ in (0, 1).
        sample_rate: q per step, in (0, 1].
        steps: total steps the budget must cover (>= 1).
        accountant: ``"prv"`` or ``"rdp"`` (``"gdp"`` is refused: it can underestimate ε).
        epsilon_tolerance: how far below ``epsilon`` the search may stop.

    Raises:
        ValueError: a bad argument, the GDP accountant, or a budget too small for any σ up
            to 1e6.
    """
    require_sound(accountant, purpose="calibrating noise")
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError(f"epsilon = {epsilon!r} must be > 0 and delta = {delta!r} in (0, 1)")
    if not 0 < sample_rate <= 1 or steps < 1:
        raise ValueError(f"sample_rate = {sample_rate!r} in (0, 1], steps = {steps!r} >= 1")
    sigma = float(
        get_noise_multiplier(
            target_epsilon=epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=epsilon_tolerance,
        )
    )
    for _ in range(20):  # guard: never hand out a σ whose ε exceeds the target
        if epsilon_of([(sigma, sample_rate, steps)], delta=delta, mechanism=accountant) <= epsilon:
            return sigma
        sigma *= 1.01
    raise ValueError(f"could not calibrate a noise multiplier for epsilon = {epsilon}")


@dataclass(frozen=True, kw_only=True)
class PrivacyPlan:
    """A calibrated noise multiplier and the ε it spends.

    Attributes:
        level: ``"sample"`` (DP-SGD on a client) or ``"user"`` (central DP over clients).
        epsilon_target: the budget ε at ``delta``.
        delta: δ.
        accountant: the analysis used.
        sample_rate: q per step (examples per batch / examples, or clients per round /
            clients).
        steps_per_round: DP steps per round (1 for user-level DP: one noisy sum per round).
        rounds: planned rounds.
        noise_multiplier: σ; the noise std is σ·C for clipping norm C.
        epsilon_by_round: (round, ε after it) for every round, or for evenly spaced rounds
            when there are more than ``MAX_CURVE_POINTS``; the last entry is the plan's ε.
        alternatives: (rounds, ε) at the same σ for other round counts.
        notes: remarks worth reading before running (e.g. noise on the mean).
    """

    level: Level
    epsilon_target: float
    delta: float
    accountant: Mechanism
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    epsilon_by_round: tuple[tuple[int, float], ...]
    alternatives: tuple[tuple[int, float], ...]
    notes: tuple[str, ...] = ()

    @property
    def epsilon(self) -> float:
        """ε at ``delta`` after all ``rounds``."""
        return self.epsilon_by_round[-1][1]


def _curve_rounds(rounds: int) -> list[int]:
    if rounds <= MAX_CURVE_POINTS:
        return list(range(1, rounds + 1))
    picks = {max(1, round(rounds * i / MAX_CURVE_POINTS)) for i in range(1, MAX_CURVE_POINTS + 1)}
    return sorted(picks | {rounds})


def _build_plan(
    *,
    level: Level,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: Mechanism,
    alternatives: Sequence[float],
    notes: tuple[str, ...] = (),
) -> PrivacyPlan:
    if rounds < 1 or steps_per_round < 1:
        raise ValueError(f"rounds = {rounds}, steps_per_round = {steps_per_round}: both >= 1")
    sigma = calibrate_noise(
        epsilon=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps=rounds * steps_per_round,
        accountant=accountant,
    )

    def eps_after(r: int) -> float:
        return epsilon_of(
            [(sigma, sample_rate, r * steps_per_round)], delta=delta, mechanism=accountant
        )

    curve: list[tuple[int, float]] = []
    for r in _curve_rounds(rounds):
        # PRV is a numerical estimate: keep the curve monotone like the accountant does
        eps = max(eps_after(r), curve[-1][1] if curve else 0.0)
        curve.append((r, eps))
    alt_rounds = sorted({max(1, round(rounds * f)) for f in alternatives} - {rounds})
    alts = tuple((r, eps_after(r)) for r in alt_rounds)
    logger.info("privacy plan (%s level): sigma=%.4f for eps=%.3f", level, sigma, epsilon)
    return PrivacyPlan(
        level=level,
        epsilon_target=epsilon,
        delta=delta,
        accountant=accountant,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=rounds,
        noise_multiplier=sigma,
        epsilon_by_round=tuple(curve),
        alternatives=alts,
        notes=notes,
    )


def plan(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: Mechanism = "prv",
    alternatives: Sequence[float] = (0.5, 2.0),
) -> PrivacyPlan:
    """Sample-level plan: σ for DP-SGD so a client's ε after ``rounds`` rounds is ≤ ε.

    Args:
        epsilon: the client's budget ε at ``delta``.
        delta: δ (below 1 / examples per client).
        sample_rate: q = batch_size / examples (see :func:`sample_rate_for`).
        steps_per_round: local DP-SGD steps per round.
        rounds: rounds the client trains in (all rounds, if it is picked every round).
        accountant: ``"prv"`` or ``"rdp"``.
        alternatives: other round counts as multiples of ``rounds`` (ε at the same σ).
    """
    return _build_plan(
        level="sample",
        epsilon=epsilon,
        delta=delta,
        sample_rate=sample_rate,
        steps_per_round=steps_per_round,
        rounds=rounds,
        accountant=accountant,
        alternatives=alternatives,
    )


def plan_user_level(
    *,
    epsilon: float,
    delta: float,
    clients_per_round: int,
    num_clients: int,
    rounds: int,
    accountant: Mechanism = "prv",
    alternatives: Sequence[float] = (0.5, 2.0),
) -> PrivacyPlan:
    """User-level plan: σ for the server's noisy sum, one mechanism per round.

    Each client joins a round independently with probability q = clients_per_round /
    num_clients, the sampling the server runs (:func:`fedft.privacy.sampling.poisson_cohort`)
    and the one the DP-FedAvg analysis assumes (McMahan et al., 2018, "Learning
    Differentially Private Recurrent Language Models").

    Args:
        epsilon: the run's budget ε at ``delta`` (δ below 1 / num_clients).
        delta: δ.
        clients_per_round: m, the expected clients per round.
        num_clients: N.
        rounds: rounds.
        accountant: ``"prv"`` or ``"rdp"``.
        alternatives: other round counts as multiples of ``rounds``.
    """
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(
            f"clients_per_round = {clients_per_round} must be in 1..num_clients ({num_clients})"
        )
    q = clients_per_round / num_clients
    notes = []
    if delta >= 1 / num_clients:
        notes.append(f"delta = {delta:g} is not below 1/num_clients = {1 / num_clients:g}")
    result = _build_plan(
        level="user",
        epsilon=epsilon,
        delta=delta,
        sample_rate=q,
        steps_per_round=1,
        rounds=rounds,
        accountant=accountant,
        alternatives=alternatives,
    )
    rel = result.noise_multiplier / clients_per_round
    notes.append(
        f"cohort: each client joins a round independently with probability q = {q:.4g} "
        f"(secret, from the OS), {clients_per_round} clients per round on average"
    )
    notes.append(
        f"noise std on the averaged update = sigma*C/m = {rel:.3g} x C"
        + (" (larger than any single clipped update: needs more clients)" if rel > 1 else "")
    )
    return dataclasses.replace(result, notes=tuple(notes))


def format_plan(p: PrivacyPlan) -> str:
    """A readable table of a plan (what ``fedft privacy plan`` prints)."""
    level = "user-level (one unit = one client)" if p.level == "user" else "sample-level"
    unit = "clients/round / clients" if p.level == "user" else "batch / examples"
    lines = [
        f"Privacy plan, {level}, accountant {p.accountant}",
        f"  target            eps = {p.epsilon_target:g} at delta = {p.delta:g}",
        f"  sample rate q     {p.sample_rate:.6g}  ({unit})",
        f"  steps per round   {p.steps_per_round}",
        f"  rounds            {p.rounds}",
        f"  noise multiplier  sigma = {p.noise_multiplier:.4f}  (noise std = sigma x clip norm)",
        f"  eps after run     {p.epsilon:.4f}",
        "",
        f"  {'round':>7}  {'steps':>9}  {'epsilon':>10}",
    ]
    for r, eps in p.epsilon_by_round:
        lines.append(f"  {r:>7}  {r * p.steps_per_round:>9}  {_fmt(eps):>10}")
    if p.alternatives:
        lines += ["", "  same sigma, other round counts:", f"  {'rounds':>7}  {'epsilon':>10}"]
        lines += [f"  {r:>7}  {_fmt(eps):>10}" for r, eps in p.alternatives]
    if p.notes:
        lines += ["", *(f"  note: {n}" for n in p.notes)]
    return "\n".join(lines)


def _fmt(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:.4f}"
