"""Differential privacy: accountants with saved state, budget planning, DP-SGD, central DP.

- :class:`PrivacyAccountant`: ε over a whole run from a plain-typed history (one per client
  for sample-level DP, one on the server for user-level DP; never one per round).
- :func:`plan`, :func:`plan_user_level`, :func:`calibrate_noise`, :func:`format_plan`:
  σ for a target (ε, δ) and the ε it spends per round.
- :func:`train_private`: sample-level DP-SGD (Opacus) on the trainable parameters only.
- :class:`CentralDP`: user-level DP around a linear aggregator.
- :func:`check_budget`: refuse a round that would exceed a budget.
"""

from fedft.privacy.accountant import (
    BudgetDecision,
    BudgetExceededError,
    Level,
    Mechanism,
    PrivacyAccountant,
    check_budget,
    epsilon_of,
)
from fedft.privacy.central import CentralDP
from fedft.privacy.dpsgd import PerformanceFlags, per_sample_loss, train_private
from fedft.privacy.planner import (
    PrivacyPlan,
    calibrate_noise,
    format_plan,
    plan,
    plan_user_level,
    sample_rate_for,
)

__all__ = [
    "BudgetDecision",
    "BudgetExceededError",
    "CentralDP",
    "Level",
    "Mechanism",
    "PerformanceFlags",
    "PrivacyAccountant",
    "PrivacyPlan",
    "calibrate_noise",
    "check_budget",
    "epsilon_of",
    "format_plan",
    "per_sample_loss",
    "plan",
    "plan_user_level",
    "sample_rate_for",
    "train_private",
]
