"""A client's own record of the privacy it has spent: kept by the client, only ever growing.

Sample-level ε is a function of the history of DP-SGD steps a client has taken, each run of
steps a ``(noise_multiplier, sample_rate, steps)`` entry. The client keeps that history in
its ledger, on its own disk when it has one (``fedft client --ledger PATH``), and never
takes one from anyone else: a server that sends a made-up history cannot lower a client's ε.
A round's steps are written to the ledger *before* the client trains (write-ahead), so a
client killed during a round, or a server that loses the round, still finds the round's
spending on disk when it starts again; the ledger may count a few steps that never reached
anyone, never fewer than were taken.

The history does not depend on the analysis: :meth:`ClientLedger.accountant` builds a
PRV or RDP accountant from it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedft.privacy.accountant import (
    HistoryEntry,
    Mechanism,
    PrivacyAccountant,
    _check_step,
    _merge,
)

logger = logging.getLogger(__name__)

LEDGER_VERSION = 1
#: a ledger file larger than this is not a ledger (sizes checked before parsing).
MAX_LEDGER_BYTES = 1 << 20


class LedgerError(ValueError):
    """A ledger that cannot be read, or a write that would make it forget spending."""


@dataclass(frozen=True)
class ClientLedger:
    """``(noise_multiplier, sample_rate, steps)`` runs of DP-SGD steps, oldest first."""

    history: tuple[HistoryEntry, ...] = ()

    @property
    def steps(self) -> int:
        """All DP-SGD steps recorded."""
        return sum(n for _, _, n in self.history)

    def grow(self, *, noise_multiplier: float, sample_rate: float, steps: int) -> ClientLedger:
        """This ledger with ``steps`` more steps at (σ, q) (a new object)."""
        _check_step(noise_multiplier, sample_rate, steps)
        entry = (float(noise_multiplier), float(sample_rate), int(steps))
        return ClientLedger(tuple(_merge(self.history, entry)))

    def extends(self, older: ClientLedger) -> bool:
        """True when this history is ``older``'s followed by more steps (nothing forgotten)."""
        if len(older.history) > len(self.history):
            return False
        if not older.history:
            return True
        last = len(older.history) - 1
        for i, (sigma, q, n) in enumerate(older.history):
            s2, q2, n2 = self.history[i]
            if (s2, q2) != (sigma, q) or (n2 != n if i < last else n2 < n):
                return False
        return True

    def accountant(self, mechanism: Mechanism) -> PrivacyAccountant:
        """A sample-level accountant of this history under ``mechanism``."""
        acc = PrivacyAccountant(mechanism, level="sample")
        for sigma, q, n in self.history:
            acc.step(noise_multiplier=sigma, sample_rate=q, steps=n)
        return acc

    def to_json(self) -> str:
        """``{"version": 1, "history": [[σ, q, steps], ...]}``."""
        state: dict[str, Any] = {
            "version": LEDGER_VERSION,
            "history": [[s, q, n] for s, q, n in self.history],
        }
        return json.dumps(state, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ClientLedger:
        """Parse :meth:`to_json`; every entry is checked.

        Raises:
            LedgerError: not a ledger of this version, or a bad entry.
        """
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LedgerError(f"the privacy ledger is not JSON: {exc}") from exc
        if not isinstance(state, dict) or state.get("version") != LEDGER_VERSION:
            raise LedgerError(f"not a version-{LEDGER_VERSION} privacy ledger")
        entries = state.get("history")
        if not isinstance(entries, list):
            raise LedgerError("the privacy ledger has no history list")
        history: list[HistoryEntry] = []
        for entry in entries:
            if not isinstance(entry, Sequence) or len(entry) != 3:
                raise LedgerError(f"bad ledger entry {entry!r}: want [sigma, q, steps]")
            try:
                _check_step(*entry)
            except ValueError as exc:
                raise LedgerError(f"bad ledger entry {entry!r}: {exc}") from exc
            history = _merge(history, (float(entry[0]), float(entry[1]), int(entry[2])))
        return cls(tuple(history))


def read_ledger(path: Path) -> ClientLedger:
    """The ledger in ``path``; an empty one when the file does not exist yet.

    Raises:
        LedgerError: the file is too large or not a ledger (the client must not train on a
            ledger it cannot read: it would start from zero).
    """
    if not path.exists():
        return ClientLedger()
    size = path.stat().st_size
    if size > MAX_LEDGER_BYTES:
        raise LedgerError(f"{path}: {size} bytes is not a privacy ledger (max {MAX_LEDGER_BYTES})")
    try:
        return ClientLedger.from_json(path.read_text(encoding="utf-8"))
    except LedgerError as exc:
        raise LedgerError(f"{path}: {exc}; fix or restore the file, never delete it") from exc


def write_ledger(path: Path, ledger: ClientLedger) -> None:
    """Replace the ledger in ``path`` atomically and durably (fsync before the rename).

    Raises:
        LedgerError: ``ledger`` does not extend what the file holds: the write would forget
            spending.
    """
    old = read_ledger(path)
    if not ledger.extends(old):
        raise LedgerError(
            f"{path}: refusing to write a ledger of {ledger.steps} steps that does not extend "
            f"the {old.steps} steps already recorded"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(ledger.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    logger.info("privacy ledger %s: %d steps", path, ledger.steps)
