"""Experiment trackers, as Hugging Face Trainer users know them (``report_to``).

Local stores only, inside the run's output folder; nothing goes online:

* ``"tensorboard"``: event files in ``OUT/tensorboard/`` (``tensorboard --logdir OUT``);
* ``"mlflow"``: an MLflow SQLite store ``OUT/mlflow/mlflow.db`` with artifacts under
  ``OUT/mlflow/artifacts/`` (``mlflow ui --backend-store-uri sqlite:///OUT/mlflow/mlflow.db``).

Every round's row of ``metrics.jsonl`` is logged at step = round: the metric and loss, ε
(and each client's ε as ``epsilon_client/<i>``), bytes up/down, clients, wall time and
the aggregation diagnostics; the resolved config once at the start (TensorBoard: a text
entry ``config``; MLflow: flattened params plus ``config.json``), the final summary at the end.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger(__name__)


class Tracker(Protocol):
    """Receives the run's config, every round's row, and the final summary."""

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Log one round (a ``metrics.jsonl`` row; step = ``row["round"]``)."""

    def close(self, final: Mapping[str, Any] | None = None) -> None:
        """Log the final summary (if given) and release the store."""


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a row, nested mappings flattened (``epsilon_client/3``)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        if key == "round" or value is None or isinstance(value, bool | str):
            continue
        if isinstance(value, Mapping):
            name = "epsilon_client" if key == "epsilon_clients" else key
            for sub, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    out[f"{name}/{sub}"] = float(v)
        elif isinstance(value, int | float) and math.isfinite(value):
            out[key] = float(value)
    return out


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if not isinstance(value, str) else value
    return out


class TensorBoardTracker:
    """Event files written by ``torch.utils.tensorboard`` (needs the ``tensorboard`` package)."""

    def __init__(self, out: Path, *, config: Mapping[str, Any]) -> None:
        """Open ``out/tensorboard/`` and record the resolved config as text."""
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = out / "tensorboard"
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        self._writer.add_text("config", f"```json\n{text}\n```", global_step=0)
        self._writer.flush()

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Every scalar of the row at step = round."""
        step = int(row["round"])
        for key, value in scalars(row).items():
            self._writer.add_scalar(key, value, global_step=step)
        self._writer.flush()

    def close(self, final: Mapping[str, Any] | None = None) -> None:
        """The summary as text; close the event file."""
        if final is not None:
            self._writer.add_text("summary", json.dumps(final, default=str), global_step=0)
        self._writer.close()


class MlflowTracker:
    """One MLflow run in a local SQLite store (needs ``mlflow-skinny``)."""

    def __init__(self, out: Path, *, run_name: str, config: Mapping[str, Any]) -> None:
        """Create (or reuse) experiment ``run_name`` in ``out/mlflow/`` and start a run."""
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        root = (out / "mlflow").resolve()
        root.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        self._client = MlflowClient(tracking_uri=self.tracking_uri)
        experiment = self._client.get_experiment_by_name(run_name)
        if experiment is None:
            exp_id = self._client.create_experiment(
                run_name, artifact_location=(root / "artifacts").as_uri()
            )
        else:
            exp_id = experiment.experiment_id
        self.run_id: str = self._client.create_run(exp_id, run_name=run_name).info.run_id
        params = [Param(k, v[:6000]) for k, v in sorted(_flatten(config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self._client.log_batch(self.run_id, params=params[i : i + 100])
        self._client.log_dict(self.run_id, dict(config), "config.json")

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Every scalar of the row at step = round, in one batch."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(row["round"])
        metrics = [Metric(k, v, now, step) for k, v in scalars(row).items()]
        self._client.log_batch(self.run_id, metrics=metrics)

    def close(self, final: Mapping[str, Any] | None = None) -> None:
        """``summary.json`` as an artifact; mark the run finished."""
        if final is not None:
            self._client.log_dict(self.run_id, dict(final), "summary.json")
        self._client.set_terminated(self.run_id)


class Trackers:
    """Every configured tracker behind one interface; a failing tracker never stops a run."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        """Wrap ``trackers`` (may be empty)."""
        self.trackers = list(trackers)

    def log_round(self, row: Mapping[str, Any]) -> None:
        """Pass the row to every tracker."""
        for t in self.trackers:
            try:
                t.log_round(row)
            except Exception:  # noqa: BLE001 - tracking is a side channel of the run
                logger.warning("%s could not log round %s", type(t).__name__, row.get("round"))
                logger.debug("tracker failure", exc_info=True)

    def close(self, final: Mapping[str, Any] | None = None) -> None:
        """Close every tracker."""
        for t in self.trackers:
            try:
                t.close(final)
            except Exception:  # noqa: BLE001
                logger.warning("%s could not close cleanly", type(t).__name__)
                logger.debug("tracker failure", exc_info=True)


def build_trackers(
    report_to: Sequence[str], out: Path, *, run_name: str, config: Mapping[str, Any]
) -> Trackers:
    """The trackers named in ``report_to`` ("tensorboard", "mlflow"), writing under ``out``.

    Raises:
        ValueError: an unknown name, or a tracker whose package is not installed.
    """
    made: list[Tracker] = []
    for name in report_to:
        try:
            if name == "tensorboard":
                made.append(TensorBoardTracker(out, config=config))
            elif name == "mlflow":
                made.append(MlflowTracker(out, run_name=run_name, config=config))
            else:
                raise ValueError(
                    f"tracking.report_to: {name!r} is not a tracker; allowed 'tensorboard', "
                    "'mlflow'"
                )
        except ImportError as exc:
            package = "tensorboard" if name == "tensorboard" else "mlflow-skinny"
            raise ValueError(
                f"tracking.report_to = {name!r} needs the package {package} "
                f"(pip install {package}; pinned in requirements.txt): {exc}"
            ) from exc
    return Trackers(made)
