"""Per-round metrics (``metrics.jsonl``) and the run summary (``summary.json``).

``metrics.jsonl`` holds one JSON object per round, written and flushed as the round ends,
so a crashed run keeps every finished round. Required fields: ``round``, ``loss``,
``bytes_up``, ``bytes_down`` (bytes, serialised payload), ``epsilon`` (spent ε at the
run's δ, max over clients; null without DP), ``clients`` (replies aggregated), ``wall_s``
(seconds the round took), plus the task's metric (``accuracy`` for classification) and
any extra keys. Non-finite floats are written as null (JSON has no NaN).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


def _jsonable(value: Any, key: str) -> Any:
    """Plain JSON value for ``value`` (tensor / numpy scalars become floats, NaN -> None)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    item = getattr(value, "item", None)  # torch / numpy scalars
    if callable(item):
        try:
            return _jsonable(item(), key)
        except (ValueError, RuntimeError) as exc:
            raise TypeError(f"{key}: {type(value).__name__} is not a scalar") from exc
    raise TypeError(f"{key} = {value!r}: cannot be written as JSON")


class MetricsWriter:
    """Appends one JSON object per round to ``<out_dir>/metrics.jsonl``.

    Appending to an existing file continues it (a resumed run); rounds must increase.
    """

    def __init__(
        self, out_dir: str | Path, *, on_row: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """Create ``out_dir`` if needed; remember the last round already in the file.

        ``on_row`` gets every row once it is on disk (experiment trackers).
        """
        self.on_row = on_row
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        existing = read_metrics(self.path) if self.path.exists() else []
        self._last_round = max((int(r["round"]) for r in existing), default=-1)

    def write(
        self,
        *,
        round: int,  # noqa: A002 - the field's name in metrics.jsonl
        loss: float | None,
        bytes_up: int | None,
        bytes_down: int | None,
        clients: int | None,
        wall_s: float,
        epsilon: float | None = None,
        **metrics: Any,
    ) -> dict[str, Any]:
        """Append one round and flush it to disk.

        Args:
            round: round number (0 = before training), greater than every round written.
            loss: the round's evaluation loss (None when not evaluated).
            bytes_up: bytes clients sent this round (serialised payload).
            bytes_down: bytes the server sent this round.
            clients: replies aggregated this round. ``bytes_up``, ``bytes_down`` and
                ``clients`` are None under user-level DP (the cohort is not published).
            wall_s: seconds the round took.
            epsilon: spent ε (max over clients) at the run's δ; None without DP.
            **metrics: the task's metric (``accuracy=...``) and any extra scalars.

        Returns:
            The row as written.
        """
        if round <= self._last_round:
            raise ValueError(
                f"round {round} is not after the last round written ({self._last_round}) "
                f"in {self.path}"
            )
        for name, value in (("bytes_up", bytes_up), ("bytes_down", bytes_down)):
            if value is not None and value < 0:
                raise ValueError(f"{name} = {value} must be >= 0")
        if (clients is not None and clients < 0) or wall_s < 0:
            raise ValueError(f"clients = {clients} and wall_s = {wall_s} must be >= 0")
        row: dict[str, Any] = {
            "round": int(round),
            "loss": loss,
            "bytes_up": None if bytes_up is None else int(bytes_up),
            "bytes_down": None if bytes_down is None else int(bytes_down),
            "epsilon": epsilon,
            "clients": None if clients is None else int(clients),
            "wall_s": float(wall_s),
        }
        for key, value in metrics.items():
            if key in row:
                raise ValueError(f"metric {key!r} clashes with a required field")
            row[key] = value
        row = {k: _jsonable(v, k) for k, v in row.items()}
        line = json.dumps(row, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
        self._last_round = row["round"]
        logger.debug("round %d: %s", row["round"], line)
        logger.info("%s", round_line(row), extra={"console": True})
        if self.on_row is not None:
            self.on_row(row)
        return row


def _kb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def round_line(row: Mapping[str, Any]) -> str:
    """The one console line of a round.

    E.g. ``round 2:  accuracy 0.7120  loss 0.5731  clients 5  up 1.2 MB  down 1.3 MB  eps - 8.1 s``
    """
    parts = [f"round {row['round']}:"]
    for key in ("accuracy", "loss", "train_loss"):
        if row.get(key) is not None:
            parts.append(f"{key} {float(row[key]):.4f}")
    if row.get("clients") is not None:  # None under user-level DP: the cohort is secret
        parts.append(f"clients {row['clients']}")
    for key, name in (("bytes_up", "up"), ("bytes_down", "down")):
        if row.get(key) is not None:
            parts.append(f"{name} {_kb(float(row[key]))}")
    eps = row.get("epsilon")
    parts.append("eps -" if eps is None else f"eps {float(eps):.3g}")
    for flag in ("failed", "stopped"):
        if row.get(flag):
            parts.append(f"{flag}: {row[flag]}" if isinstance(row[flag], str) else flag)
    parts.append(f"{float(row.get('wall_s', 0.0)):.1f} s")
    return "  ".join(parts)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read ``metrics.jsonl`` (a file, or a folder holding one).

    A torn last line (a crash while writing) is skipped with a warning; a bad line anywhere
    else raises ValueError naming its number.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    lines = p.read_text(encoding="utf-8").split("\n")
    rows: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: torn by a crash
                logger.warning("%s: skipping the torn last line %d", p, number)
                continue
            raise ValueError(f"{p}:{number}: not a JSON object ({exc.msg})") from exc
        if not isinstance(row, dict) or "round" not in row:
            raise ValueError(f"{p}:{number}: expected an object with a 'round' field")
        rows.append(row)
    return rows


def write_summary(
    out_dir: str | Path,
    *,
    final: Mapping[str, Any],
    config: Mapping[str, Any],
    partition: Mapping[str, Any] | None = None,
    audit: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``<out_dir>/summary.json`` atomically (temp file + ``os.replace``).

    Args:
        out_dir: the run's output folder.
        final: the final figures (test metric, loss, total bytes, ε at δ, ...).
        config: the resolved run configuration (``RunConfig.to_dict()``).
        partition: what each client held (``PartitionSummary.to_dict()``), when known.
        audit: the attacks run on this run's payloads (``fedft.attacks.audit.audit_run``),
            when the run asked for them (``[audit] enabled``).

    Returns:
        The path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"final": _jsonable(final, "final"), "config": _jsonable(config, "config")}
    if partition is not None:
        payload["partition"] = _jsonable(partition, "partition")
    if audit is not None:
        payload["audit"] = _jsonable(audit, "audit")
    text = json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n"
    target = out / SUMMARY_FILE
    fd, tmp = tempfile.mkstemp(prefix=".summary.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a summary is meant to be read
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_summary(out_dir: str | Path) -> dict[str, Any] | None:
    """``summary.json`` of a run folder, or None when there is none."""
    p = Path(out_dir) / SUMMARY_FILE
    if not p.is_file():
        return None
    data = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a JSON object")
    return data
