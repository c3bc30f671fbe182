"""A client's side of sample-level DP across rounds: its noise, its ledger, its budget.

The noise multiplier is calibrated once from the client's own budget over the whole planned
run (every round × local steps at its own sampling rate q = B / n_k), so it is the same every
round. What the client has spent is its own :class:`~fedft.privacy.client_ledger.ClientLedger`
(never a history sent by the server). A node started with its own budget also refuses any
round that is not sample-level DP at the δ and accountant it expects (:func:`node_refusal`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

from fedft.privacy.accountant import (
    BudgetDecision,
    Mechanism,
    PrivacyAccountant,
    check_budget,
    require_sound,
)
from fedft.privacy.client_ledger import ClientLedger
from fedft.privacy.planner import calibrate_noise, sample_rate_for

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def planned_noise(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, mechanism: Mechanism
) -> float:
    """σ that spends exactly the budget over the planned steps (memoised per process)."""
    return calibrate_noise(
        epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=mechanism
    )


def client_noise(
    *,
    epsilon: float,
    delta: float,
    mechanism: Mechanism,
    noise_multiplier: float,
    planned_steps: int,
    num_examples: int,
    batch_size: int,
) -> tuple[float, float]:
    """``(σ, q)`` a client trains with: σ as configured, else calibrated over the plan.

    Args:
        noise_multiplier: σ as configured; 0 = calibrate from ``epsilon`` at ``delta`` over
            ``planned_steps`` steps at the client's sampling rate q = batch / examples.
    """
    q = sample_rate_for(num_examples, batch_size)
    sigma = noise_multiplier or planned_noise(
        epsilon=epsilon, delta=delta, sample_rate=q, steps=planned_steps, mechanism=mechanism
    )
    return sigma, q


def delta_refusal(*, delta: float, num_examples: int) -> str | None:
    """Why δ is too large for a client of ``num_examples`` examples (None when it is not).

    (ε, δ)-DP with δ ≥ 1/n allows a mechanism that publishes one of the n examples in the
    clear with probability δ·n ≥ 1, so δ must be below 1/n_k.
    """
    if delta * num_examples >= 1:
        return (
            f"refused: privacy.delta = {delta:g} is not below 1/n = {1 / num_examples:g} for "
            f"this client's {num_examples} examples; a delta that large allows publishing an "
            f"example outright: lower privacy.delta below {1 / num_examples:g}"
        )
    return None


@dataclass(frozen=True, kw_only=True)
class NodePolicy:
    """What a node started with its own budget agrees to (``fedft client --epsilon``).

    Attributes:
        epsilon: the node's own sample-level budget ε at ``delta``.
        delta: the δ the node accounts at.
        accountant: the analysis the node accounts with.
    """

    epsilon: float
    delta: float
    accountant: Mechanism

    def __post_init__(self) -> None:
        if not self.epsilon > 0 or not 0 < self.delta < 1:
            raise ValueError(
                f"node budget epsilon = {self.epsilon!r} (> 0) at delta = {self.delta!r} "
                "(in (0, 1))"
            )
        require_sound(self.accountant, purpose="a node's own budget")


def node_refusal(
    policy: NodePolicy | None, *, mode: str, delta: float, accountant: str
) -> str | None:
    """Why a node with its own budget refuses the run's privacy settings (None: it agrees).

    The run's settings come from the server; a node that has its own budget trains only
    under sample-level DP at exactly its own δ and accountant, whatever the server says.
    """
    if policy is None:
        return None
    if mode != "sample":
        return (
            f"refused: this node trains only under sample-level DP (its own budget eps = "
            f"{policy.epsilon:g}); the run asks for privacy.mode = {mode!r}"
        )
    if delta != policy.delta or accountant != policy.accountant:
        return (
            f"refused: this node accounts at delta = {policy.delta:g} with the "
            f"{policy.accountant!r} accountant; the run asks for delta = {delta:g} with "
            f"{accountant!r}"
        )
    return None


@dataclass(frozen=True)
class RoundPrivacy:
    """What one client's next round will do under sample-level DP.

    Attributes:
        ledger: the client's ledger before the round.
        accountant: an accountant of ``ledger`` (training steps it).
        noise_multiplier: σ for this round.
        sample_rate: q = B / n_k.
        decision: whether the round may run (refusals carry the reason).
    """

    ledger: ClientLedger
    accountant: PrivacyAccountant
    noise_multiplier: float
    sample_rate: float
    decision: BudgetDecision

    def spent_if_run(self, steps: int) -> ClientLedger:
        """The ledger after ``steps`` steps of this round (write it before training)."""
        return self.ledger.grow(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps
        )


def prepare_round(
    *,
    epsilon: float,
    delta: float,
    mechanism: Mechanism,
    noise_multiplier: float,
    planned_steps: int,
    num_examples: int,
    batch_size: int,
    local_steps: int,
    ledger: ClientLedger,
) -> RoundPrivacy:
    """Noise, accountant and the budget decision for the client's next round.

    Args:
        epsilon: the client's budget ε at ``delta`` (sample level).
        noise_multiplier: σ as configured; 0 = calibrate from the budget over the plan.
        planned_steps: rounds × local steps (the most this client can ever be asked for).
        ledger: the client's own ledger (what it has spent; never the server's word).
    """
    sigma, q = client_noise(
        epsilon=epsilon,
        delta=delta,
        mechanism=mechanism,
        noise_multiplier=noise_multiplier,
        planned_steps=planned_steps,
        num_examples=num_examples,
        batch_size=batch_size,
    )
    acc = ledger.accountant(mechanism)
    decision = check_budget(
        acc,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=local_steps,
        epsilon_budget=epsilon,
        delta=delta,
    )
    too_large = delta_refusal(delta=delta, num_examples=num_examples)
    if too_large is not None:
        decision = dataclasses.replace(decision, allowed=False, message=too_large)
    return RoundPrivacy(
        ledger=ledger, accountant=acc, noise_multiplier=sigma, sample_rate=q, decision=decision
    )
