"""A client's side of sample-level DP across rounds: its noise, its one accountant, its budget.

The noise multiplier is calibrated once from the client's own budget over the whole planned
run (every round × local steps at its own sampling rate q = B / n_k), so it is the same every
round. The accountant's history travels as JSON: kept in the client's state and mirrored by
the server's checkpoint; the longer history wins, so neither side can make a client forget
what it spent.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any

from fedft.privacy.accountant import BudgetDecision, Mechanism, PrivacyAccountant, check_budget
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


def restore_accountant(mechanism: Mechanism, *states: str | None) -> PrivacyAccountant:
    """The accountant with the longest history among the JSON states given (or a new one)."""
    best = PrivacyAccountant(mechanism, level="sample")
    for text in states:
        if not text:
            continue
        acc = PrivacyAccountant(mechanism, level="sample")
        acc.load_state_dict(json.loads(text))
        if acc.steps > best.steps:
            best = acc
    return best


@dataclass(frozen=True)
class RoundPrivacy:
    """What one client's next round will do under sample-level DP."""

    accountant: PrivacyAccountant
    noise_multiplier: float
    sample_rate: float
    decision: BudgetDecision


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
    states: tuple[str | None, ...] = (),
) -> RoundPrivacy:
    """Noise, accountant and the budget decision for the client's next round.

    Args:
        epsilon: the client's budget ε at ``delta`` (sample level).
        noise_multiplier: σ as configured; 0 = calibrate from the budget over the plan.
        planned_steps: rounds × local steps (the most this client can ever be asked for).
        states: JSON accountant states to resume from (client state, server mirror).
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
    acc = restore_accountant(mechanism, *states)
    decision = check_budget(
        acc,
        noise_multiplier=sigma,
        sample_rate=q,
        steps=local_steps,
        epsilon_budget=epsilon,
        delta=delta,
    )
    return RoundPrivacy(accountant=acc, noise_multiplier=sigma, sample_rate=q, decision=decision)


def accountant_json(acc: PrivacyAccountant) -> str:
    """The accountant's state as JSON text (what travels and is checkpointed)."""
    state: dict[str, Any] = acc.state_dict()
    return json.dumps(state, sort_keys=True)
