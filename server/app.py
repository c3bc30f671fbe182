"""The Flower ServerApp: parse config -> build -> run rounds -> write outputs.

``app`` is what a deployed SuperLink loads (``server.app:app``; it reads the resolved
config from Flower's run config). ``make_server_app(cfg, out_dir=...)`` closes over a config
for the in-process Simulation Engine.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedft.config import RunConfig
from fedft.transport.flower_config import read_run_config
from server.federation import run_federation

logger = logging.getLogger(__name__)


def make_server_app(
    cfg: RunConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    progress: bool = True,
    resume: bool = False,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """A ServerApp running the whole federated run for ``cfg`` (or the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = cfg if cfg is not None else read_run_config(context.run_config)
        out = Path(out_dir or str(context.run_config.get("fedft-out", f"runs/{config.name}")))
        try:
            resume_run = resume or bool(context.run_config.get("fedft-resume", False))
            run_federation(
                grid,
                config,
                out,
                progress=progress,
                resume=resume_run,
                bound_nodes=bound_nodes(context.run_config.get("fedft-nodes")),
            )
        except BaseException as exc:
            logger.exception("the run failed")
            if on_error is not None:
                on_error(exc)
            raise

    return app


def bound_nodes(value: object) -> dict[int, int] | None:
    """``fedft-nodes`` of the run config (JSON node id -> client index, written by
    ``fedft server`` from the registered node keys) as {node id: index}; None without it."""
    if value is None or value == "":
        return None
    parsed = json.loads(str(value))
    if not isinstance(parsed, dict):
        raise ValueError(f"fedft-nodes is not a JSON object: {value!r}")
    return {int(node): int(idx) for node, idx in parsed.items()}


app = make_server_app()
