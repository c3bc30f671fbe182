"""A privacy accountant with its whole history in plain types, kept across all rounds.

One :class:`PrivacyAccountant` lives as long as the guarantee it tracks: a client keeps one
for sample-level DP-SGD over every round it trains; the server keeps one for user-level DP
over every round it aggregates. Never build a new one per round: the ε it reports would then
cover one round, not the run.

The history is a list of ``(noise_multiplier, sample_rate, steps)`` entries, each a run of
``steps`` Poisson-subsampled Gaussian mechanisms (Abadi et al., 2016, "Deep Learning with
Differential Privacy"). ε at δ is computed from the history by Opacus' analyses:

- ``"rdp"``: Rényi DP of the sampled Gaussian (Mironov et al., 2019), the default orders;
- ``"prv"``: numerical composition of privacy-loss random variables (Gopi et al., 2021),
  the tightest of the three, and Opacus' default; the upper bound of its estimate is used;
- ``"gdp"``: Gaussian DP via the central limit theorem (Dong et al., 2019); it can
  underestimate ε and supports one (σ, q) pair only.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import gdp as gdp_analysis
from opacus.accountants.analysis import rdp as rdp_analysis

logger = logging.getLogger(__name__)

Mechanism = Literal["rdp", "prv", "gdp"]
#: what a privacy unit is: one training example ("sample") or one client's data ("user").
Level = Literal["sample", "user"]

STATE_VERSION = 1

HistoryEntry = tuple[float, float, int]


def _check_step(noise_multiplier: float, sample_rate: float, steps: int) -> None:
    if not (isinstance(noise_multiplier, int | float) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier = {noise_multiplier!r}: must be a number >= 0")
    if not (isinstance(sample_rate, int | float) and 0 < sample_rate <= 1):
        raise ValueError(f"sample_rate = {sample_rate!r}: must be a probability in (0, 1]")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps = {steps!r}: must be an integer >= 0")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise ValueError(f"delta = {delta!r}: must be a probability in (0, 1), e.g. 1e-5")


def _merge(history: Sequence[HistoryEntry], entry: HistoryEntry) -> list[HistoryEntry]:
    """Append ``entry``, merging it with the last entry when (σ, q) are equal.

    Merging makes "k rounds of s steps" and "one run of k·s steps" the same history, so
    their ε is identical by construction.
    """
    out = list(history)
    sigma, q, steps = entry
    if steps == 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (sigma, q, out[-1][2] + steps)
    else:
        out.append((sigma, q, steps))
    return out


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(sample_rate: float, noise_multiplier: float) -> tuple[float, ...]:
    """RDP of one subsampled Gaussian step at Opacus' default orders.

    RDP is linear in steps, so runs of any length reuse it (Opacus computes ``rdp * steps``
    the same way, so ε is identical to its RDPAccountant's).
    """
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    return tuple(float(x) for x in rdp)


def epsilon_of(history: Sequence[HistoryEntry], *, delta: float, mechanism: Mechanism) -> float:
    """ε at δ spent by ``history`` under ``mechanism`` (stateless; no reported floor applied).

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` entries.
        delta: the δ of (ε, δ)-DP.
        mechanism: ``"rdp"``, ``"prv"`` or ``"gdp"``.

    Returns:
        ε >= 0 (0.0 for an empty history, ``inf`` when any run had no noise). The RDP
        conversion goes negative for large δ (δ = 0.5: -0.68); ε < 0 means nothing, so
        it is 0 then.
    """
    return max(_epsilon_of(history, delta=delta, mechanism=mechanism), 0.0)


def _epsilon_of(history: Sequence[HistoryEntry], *, delta: float, mechanism: Mechanism) -> float:
    _check_delta(delta)
    live = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not live:
        return 0.0
    if any(s == 0 for s, _, _ in live):
        return math.inf
    if mechanism == "gdp":
        if len(live) > 1:
            raise ValueError(
                "the GDP accountant supports one (noise_multiplier, sample_rate) pair only; "
                f"this history has {len(live)}: use accountant 'prv' or 'rdp'"
            )
        sigma, q, steps = live[0]
        mu = gdp_analysis.compute_mu_poisson(steps=steps, noise_multiplier=sigma, sample_rate=q)
        # Opacus solves δ(ε) = δ for ε in [0, 500]; outside that bracket it fails with a
        # root-finding error. δ(0) <= δ: every ε >= 0 holds, so 0. δ(500) > δ: ε > 500,
        # reported as inf (never smaller than the truth).
        if gdp_analysis.delta_eps_mu(eps=0.0, mu=mu) <= delta:
            return 0.0
        if gdp_analysis.delta_eps_mu(eps=500.0, mu=mu) > delta:
            return math.inf
        return float(gdp_analysis.eps_from_mu(mu=mu, delta=delta))
    if mechanism == "rdp":
        rdp = sum(np.asarray(_rdp_one_step(q, s)) * n for s, q, n in live)
        eps, _ = rdp_analysis.get_privacy_spent(
            orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
        )
        return float(eps)
    accountant = create_accountant(mechanism=mechanism)
    accountant.history = list(live)
    return float(accountant.get_epsilon(delta=delta))


class PrivacyAccountant:
    """Tracks ε spent over a whole run; the state is plain types (JSON-able).

    Example:
        >>> acc = PrivacyAccountant("rdp", level="sample")
        >>> acc.step(noise_multiplier=1.5, sample_rate=0.04, steps=2250)
        >>> round(acc.epsilon(1e-5), 4)
        7.3291

    Args:
        mechanism: ``"prv"`` (default, tightest), ``"rdp"`` or ``"gdp"``.
        level: what one privacy unit is; carried in every report so a sample-level ε is
            never shown as user-level or the other way round.
    """

    def __init__(self, mechanism: Mechanism = "prv", *, level: Level = "sample") -> None:
        if mechanism not in get_args(Mechanism):
            raise ValueError(
                f"accountant = {mechanism!r} is not allowed: one of {list(get_args(Mechanism))}"
            )
        if level not in get_args(Level):
            raise ValueError(f"level = {level!r} is not allowed: one of {list(get_args(Level))}")
        if mechanism == "gdp":
            logger.warning(
                "GDP accounting is an approximation that can underestimate ε "
                "(Gopi et al., 2021); prefer 'prv' for reported budgets"
            )
        self.mechanism: Mechanism = mechanism
        self.level: Level = level
        self._history: list[HistoryEntry] = []
        # highest ε reported so far, per δ: ε never goes down, even through numerical noise
        # in the PRV estimate.
        self._floor: dict[str, float] = {}

    @property
    def history(self) -> list[HistoryEntry]:
        """A copy of the ``(noise_multiplier, sample_rate, steps)`` entries so far."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total mechanism invocations (DP-SGD steps, or rounds for user-level DP)."""
        return sum(n for _, _, n in self._history)

    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` more runs of the subsampled Gaussian mechanism.

        Args:
            noise_multiplier: σ, the noise std in units of the clipping norm.
            sample_rate: q, the Poisson sampling probability of one unit per step.
            steps: how many steps were taken at (σ, q).
        """
        _check_step(noise_multiplier, sample_rate, steps)
        self._history = _merge(
            self._history, (float(noise_multiplier), float(sample_rate), int(steps))
        )

    def epsilon(self, delta: float) -> float:
        """ε at ``delta`` spent so far (never smaller than a value reported before)."""
        eps = epsilon_of(self._history, delta=delta, mechanism=self.mechanism)
        key = repr(float(delta))
        eps = max(eps, self._floor.get(key, 0.0))
        if math.isfinite(eps):
            self._floor[key] = eps
        return eps

    def epsilon_if(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
    ) -> float:
        """ε at ``delta`` after ``steps`` more steps at (σ, q), without recording them."""
        _check_step(noise_multiplier, sample_rate, steps)
        history = _merge(self._history, (float(noise_multiplier), float(sample_rate), steps))
        eps = epsilon_of(history, delta=delta, mechanism=self.mechanism)
        return max(eps, self._floor.get(repr(float(delta)), 0.0))

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready state: mechanism, level, history and the ε floor."""
        return {
            "version": STATE_VERSION,
            "mechanism": self.mechanism,
            "level": self.level,
            "history": [[s, q, n] for s, q, n in self._history],
            "epsilon_floor": dict(self._floor),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses a different mechanism or level."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"accountant state version {state.get('version')!r} is not supported "
                f"(expected {STATE_VERSION})"
            )
        if state.get("mechanism") != self.mechanism or state.get("level") != self.level:
            raise ValueError(
                f"accountant state is ({state.get('mechanism')!r}, {state.get('level')!r}); "
                f"this accountant is ({self.mechanism!r}, {self.level!r}): build a matching one"
            )
        history: list[HistoryEntry] = []
        for entry in state.get("history", []):
            if not isinstance(entry, Sequence) or len(entry) != 3:
                raise ValueError(f"bad accountant history entry {entry!r}: want [σ, q, steps]")
            sigma, q, n = entry
            _check_step(sigma, q, n)
            history = _merge(history, (float(sigma), float(q), int(n)))
        floor = state.get("epsilon_floor", {})
        if not isinstance(floor, Mapping) or not all(
            isinstance(v, int | float) and v >= 0 for v in floor.values()
        ):
            raise ValueError(f"bad accountant epsilon_floor {floor!r}: want {{delta: epsilon}}")
        self._history = history
        self._floor = {str(k): float(v) for k, v in floor.items()}

    def __repr__(self) -> str:
        return (
            f"PrivacyAccountant(mechanism={self.mechanism!r}, level={self.level!r}, "
            f"steps={self.steps})"
        )


@dataclass(frozen=True, kw_only=True)
class BudgetDecision:
    """Whether the next round fits in the budget.

    Attributes:
        allowed: True when ε after the round would be ≤ the budget.
        epsilon_now: ε at ``delta`` spent so far.
        epsilon_after: ε at ``delta`` if the round ran.
        epsilon_budget: the budget ε.
        delta: δ.
        level: the privacy unit of these ε (``"sample"`` or ``"user"``).
        message: one readable line (why it was refused, or what is left).
    """

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    epsilon_budget: float
    delta: float
    level: Level
    message: str


#: analyses that may decide how much noise to add or whether a round may run: they bound ε
#: from above. GDP is a central-limit approximation that can lie below the true ε (σ
#: calibrated with it for ε = 3 at q = 0.04 over 100 steps spends ≈ 4.2 by PRV).
SOUND_MECHANISMS: tuple[Mechanism, ...] = ("prv", "rdp")


def require_sound(mechanism: str, *, purpose: str) -> None:
    """Refuse an analysis that can underestimate ε for a decision that spends budget.

    Raises:
        ValueError: ``mechanism`` is not one of :data:`SOUND_MECHANISMS`.
    """
    if mechanism not in SOUND_MECHANISMS:
        raise ValueError(
            f"accountant {mechanism!r} cannot be used for {purpose}: it can underestimate "
            f"epsilon, so the budget could be overspent; use one of {list(SOUND_MECHANISMS)}"
        )


def check_budget(
    accountant: PrivacyAccountant,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    epsilon_budget: float,
    delta: float,
) -> BudgetDecision:
    """Decide whether ``steps`` more steps at (σ, q) keep ε at ``delta`` within the budget.

    A client (or the server, for user-level DP) whose next round would exceed the budget
    must not run it. Nothing is recorded on ``accountant``.

    Raises:
        ValueError: a budget <= 0, or an accountant whose analysis can underestimate ε
            (:func:`require_sound`).
    """
    require_sound(accountant.mechanism, purpose="refusing rounds past a budget")
    if epsilon_budget <= 0:
        raise ValueError(f"epsilon_budget = {epsilon_budget!r}: must be > 0")
    now = accountant.epsilon_if(  # a query that records nothing, not even the ε floor
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=0, delta=delta
    )
    after = accountant.epsilon_if(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta
    )
    allowed = after <= epsilon_budget
    if allowed:
        message = (
            f"{accountant.level}-level eps {now:.4f} -> {after:.4f} of budget "
            f"{epsilon_budget:g} at delta={delta:g}"
        )
    else:
        message = (
            f"refused: {steps} more steps at sigma={noise_multiplier:g}, q={sample_rate:g} "
            f"would take {accountant.level}-level eps from {now:.4f} to {after:.4f}, over the "
            f"budget {epsilon_budget:g} at delta={delta:g}"
        )
    return BudgetDecision(
        allowed=allowed,
        epsilon_now=now,
        epsilon_after=after,
        epsilon_budget=float(epsilon_budget),
        delta=float(delta),
        level=accountant.level,
        message=message,
    )


class BudgetExceededError(RuntimeError):
    """A round was refused because it would exceed the privacy budget."""

    def __init__(self, decision: BudgetDecision) -> None:
        super().__init__(decision.message)
        self.decision = decision
