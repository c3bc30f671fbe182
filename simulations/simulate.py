"""The ``fedft simulate`` recipe.

Parse config -> build the apps -> run Flower's Simulation Engine -> check the outputs ->
clean up.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from fedft.config import ConfigError, RunConfig, build_config
from fedft.console import QUIET_ENV, RUN_LOG_ENV, route_third_party_loggers

logger = logging.getLogger(__name__)

#: environment the actors need to stay offline (copied when set here)
OFFLINE_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "FLWR_TELEMETRY_ENABLED",
    "FEDFT_CACHE",
    "TOKENIZERS_PARALLELISM",
)


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


def check_devices(cfg: RunConfig) -> str | None:
    """Refuse a simulation whose virtual clients cannot reach the GPU it asks for.

    Ray hides every GPU from a virtual client that reserves none (it sets
    ``CUDA_VISIBLE_DEVICES`` to empty for it), so ``gpus_per_client = 0`` means CPU clients
    whatever ``device`` says.

    Returns:
        A one-line notice when ``device = "auto"`` would train on the CPU although this
        machine has a GPU; None otherwise.

    Raises:
        ConfigError: ``device = "cuda"`` with ``gpus_per_client = 0``, or (without
            ``ray_address``) on a machine where torch sees no CUDA device.
    """
    import torch

    f = cfg.federation
    if f.device == "cuda" and f.gpus_per_client == 0:
        raise ConfigError(
            "federation.device = 'cuda' with federation.gpus_per_client = 0: Ray hides the "
            "GPU from virtual clients that reserve none; set gpus_per_client (e.g. 0.5: two "
            "clients share a GPU) or device = 'cpu'"
        )
    if f.device == "cuda" and not f.ray_address and not torch.cuda.is_available():
        raise ConfigError(
            f"federation.device = 'cuda' but torch {torch.__version__} sees no CUDA device "
            "on this machine; use device = 'auto' or 'cpu'"
        )
    if f.device == "auto" and f.gpus_per_client == 0 and torch.cuda.is_available():
        return (
            "note: this machine has a GPU but federation.gpus_per_client = 0, so the virtual "
            "clients train on the CPU; set gpus_per_client (e.g. 0.5) to train on the GPU"
        )
    return None


class RayClusterError(SimulationFailed):
    """``federation.ray_address`` names no reachable Ray cluster, or one too small."""


def cluster_capacity(nodes: list[dict[str, Any]], *, cpus: int, gpus: float) -> int:
    """How many virtual clients of ``cpus`` CPUs and ``gpus`` GPUs run at once on ``nodes``.

    ``nodes`` as :func:`ray.nodes` returns them. Counted per node (a client cannot span two
    machines), as Flower sizes its actor pool: floor(CPUs / cpus), and with ``gpus`` > 0
    at most floor(GPUs / gpus); dead nodes count nothing.
    """
    total = 0
    for node in nodes:
        if not node.get("Alive", True):
            continue
        res = node.get("Resources") or {}
        fit = int(res.get("CPU", 0) // cpus)
        if gpus > 0:
            fit = min(fit, int(res.get("GPU", 0) // gpus))
        total += fit
    return total


def _check_reachable(address: str, *, timeout_s: float = 10.0) -> None:
    """Fail fast, in one line, when nothing listens at ``address`` (Ray would retry long)."""
    import socket

    if address == "auto":
        return  # Ray resolves it from this machine's `ray start` record
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as exc:
        raise RayClusterError(
            f"no Ray cluster answers at federation.ray_address = {address!r} ({exc}); start "
            f"one with `ray start --head --port {port}` or fix the address"
        ) from exc


def start_ray(*, address: str | None = None) -> None:
    """Start (or join, with ``address``) Ray for the run's virtual clients.

    Flower would start Ray itself; starting it here lets every actor process run
    :func:`fedft.console.ray_worker_setup` first (its output to ``OUT/run.log``) and lets a
    run join an existing cluster. Workers get this process's ``sys.path`` as Flower's
    backend gives them, and the quiet/offline environment variables. On a cluster, actors
    on other machines keep their output in Ray's session logs there (``log_to_driver`` off:
    it would reach this console).
    """
    import ray

    pythonpath = os.pathsep.join(p for p in sys.path if p)
    env = {"PYTHONPATH": pythonpath}
    for key in (*QUIET_ENV, RUN_LOG_ENV, *OFFLINE_ENV):
        if key in os.environ:
            env[key] = os.environ[key]
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "fedft.console.ray_worker_setup"}
    kwargs: dict[str, Any] = {"runtime_env": runtime_env, "logging_level": logging.WARNING}
    if address:
        _check_reachable(address)
        kwargs.update(address=address, log_to_driver=False)
    else:
        kwargs.update(num_cpus=os.cpu_count() or 1, include_dashboard=False)
    ray.init(**kwargs)
    route_third_party_loggers()


def describe_cluster(cfg: RunConfig) -> str:
    """The joined cluster in one line: nodes, CPUs, GPUs, and clients that run at once.

    Raises:
        RayClusterError: no node has room for one virtual client.
    """
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive", True)]
    f = cfg.federation
    fit = cluster_capacity(nodes, cpus=f.cpus_per_client, gpus=f.gpus_per_client)
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    need = f"{f.cpus_per_client} CPU" + (
        f" + {f.gpus_per_client:g} GPU" if f.gpus_per_client else ""
    )
    line = (
        f"Ray cluster at {f.ray_address}: {len(nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs; "
        f"{fit} virtual client(s) at once ({need} each)"
    )
    if fit == 0:
        raise RayClusterError(
            f"{line}: no node has room for one client; lower federation.cpus_per_client / "
            "gpus_per_client or add a node with more (see docs/ray-cluster.md)"
        )
    return line


def simulate(cfg: RunConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Run ``cfg`` on the Simulation Engine; return the summary. Raises on failure.

    With ``federation.ray_address`` the virtual clients run on that existing Ray cluster
    (``ray start``); without, on a Ray instance of this process's own.
    """
    import ray
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    route_third_party_loggers()  # Flower and Ray install console handlers when imported
    notice = check_devices(cfg)
    if notice is not None:
        logger.warning("%s", notice, extra={"console": True})

    split_server = None
    if cfg.adapter.method == "split" and not cfg.split.server:
        from server.split_runner import SplitServerThread, build_split_service

        split_server = SplitServerThread(build_split_service(cfg)).start()
        table = cfg.to_dict()
        table["split"]["server"] = split_server.address
        cfg = build_config(table)
    errors: list[BaseException] = []
    try:
        start_ray(address=cfg.federation.ray_address or None)
        if cfg.federation.ray_address:
            logger.info("%s", describe_cluster(cfg), extra={"console": True})
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
