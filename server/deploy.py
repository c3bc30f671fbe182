"""The ``fedft server`` recipe: start a Flower SuperLink, register the client node keys,
submit the run (the same ``server.app:app`` / ``client.app:app`` the simulation runs, as a
Flower App Bundle built from this project), wait for it, stop what was started.

Everything goes through Flower's own command-line programs (``flower-superlink`` and the
``flwr`` CLI), run as child processes with a private ``FLWR_HOME`` under the output folder,
so nothing here depends on Flower internals. The resolved :class:`~fedft.config.RunConfig`
travels in Flower's run config under ``fedft-config`` (see
:mod:`fedft.transport.flower_config`), the output folder under ``fedft-out`` and the resume
flag under ``fedft-resume``.

Layout under ``<out>/.superlink/``: ``config.toml`` (the ``flwr`` CLI's connection to this
SuperLink), ``state.db`` (the SuperLink's SQLite state: registered nodes survive a restart,
which is what lets running SuperNodes carry on after ``fedft server --resume``),
``superlink.log`` and ``run_config.toml``.

Exposure: the SuperLink listens on 127.0.0.1 only (``ServerPlan.local_port``), because
its one port also serves the Control API (register-node, start-run, stop-run, ls) with no
caller authentication in flwr 1.41. The public ``--address`` is a reverse proxy
(:mod:`server.fleet_front`) that forwards the Fleet API a SuperNode needs, with the same TLS
certificate, and refuses every other path. Runs are submitted by this process over the
loopback connection; an app bundle runs on the nodes only if it came through that door.

Split learning (``adapter.method = "split"``): the server also serves the model's body over
fedft's own gRPC service (``fedft.split.v1``) in this process, on ``--split-address`` or, by
default, on the SuperLink's host at ``split.server``'s port. With TLS on, it runs mutual TLS
with the same ``ca.crt`` / ``server.crt`` / ``server.key``: only clients with a certificate
from the deployment CA get in, and each session is bound to its certificate's identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedft import supervise
from fedft.checkpoint import checkpoint_exists
from fedft.config import RunConfig
from fedft.launch import (
    ChildProcess,
    DeployError,
    flower_env,
    free_port,
    port_in_use,
    program,
    split_address,
    terminate_as_interrupt,
    wait_for_port,
)
from fedft.transport.flower_config import to_run_config
from server.fleet_front import FleetFront, FrontTls

if TYPE_CHECKING:
    from server.split_runner import SplitServerThread

logger = logging.getLogger(__name__)

#: the project root: its pyproject.toml holds the ``[tool.flwr.app]`` section.
APP_DIR = Path(__file__).resolve().parent.parent
#: the name of the ``flwr`` CLI connection written into the private FLWR_HOME.
CONNECTION = "fedft"
OUT_KEY, RESUME_KEY, NODES_KEY = "fedft-out", "fedft-resume", "fedft-nodes"
#: the guardian's record of every process a server started (in ``<out>/.superlink/``)
PROCESS_RECORD = "processes.json"
DEFAULT_ADDRESS = "0.0.0.0:9092"

#: the process helpers live in fedft.launch (shared with client/deploy.py); these names stay
#: importable from here
__all__ = [
    "ChildProcess",
    "DeployError",
    "ServerPlan",
    "ServerTls",
    "flower_env",
    "free_port",
    "run_server",
    "split_address",
]


def take_over(state_dir: Path, *, address: str) -> int:
    """Make ``state_dir`` (and the port) ours before a SuperLink starts there.

    Takes the folder's lock (refusing when a live ``fedft server`` holds it), stops what an
    earlier, killed server left running there (proven by its process record: PID, start
    time, boot and program must all match), and checks that ``address`` is free. Returns
    the lock's file descriptor (held until we exit).

    Raises:
        DeployError: another server still runs for this folder, or another program holds
            the port.
    """
    try:
        lock = supervise.lock_folder(state_dir)
    except supervise.StillRunning as exc:
        raise DeployError(
            f"another fedft server (pid {exc}) is still running for {state_dir.parent}; stop "
            "it first (Ctrl-C or `kill PID`: it stops everything it started), or use --out"
        ) from None
    try:
        supervise.reclaim(state_dir / PROCESS_RECORD)
    except supervise.StillRunning as exc:  # a server of a fedft without the lock file
        os.close(lock)
        raise DeployError(
            f"another fedft server (pid {exc}) is still running for {state_dir.parent}; "
            "stop it first"
        ) from None
    except ValueError as exc:
        logger.warning("ignoring an unreadable process record: %s", exc)
    host, port = split_address(address)
    deadline = time.monotonic() + 10.0
    while port_in_use(host, port):  # a just-killed listener may take a moment to let go
        if time.monotonic() > deadline:
            os.close(lock)
            raise DeployError(
                f"port {port} on {host} is in use by another program (not one this run "
                "started); stop it or choose another --address"
            )
        time.sleep(0.2)
    return lock


# --- the flwr CLI ------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FlwrCli:
    """The ``flwr`` CLI bound to one SuperLink through a private FLWR_HOME."""

    flwr_home: Path
    env: dict[str, str]

    def call(self, *args: str, timeout_s: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json``; the parsed JSON (``success`` is checked by the
        caller: the CLI exits 0 on failures too)."""
        argv = [program("flwr"), *args, "--format", "json"]
        res = subprocess.run(  # noqa: S603 - fixed argv, no shell
            argv, capture_output=True, env=self.env, timeout=timeout_s, check=False
        )
        out = res.stdout.decode("utf-8", errors="replace")
        start = out.find("{")
        try:
            parsed = json.loads(out[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            err = res.stderr.decode("utf-8", errors="replace")[-2000:]
            raise DeployError(
                f"`flwr {' '.join(args)}` gave no JSON (exit {res.returncode}):"
                f"\n{out[-2000:]}\n{err}"
            )
        return parsed


def write_connection(flwr_home: Path, *, address: str, root_certificates: Path | None) -> Path:
    """Write FLWR_HOME/config.toml with the default connection ``fedft`` to ``address``
    (TLS verified against ``root_certificates``, or plaintext when it is None)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f"address = {json.dumps(address)}",
    ]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(root_certificates.resolve()))}")
    path = flwr_home / "config.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def register_node_keys(cli: FlwrCli, keys: Sequence[Path]) -> list[str]:
    """``flwr supernode register`` each OpenSSH public key; a key already registered (a
    restarted SuperLink with its state file) is fine. Returns the node ids or "known"."""
    ids = []
    for key in keys:
        res = cli.call("supernode", "register", str(key), CONNECTION)
        if res.get("success"):
            ids.append(str(res["node-id"]))
        elif "already in use" in str(res.get("error-message", "")):
            ids.append("known")
        else:
            raise DeployError(f"could not register node key {key}: {res.get('error-message')}")
        logger.info("node key %s registered (%s)", key, ids[-1])
    return ids


_KEY_INDEX = re.compile(r"client-(\d+)\.pub")


def bind_node_keys(keys: Sequence[Path], ids: Sequence[str], state_dir: Path) -> dict[str, int]:
    """Node id -> client index for the registered keys named ``client-<i>.pub``.

    A key's index comes from its file name (what ``fedft certs`` writes), never from what
    the node later declares; the ServerApp serves index i only to the node holding that key.
    Node ids are kept in ``state_dir/nodes.json`` (key fingerprint -> node id) so a
    restarted SuperLink, which answers "already registered", keeps the same binding.
    """
    saved_path = state_dir / "nodes.json"
    saved: dict[str, str] = {}
    if saved_path.is_file():
        loaded = json.loads(saved_path.read_text(encoding="utf-8"))
        saved = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
    binding: dict[str, int] = {}
    for key, node_id in zip(keys, ids, strict=True):
        fingerprint = hashlib.sha256(key.read_bytes().strip()).hexdigest()
        if node_id == "known":
            if fingerprint not in saved:
                raise DeployError(
                    f"node key {key} is registered with the SuperLink but its node id is not "
                    f"in {saved_path}; start afresh in a new --out folder"
                )
            node_id = saved[fingerprint]
        saved[fingerprint] = node_id
        match = _KEY_INDEX.fullmatch(key.name)
        if match is None:
            logger.warning("node key %s: no client index in its name; not bound", key)
            continue
        binding[node_id] = int(match.group(1))
    saved_path.write_text(json.dumps(saved, sort_keys=True) + "\n", encoding="utf-8")
    return binding


def stop_unfinished_runs(cli: FlwrCli) -> list[str]:
    """Stop runs a killed server left ``running`` in the SuperLink's state."""
    res = cli.call("ls", CONNECTION)
    stopped = []
    for run in res.get("runs", []) if res.get("success") else []:
        if not str(run.get("status", "")).startswith("finished"):
            cli.call("stop", str(run["run-id"]), CONNECTION)
            stopped.append(str(run["run-id"]))
    if stopped:
        logger.info("stopped runs left over from a killed server: %s", stopped)
    return stopped


def write_run_config(
    path: Path,
    cfg: RunConfig,
    *,
    out: Path,
    resume: bool,
    nodes: Mapping[str, int] | None = None,
) -> Path:
    """The run-config TOML ``flwr run --run-config`` reads: the resolved config as JSON,
    the absolute output folder, the resume flag and the node binding (node id -> client
    index, JSON; absent without node authentication). (``json.dumps`` of a str is a valid
    TOML basic string.)"""
    ((key, value),) = to_run_config(cfg).items()
    text = (
        f"{key} = {json.dumps(value)}\n{OUT_KEY} = {json.dumps(str(out.resolve()))}\n"
        f"{RESUME_KEY} = {'true' if resume else 'false'}\n"
    )
    if nodes is not None:
        text += f"{NODES_KEY} = {json.dumps(json.dumps(dict(nodes), sort_keys=True))}\n"
    path.write_text(text, encoding="utf-8")
    return path


# --- the recipe ----------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ServerTls:
    """The SuperLink's TLS material (PEM files, e.g. from ``fedft certs``)."""

    ca_cert: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, certs: Path) -> ServerTls:
        """``ca.crt``, ``server.crt``, ``server.key`` in ``certs``; all must exist."""
        tls = cls(ca_cert=certs / "ca.crt", cert=certs / "server.crt", key=certs / "server.key")
        missing = [str(p) for p in (tls.ca_cert, tls.cert, tls.key) if not p.is_file()]
        if missing:
            raise DeployError(f"missing TLS files {missing}; make them with `fedft certs {certs}`")
        return tls


@dataclass(frozen=True, kw_only=True)
class ServerPlan:
    """Everything ``fedft server`` needs besides the run config.

    Attributes:
        out: the run's output folder (metrics, adapter, checkpoint/, .superlink/).
        address: the public HOST:PORT SuperNodes dial: the Fleet front
            (:mod:`server.fleet_front`), the only listener off the loopback interface.
        tls: the TLS files, or None for plaintext (``--insecure``: experiments only).
        node_keys: OpenSSH public keys of the SuperNodes allowed in; node authentication
            is on whenever TLS is on (Flower requires TLS for it).
        resume: continue from ``out/checkpoint/`` instead of starting afresh.
        split_address: HOST:PORT the split-learning service binds (split runs only); None =
            the SuperLink's host at ``split.server``'s port.
        local_port: the SuperLink's own port on 127.0.0.1 (Fleet, Control and runtime
            APIs); None = a free port chosen at start.
        poll_s: seconds between run-status checks.
        start_timeout_s: how long the SuperLink may take to listen.
    """

    out: Path
    address: str = DEFAULT_ADDRESS
    tls: ServerTls | None = None
    node_keys: tuple[Path, ...] = ()
    resume: bool = False
    split_address: str | None = None
    local_port: int | None = None
    poll_s: float = 3.0
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        split_address(self.address)
        if self.split_address is not None:
            split_address(self.split_address)
        if self.tls is not None and not self.node_keys:
            raise DeployError(
                "node authentication is on with TLS but no node public keys were given; "
                "pass --certs DIR holding client-<i>.pub (from `fedft certs`) or --node-key"
            )
        if self.resume and not checkpoint_exists(self.out / "checkpoint"):
            raise DeployError(
                f"--resume: no checkpoint in {self.out / 'checkpoint'}; run without --resume"
            )


LOCAL_HOST = "127.0.0.1"


def superlink_argv(plan: ServerPlan, state_dir: Path, *, port: int) -> list[str]:
    """The ``flower-superlink`` command line for ``plan``: loopback only, on ``port``."""
    argv = [
        program("flower-superlink"),
        "--host",
        LOCAL_HOST,
        "--port",
        str(port),
        "--database",
        str((state_dir / "state.db").resolve()),
        "--disable-runtime-dependency-installation",
    ]
    if plan.tls is None:
        argv.append("--insecure")
    else:
        argv += [
            "--ssl-certfile",
            str(plan.tls.cert.resolve()),
            "--ssl-keyfile",
            str(plan.tls.key.resolve()),
            "--ssl-ca-certfile",
            str(plan.tls.ca_cert.resolve()),
            "--enable-supernode-auth",
        ]
    return argv


_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_service_addresses(cfg: RunConfig, plan: ServerPlan) -> tuple[str, RunConfig]:
    """Where the split service binds, and ``cfg`` with ``split.server`` = what clients dial.

    ``split.server`` is the address clients dial (the server certificate's SANs must cover
    its host). The bind address is ``plan.split_address``, or the SuperLink's host with
    ``split.server``'s port. An empty ``split.server`` is filled from ``plan.split_address``
    when that names a dialable host.

    Raises:
        DeployError: neither gives an address clients can dial.
    """
    dial = cfg.split.server
    if not dial:
        if plan.split_address is None or split_address(plan.split_address)[0] in _WILDCARD_HOSTS:
            raise DeployError(
                "adapter.method = 'split' needs split.server = the HOST:PORT clients dial for "
                "the split service (e.g. --set split.server='fl.example.org:9093'); "
                "--split-address sets where it binds"
            )
        dial = plan.split_address
        cfg = replace(cfg, split=replace(cfg.split, server=dial))
    bind = plan.split_address
    if bind is None:
        bind = _join(split_address(plan.address)[0], split_address(dial)[1])
    if split_address(bind)[1] == split_address(plan.address)[1]:
        raise DeployError(f"the split service and the SuperLink cannot share the port of {bind}")
    return bind, cfg


def start_split_service(cfg: RunConfig, plan: ServerPlan, *, bind: str) -> SplitServerThread:
    """Load the model, then serve its body on ``bind`` in a background thread.

    With ``plan.tls``: mutual TLS from the same CA and server certificate as the SuperLink,
    sessions bound to the client certificate's identity. Without (``--insecure``): plaintext.
    """
    from server.split_runner import (
        SplitServerThread,
        build_split_service,
        mtls_server_credentials,
    )

    creds = None
    if plan.tls is None:
        logger.warning("split service on %s WITHOUT TLS (--insecure): local use only", bind)
    else:
        creds = mtls_server_credentials(
            ca_cert=plan.tls.ca_cert, cert=plan.tls.cert, key=plan.tls.key
        )
    from server.split_service import ADMISSION_FILE

    service = build_split_service(
        cfg,
        require_client_identity=plan.tls is not None,
        admission_file=plan.out / ADMISSION_FILE if plan.tls is not None else None,
    )
    try:
        server = SplitServerThread(service, address=bind, server_credentials=creds).start()
    except (RuntimeError, TimeoutError) as exc:
        raise DeployError(f"could not start the split service on {bind}: {exc}") from exc
    logger.info(
        "split service on %s (%s); clients dial %s",
        server.address,
        "mutual TLS" if creds is not None else "plaintext",
        cfg.split.server,
    )
    return server


def start_fleet_front(plan: ServerPlan, *, upstream_port: int) -> FleetFront:
    """Serve the Fleet API (only) on ``plan.address``, forwarding to the local SuperLink."""
    host, public_port = split_address(plan.address)
    tls = None
    if plan.tls is not None:
        tls = FrontTls(cert=plan.tls.cert, key=plan.tls.key, ca_cert=plan.tls.ca_cert)
    front = FleetFront(host=host, port=public_port, upstream_port=upstream_port, tls=tls)
    try:
        return front.start()
    except RuntimeError as exc:
        raise DeployError(str(exc)) from exc


#: the program of a run's ServerApp (started below the SuperLink by ``flower-superexec``)
SERVERAPP = "flwr-serverapp"


def wait_for_run(
    cli: FlwrCli, run_id: str, *, superlink: ChildProcess, poll_s: float, recheck_s: float = 60.0
) -> str:
    """Wait until the run's status is ``finished:*``; returns that status.

    The status is asked with ``flwr ls`` (a Python start: about a second of CPU each time),
    so while the run's ServerApp process runs below the SuperLink it is asked only every
    ``recheck_s`` seconds; otherwise every ``poll_s`` seconds.
    """
    status = "pending"
    asked = -recheck_s
    while True:
        if not superlink.alive():
            raise DeployError(f"the SuperLink exited during the run:\n{superlink.log_tail()}")
        now = time.monotonic()
        if now - asked < recheck_s and supervise.runs_below(superlink.pid, SERVERAPP):
            time.sleep(poll_s)
            continue
        asked = now
        res = cli.call("ls", CONNECTION, "--run-id", run_id)
        runs = res.get("runs") or []
        if res.get("success") and runs:
            new = str(runs[0].get("status", status))
            if new != status:
                logger.info("run %s: %s", run_id, new)
                status = new
            if status.startswith("finished"):
                return status
        time.sleep(poll_s)


@dataclass
class _Launch:
    """What :func:`run_server` starts, in the order it stops them (reverse of start)."""

    cfg: RunConfig
    out: Path
    state_dir: Path
    port: int
    cli: FlwrCli
    superlink: ChildProcess
    split_bind: str | None
    front: FleetFront | None = None
    split_server: SplitServerThread | None = None


def _plan_launch(cfg: RunConfig, plan: ServerPlan) -> _Launch:
    """The run folder, the SuperLink's loopback port, its ``flwr`` connection and argv."""
    split_bind: str | None = None
    if cfg.adapter.method == "split":
        split_bind, cfg = split_service_addresses(cfg, plan)
    out = plan.out.resolve()
    state_dir = out / ".superlink"
    state_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)  # state.db holds every client update: owner only
    env = flower_env(state_dir)
    port = plan.local_port or free_port(LOCAL_HOST)
    while port == split_address(plan.address)[1]:  # the front takes that one
        port = free_port(LOCAL_HOST)
    write_connection(
        state_dir,
        address=f"{LOCAL_HOST}:{port}",
        root_certificates=None if plan.tls is None else plan.tls.ca_cert,
    )
    superlink = ChildProcess(
        name="flower-superlink",
        argv=superlink_argv(plan, state_dir, port=port),
        log_path=state_dir / "superlink.log",
        env=env,
    )
    cli = FlwrCli(flwr_home=state_dir, env=env)
    return _Launch(cfg, out, state_dir, port, cli, superlink, split_bind)


def _start_and_submit(run: _Launch, plan: ServerPlan) -> str:
    """Start the split service (split runs), the SuperLink and the Fleet front; register the
    node keys, stop runs a killed server left, submit this run. Returns its run id."""
    if run.split_bind is not None:
        run.split_server = start_split_service(run.cfg, plan, bind=run.split_bind)
    run.superlink.start()
    (run.state_dir / "superlink.pid").write_text(f"{run.superlink.pid}\n", encoding="utf-8")
    wait_for_port(LOCAL_HOST, run.port, child=run.superlink, timeout_s=plan.start_timeout_s)
    nodes = None
    if plan.tls is not None:
        ids = register_node_keys(run.cli, plan.node_keys)
        nodes = bind_node_keys(plan.node_keys, ids, run.state_dir) or None
    stop_unfinished_runs(run.cli)
    run.front = start_fleet_front(plan, upstream_port=run.port)
    run_cfg = write_run_config(
        run.state_dir / "run_config.toml", run.cfg, out=run.out, resume=plan.resume, nodes=nodes
    )
    res = run.cli.call("run", str(APP_DIR), CONNECTION, "--run-config", str(run_cfg))
    if not res.get("success"):
        raise DeployError(f"the SuperLink refused the run: {res.get('error-message')}")
    run_id = str(res["run-id"])
    logger.info(
        "run %s of %r submitted (%s); waiting for %d clients",
        run_id,
        run.cfg.name,
        "resuming" if plan.resume else "fresh",
        run.cfg.federation.num_clients,
        extra={"console": True},
    )
    return run_id


def _stop_launch(run: _Launch) -> None:
    """Stop what :func:`_start_and_submit` started (each part only if it was started)."""
    if run.front is not None:
        run.front.stop()
    run.superlink.stop()
    if run.split_server is not None:
        run.split_server.stop()


def run_server(cfg: RunConfig, plan: ServerPlan) -> int:
    """Start the SuperLink, submit the run, wait for it, stop the SuperLink.

    Every process it starts is owned (:mod:`fedft.supervise`): a guardian stops them all
    when this command ends, however it ends, and the next start in the same ``--out``
    stops what a killed one left.

    Args:
        cfg: the resolved run configuration (sent to the ServerApp and every ClientApp).
        plan: where and how to serve.

    Returns:
        0 when the run finished as completed, 1 otherwise (failed or stopped).

    Raises:
        DeployError: the SuperLink did not start, a node key or the run was refused, or the
            split service (split runs) has no address or did not start.
    """
    run = _plan_launch(cfg, plan)
    run_id, status = "", "not started"
    supervise.become_subreaper()
    lock = take_over(run.state_dir, address=plan.address)
    guardian = supervise.Guardian(
        run.state_dir / PROCESS_RECORD, log_path=run.state_dir / "guardian.log"
    )
    with terminate_as_interrupt():
        try:
            run_id = _start_and_submit(run, plan)
            status = wait_for_run(run.cli, run_id, superlink=run.superlink, poll_s=plan.poll_s)
        finally:
            _stop_launch(run)
            guardian.close()
            os.close(lock)
    if status != "finished:completed":
        logger.error("run %s ended %s; see %s", run_id, status, run.superlink.log_path)
        return 1
    return 0
