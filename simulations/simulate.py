"""The ``fedft simulate`` recipe.

Parse config -> build the apps -> run Flower's Simulation Engine -> check the outputs ->
clean up.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fedft.config import RunConfig, build_config

logger = logging.getLogger(__name__)


class SimulationFailed(RuntimeError):
    """The ServerApp raised, or the run ended without its outputs."""


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    """Flower/Ray resources.

    One CPU per virtual client (whole numbers only) and the configured GPU fraction.
    """
    return {
        "client_resources": {
            "num_cpus": cfg.federation.cpus_per_client,
            "num_gpus": cfg.federation.gpus_per_client,
        },
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }


def simulate(cfg: RunConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` on the Simulation Engine; return the summary. Raises on failure."""
    import ray
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    split_server = None
    if cfg.adapter.method == "split" and not cfg.split.server:
        from server.split_runner import SplitServerThread, build_split_service

        split_server = SplitServerThread(build_split_service(cfg)).start()
        table = cfg.to_dict()
        table["split"]["server"] = split_server.address
        cfg = build_config(table)
    errors: list[BaseException] = []
    try:
        server_app = make_server_app(cfg, out_dir=out, progress=progress, on_error=errors.append)
        run_simulation(
            server_app=server_app,
            client_app=make_client_app(cfg),
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend_config(cfg),  # type: ignore[arg-type]
        )
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if split_server is not None:
            split_server.stop()
    if errors:
        raise SimulationFailed(f"the server failed: {errors[0]!r}") from errors[0]
    summary = out / "summary.json"
    if not summary.is_file():
        raise SimulationFailed(f"the run ended without writing {summary}")
    import json

    return dict(json.loads(summary.read_text())["final"])
