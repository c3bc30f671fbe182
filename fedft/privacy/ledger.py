"""The server's per-client privacy ledger for sample-level DP (pure, no Flower).

Under sample-level DP every client keeps its own accountant and reports, with each reply,
its accountant state (JSON), the ε it has spent so far at the run's δ, or that it refused
the round because its budget is spent. The ledger mirrors those reports across rounds:

- ``accountants``: client index -> the client's latest accountant state (JSON). The server
  sends it back with the next start, so a client that lost its own copy (a restarted
  SuperNode) resumes from it instead of from zero;
- ``spent``: client index -> ε spent so far (sample-level, at the run's δ);
- ``exhausted``: clients that refused a round because their budget is spent; they are no
  longer sampled.

It is checkpointed with :meth:`state_dict` (plain types) so a resumed run keeps it.
User-level DP is accounted on the server by :class:`~fedft.privacy.CentralDP`, not here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["EPSILON_COVERS", "ClientReports", "PrivacyLedger"]

#: what ``epsilon`` in metrics.jsonl is about: the released model (for split learning, the
#: client's parts and any server adapter), never the activations and gradients that cross the
#: cut, which no DP mechanism covers.
EPSILON_COVERS = "release"


class ClientReports(Protocol):
    """What one round's replies report about the clients' privacy (the ledger's input)."""

    @property
    def epsilon(self) -> Mapping[int, float]:
        """Client index -> ε spent so far, from the replies that were accepted."""

    @property
    def accountants(self) -> Mapping[int, str]:
        """Client index -> its accountant state (JSON), from every reply that carried one."""

    @property
    def refused(self) -> Sequence[int]:
        """Clients that refused the round because their budget is spent."""


@dataclass
class PrivacyLedger:
    """Per-client ε across rounds: accountants, ε spent, clients out of budget."""

    accountants: dict[int, str] = field(default_factory=dict)
    spent: dict[int, float] = field(default_factory=dict)
    exhausted: set[int] = field(default_factory=set)

    def update(self, replies: ClientReports) -> None:
        """Take in one round's reports (later reports replace earlier ones)."""
        self.accountants.update(replies.accountants)
        self.exhausted.update(replies.refused)
        self.spent.update(replies.epsilon)

    def able(self, clients: Iterable[int]) -> list[int]:
        """The clients of ``clients`` that may still train (not out of budget)."""
        return [i for i in clients if i not in self.exhausted]

    def epsilon(self) -> float | None:
        """The largest ε any client has spent (None before any report)."""
        return max(self.spent.values(), default=None)

    def record(self) -> dict[str, Any]:
        """The metrics-line fields of the per-client ε (empty without reports)."""
        if not self.spent:
            return {}
        return {
            "epsilon_level": "sample",
            "epsilon_covers": EPSILON_COVERS,
            "epsilon_clients": {str(k): v for k, v in sorted(self.spent.items())},
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain types: ``accountants`` and ``spent`` keyed by str(index), ``exhausted``."""
        return {
            "accountants": {str(k): v for k, v in self.accountants.items()},
            "exhausted": sorted(self.exhausted),
            "spent": {str(k): v for k, v in self.spent.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (missing keys: empty)."""
        self.accountants = {int(k): str(v) for k, v in state.get("accountants", {}).items()}
        self.exhausted = {int(i) for i in state.get("exhausted", [])}
        self.spent = {int(k): float(v) for k, v in state.get("spent", {}).items()}
