"""The ``fedft client`` recipe: start one Flower SuperNode for one edge client and wait.

The SuperNode connects to the SuperLink over TLS (verified against the deployment's CA),
authenticates with the client's ECDSA P-384 node key, and runs ``client.app:app`` from the
run's Flower App Bundle for every message it gets, each in a fresh process. Beside it,
``fedft client`` keeps a resident worker (``client/worker.py``) that holds the base model and
the client's encoded data across rounds; the per-message ClientApp hands every message to it
over a Unix socket in a private folder (:class:`WorkerKeeper` starts it, starts it again when
it dies, and stops it with the client). What this client is, it says in its node config
(read by ``client/app.py`` through ``context.node_config``):

- ``partition-id`` (int): the client index (which partition of a built-in dataset);
- ``data-path`` (str, optional): the client's own CSV/JSONL file;
- ``epsilon`` (float, optional): this client's own sample-level privacy budget; with it,
  ``delta`` (float) and ``accountant`` (str) say the only privacy settings it trains under;
- ``ledger`` (str): the file where the client records the privacy it has spent (written
  before every DP round it trains, read back when it starts again; never sent);
- ``worker-socket`` (str, optional): the resident worker's Unix socket (absent with
  ``--no-worker``: every message then runs in its own process, loading the model again);
- ``split-ca``, ``split-cert``, ``split-key``, ``split-client-id`` (str, optional): the CA
  certificate, this client's TLS certificate and key, and its id (``client-<i>``) for mutual
  TLS on the split-learning service (read by ``client.split_round.client_tls_from_node_config``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from fedft import supervise
from fedft.launch import (
    ChildProcess,
    DeployError,
    flower_env,
    free_port,
    program,
    split_address,
    terminate_as_interrupt,
)
from fedft.transport.flower_config import RUN_CONFIG_KEY
from fedft.transport.records import (
    ACCOUNTANT_KEY,
    DATA_KEY,
    DELTA_KEY,
    EPSILON_KEY,
    LEDGER_KEY,
    PARTITION_KEY,
    SPLIT_CA_KEY,
    SPLIT_CERT_KEY,
    SPLIT_ID_KEY,
    SPLIT_KEY_KEY,
    WORKER_KEY,
)

logger = logging.getLogger(__name__)

#: a SuperNode that ran this long before exiting had been admitted by the SuperLink.
ADMITTED_S = 30.0


@dataclass(frozen=True, kw_only=True)
class ClientPlan:
    """One edge client.

    Attributes:
        partition: the client index (``partition-id``), 0 <= partition.
        server: HOST:PORT of the SuperLink.
        root_cert: the CA certificate that signed the SuperLink's; None = plaintext.
        node_key: the client's OpenSSH private node key; None without node authentication.
        data_path: the client's own CSV/JSONL file, or None for a built-in partition.
        epsilon: the client's own privacy budget, or None for the run's.
        delta: the δ this client accounts at when it has its own budget.
        accountant: the analysis it accounts with when it has its own budget.
        ledger: the file of this client's privacy ledger (None = :func:`default_ledger`).
        runtime_port: local port of the SuperNode's ClientApp API (0 = any free one).
        max_wait_s: one-shot mode: give up after the server has been unreachable, or has
            refused this client, for this many seconds (0 = never). Ignored by a service.
        service: service mode: never exit on its own (only on SIGTERM/SIGINT); when the
            server finishes or goes away, say so once and wait quietly for it (or for the
            next run). False (one-shot): exit once the run is over or the server is gone.
        rounds: the run's number of rounds (``federation.rounds``): a one-shot client that
            trained the last round and then loses the server knows the run finished.
            0 = unknown.
        state_dir: FLWR_HOME of this SuperNode (None = a temporary folder, removed after).
        split_cert: this client's TLS certificate (``client-<i>.crt``, CN ``client-<i>``) for
            mutual TLS on the split service; its CA is ``root_cert``. None = no split mTLS.
        split_key: the certificate's private key (``client-<i>-tls.key``).
        worker: keep a resident worker holding the model and data across rounds (False:
            every message loads them again in the process Flower starts for it).
        threads: CPU threads of this client's training (``OMP_NUM_THREADS`` of the worker
            and of every ClientApp process); 0 = torch's default, every core. Clients that
            share a machine should each get their share.
        warm_config: the run's configuration as ``fedft client`` read it (RunConfig JSON):
            the worker loads its model and this client's data before the first round
            ("" = on the first message).
    """

    partition: int
    server: str
    root_cert: Path | None = None
    node_key: Path | None = None
    data_path: Path | None = None
    epsilon: float | None = None
    delta: float = 1e-5
    accountant: str = "prv"
    ledger: Path | None = None
    runtime_port: int = 0
    max_wait_s: float = 0.0
    service: bool = False
    rounds: int = 0
    state_dir: Path | None = None
    split_cert: Path | None = None
    split_key: Path | None = None
    worker: bool = True
    threads: int = 0
    warm_config: str = ""

    def __post_init__(self) -> None:
        split_address(self.server)
        if self.partition < 0:
            raise DeployError(f"--partition {self.partition}: a client index >= 0")
        if self.threads < 0:
            raise DeployError(f"--threads {self.threads}: a number of threads >= 1 (0: all cores)")
        if self.epsilon is not None and not self.epsilon > 0:
            raise DeployError(f"--epsilon {self.epsilon}: a privacy budget > 0 (e.g. 3.0)")
        for name, path in (
            ("--certs CA", self.root_cert),
            ("--key", self.node_key),
            ("--data", self.data_path),
            ("split certificate", self.split_cert),
            ("split key", self.split_key),
        ):
            if path is not None and not path.is_file():
                raise DeployError(f"{name}: {path} is not a file")
        if not 0 < self.delta < 1:
            raise DeployError(f"--delta {self.delta}: a probability in (0, 1), e.g. 1e-5")
        if self.accountant not in ("prv", "rdp"):
            raise DeployError(f"--accountant {self.accountant!r}: 'prv' or 'rdp'")
        in_node_config = [("--data", self.data_path), ("--ledger", self.ledger_path)]
        if self.split_cert is not None:
            in_node_config += [
                ("--certs CA", self.root_cert),
                ("split certificate", self.split_cert),
                ("split key", self.split_key),
            ]
        for name, path in in_node_config:  # quoted inside --node-config
            if path is not None and any(c in str(path.resolve()) for c in "\"'\\"):
                raise DeployError(f"{name} {path}: the path may not contain quotes")
        if (self.split_cert is None) != (self.split_key is None):
            raise DeployError("split mutual TLS needs both the client certificate and its key")
        if self.split_cert is not None and self.root_cert is None:
            raise DeployError("split mutual TLS needs the CA certificate (--certs DIR/ca.crt)")
        if self.node_key is not None and self.root_cert is None:
            raise DeployError("a node key needs TLS (Flower refuses node auth in plaintext)")

    @property
    def ledger_path(self) -> Path:
        """Where this client's privacy ledger lives."""
        return self.ledger if self.ledger is not None else default_ledger(self.partition)


def client_env(plan: ClientPlan, state: Path) -> dict[str, str]:
    """The environment of the SuperNode and the worker (:func:`flower_env`, and the thread
    count when ``plan.threads`` is set)."""
    env = flower_env(state)
    if plan.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(plan.threads)
    return env


def default_ledger(partition: int) -> Path:
    """``$XDG_STATE_HOME/fedft/ledger-client-<N>.json`` (``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedft" / f"ledger-client-{partition}.json"


def node_config(plan: ClientPlan, *, worker_socket: Path | None = None) -> str:
    """The ``--node-config`` string: ``partition-id=N ledger="..." [data-path="..."]
    [epsilon=E delta=D accountant="..."] [worker-socket="..."]``."""
    parts = [f"{PARTITION_KEY}={plan.partition}", f'{LEDGER_KEY}="{plan.ledger_path.resolve()}"']
    if worker_socket is not None:
        parts.append(f'{WORKER_KEY}="{worker_socket}"')
    if plan.data_path is not None:
        parts.append(f'{DATA_KEY}="{plan.data_path.resolve()}"')
    if plan.epsilon is not None:
        parts.append(f"{EPSILON_KEY}={float(plan.epsilon)!r}")
        parts.append(f"{DELTA_KEY}={float(plan.delta)!r}")
        parts.append(f'{ACCOUNTANT_KEY}="{plan.accountant}"')
    if plan.root_cert is not None:
        # TLS on: the split channel is mutual TLS or nothing. Without this client's split
        # certificate only the CA goes in, and a split round refuses to dial in plaintext.
        parts.append(f'{SPLIT_CA_KEY}="{plan.root_cert.resolve()}"')
        if plan.split_cert is not None and plan.split_key is not None:
            parts += [
                f'{SPLIT_CERT_KEY}="{plan.split_cert.resolve()}"',
                f'{SPLIT_KEY_KEY}="{plan.split_key.resolve()}"',
                f'{SPLIT_ID_KEY}="{split_client_name(plan.partition)}"',
            ]
    return " ".join(parts)


def split_client_name(partition: int) -> str:
    """The certificate identity client ``partition`` declares: ``client-<partition>``
    (``fedft.certs.client_name``)."""
    return f"client-{partition}"


def split_tls_files(certs: Path, partition: int) -> tuple[Path, Path] | tuple[None, None]:
    """``(certs/client-<i>.crt, certs/client-<i>-tls.key)`` when both exist, else (None, None):
    the split service's mutual-TLS files ``fedft certs`` made for client ``partition``."""
    name = split_client_name(partition)
    cert, key = certs / f"{name}.crt", certs / f"{name}-tls.key"
    return (cert, key) if cert.is_file() and key.is_file() else (None, None)


def supernode_argv(
    plan: ClientPlan, *, runtime_port: int, worker_socket: Path | None = None
) -> list[str]:
    """The ``flower-supernode`` command line for ``plan`` (its messages handed to the
    worker at ``worker_socket`` when given)."""
    argv = [
        program("flower-supernode"),
        "--superlink",
        plan.server,
        "--node-config",
        node_config(plan, worker_socket=worker_socket),
        "--host",
        "127.0.0.1",
        "--port",
        str(runtime_port),
    ]
    if plan.root_cert is None:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", str(plan.root_cert.resolve())]
    if plan.node_key is not None:
        argv += ["--auth-supernode-private-key", str(plan.node_key.resolve())]
    if plan.max_wait_s > 0 and not plan.service:
        argv += ["--max-wait-time", str(plan.max_wait_s)]
    return argv


#: exit status of a one-shot client whose run finished (it trained the last round, then the
#: server closed), and after SIGTERM/SIGINT
EXIT_DONE = 0
#: exit status of a one-shot client whose server went away before the run's last round and
#: did not come back within ``max_wait_s`` (EX_TEMPFAIL: start it again with the server)
EXIT_SERVER_GONE = 75

_RETRY_LINE = "Connection attempt failed, retrying"
_BACK_LINES = ("Connection successful after", "Receiving:", "SuperNode ID:")
_ROUND_LINE = re.compile(r"\[RUN \d+, ROUND (\d+)\]")


class NodeWatch:
    """Reads a SuperNode's output: passes it on without Flower's endless retry warnings,
    and keeps what it says about the server (admitted, last round, unreachable since)."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink
        self.admitted = False
        self.last_round = 0
        self.hidden = 0  # retry warnings not passed on
        self.announced = False  # the current outage was reported
        self._unreachable_since: float | None = None
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        """One line of the SuperNode's output."""
        with self._lock:
            if _RETRY_LINE in line:
                if self._unreachable_since is None:
                    self._unreachable_since = time.monotonic()
                self.hidden += 1
                return  # run_client reports an outage once, in its own words
            if any(mark in line for mark in _BACK_LINES):
                self._unreachable_since = None
                self.admitted = self.admitted or "SuperNode ID:" in line
            if (m := _ROUND_LINE.search(line)) is not None:
                self.last_round = max(self.last_round, int(m.group(1)))
        self.sink(line)

    def unreachable_s(self) -> float | None:
        """Seconds since the server stopped answering (None while it answers)."""
        with self._lock:
            since = self._unreachable_since
        return None if since is None else time.monotonic() - since


class _Sink:
    """Where the SuperNode's lines go: a log file (appended) or this process's stdout."""

    def __init__(self, log_path: Path | None) -> None:
        self._file: IO[str] | None = None
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(self, line: str) -> None:
        out = self._file if self._file is not None else sys.stdout
        out.write(line + "\n")
        out.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _verdict(watch: NodeWatch, plan: ClientPlan) -> int | None:
    """What the server's absence means now: an exit status, or None to carry on.

    One-shot: the run is over (the last round trained, then the server closed): EXIT_DONE;
    gone for ``max_wait_s`` after this client was admitted: EXIT_SERVER_GONE. A service
    never ends here. Each outage is reported once, and its end too.
    """
    gone = watch.unreachable_s()
    if gone is None:
        if watch.announced:
            logger.warning("the server at %s answers again", plan.server)
            watch.announced = False
        return None
    finished = bool(plan.rounds) and watch.admitted and watch.last_round >= plan.rounds
    if finished and not plan.service:
        logger.warning(
            "the run is over (this client trained up to round %d of %d) and the server at %s "
            "has closed; exiting",
            watch.last_round,
            plan.rounds,
            plan.server,
        )
        return EXIT_DONE
    if not watch.announced:
        waiting = (
            "waiting quietly for it (service mode)"
            if plan.service
            else f"waiting up to {plan.max_wait_s:.0f} s for it to come back"
            if plan.max_wait_s > 0
            else "waiting for it to come back"
        )
        state = f"after round {watch.last_round}" if watch.admitted else "before admitting us"
        logger.warning("the server at %s does not answer (%s); %s", plan.server, state, waiting)
        watch.announced = True
    if not plan.service and watch.admitted and 0 < plan.max_wait_s <= gone:
        logger.error(
            "the server at %s has been gone for %.0f s, before the run's last round; exiting "
            "with status %d (start this client again when the server is back, or run it "
            "with --service)",
            plan.server,
            gone,
            EXIT_SERVER_GONE,
        )
        return EXIT_SERVER_GONE
    return None


#: a worker that ran this long before dying is started again at once (else after a backoff)
WORKER_STEADY_S = 60.0


class WorkerKeeper:
    """The client's resident worker (``client/worker.py``): started, started again when it
    dies (at once after a long life, else after a backoff doubling up to 60 s), stopped.

    Its socket lives in a private folder (``mkdtemp``: mode 0700) made here and removed by
    :meth:`close`. A message the worker was handling when it died is tried once more by the
    ClientApp with the restarted worker (``client/worker_link.py``), then refused.
    """

    def __init__(self, plan: ClientPlan, env: dict[str, str], sink: Callable[[str], None]):
        self.plan, self.env, self.sink = plan, env, sink
        self.dir = Path(tempfile.mkdtemp(prefix=f"fedft-worker-{plan.partition}-"))
        self.socket = self.dir / "worker.sock"
        self.argv = [sys.executable, "-m", "client.worker", "--socket", str(self.socket)]
        if plan.warm_config:
            node = {PARTITION_KEY: plan.partition}
            if plan.data_path is not None:
                node[DATA_KEY] = str(plan.data_path.resolve())  # type: ignore[assignment]
            spec = {"run_config": {RUN_CONFIG_KEY: plan.warm_config}, "node_config": node}
            warm = self.dir / "warm.json"
            warm.write_text(json.dumps(spec), encoding="utf-8")
            self.argv += ["--warm", str(warm)]
        self.proc: ChildProcess | None = None
        self.started = 0.0
        self.backoff_s = 2.0
        self.restarts = 0

    def start(self) -> None:
        """Start a worker."""
        self.proc = ChildProcess(
            name=f"fedft-worker[{self.plan.partition}]",
            argv=self.argv,
            log_path=None,
            env=self.env,
            on_line=lambda line: self.sink(f"[worker] {line}"),
        ).start()
        self.started = time.monotonic()

    def check(self) -> None:
        """Start the worker again if it died (and its backoff has passed)."""
        if self.proc is None or self.proc.alive():
            return
        lived = time.monotonic() - self.started
        if lived < self.backoff_s:
            return
        code = self.proc.stop(grace_s=1.0)
        self.backoff_s = 2.0 if lived > WORKER_STEADY_S else min(self.backoff_s * 2, 60.0)
        self.restarts += 1
        logger.warning(
            "the worker (pid %d) exited with code %s; starting it again (restart %d)",
            self.proc.pid,
            code,
            self.restarts,
        )
        self.start()

    def close(self) -> None:
        """Stop the worker and remove its folder."""
        if self.proc is not None:
            self.proc.stop(grace_s=5.0)
        shutil.rmtree(self.dir, ignore_errors=True)


def _run_node(
    node: ChildProcess,
    watch: NodeWatch,
    plan: ClientPlan,
    poll_s: float,
    keeper: WorkerKeeper | None,
) -> int | None:
    """Start ``node`` and follow it until it exits (None) or :func:`_verdict` ends the
    client (its exit status); the SuperNode and what it started are stopped either way.
    Meanwhile the worker is kept alive."""
    node.start()
    try:
        while node.alive():
            if (verdict := _verdict(watch, plan)) is not None:
                return verdict
            if keeper is not None:
                keeper.check()
            time.sleep(poll_s)
        return _verdict(watch, plan)
    finally:
        node.stop(grace_s=2.0)


def _serve(
    plan: ClientPlan,
    state: Path,
    sink: _Sink,
    keeper: WorkerKeeper | None,
    *,
    retry_s: float,
    poll_s: float,
) -> int:
    """Run the SuperNode, starting it again when it exits, until a verdict or a give-up."""
    port = plan.runtime_port or free_port()
    watch = NodeWatch(sink.write)
    failing_since: float | None = None
    warned = False
    socket_path = keeper.socket if keeper is not None else None
    while True:
        node = ChildProcess(
            name=f"flower-supernode[{plan.partition}]",
            argv=supernode_argv(plan, runtime_port=port, worker_socket=socket_path),
            log_path=None,
            env=client_env(plan, state),
            on_line=watch.feed,
        )
        started = time.monotonic()
        if (verdict := _run_node(node, watch, plan, poll_s, keeper)) is not None:
            return verdict
        code = node.proc.returncode if node.proc is not None else 1
        now = time.monotonic()
        if failing_since is None or now - started > ADMITTED_S:
            failing_since = started  # it had been admitted: a new outage begins
            warned = False
        if not plan.service and plan.max_wait_s > 0 and now - failing_since >= plan.max_wait_s:
            logger.error(
                "the SuperNode kept exiting for %.0f s (last code %d: refused, or no server); "
                "giving up",
                now - failing_since,
                code,
            )
            return code or 1
        # once per outage, then quietly
        (logger.debug if warned else logger.warning)(
            "the SuperNode exited with code %d (refused, or the server is gone or restarted); "
            "starting it again every %.0f s%s",
            code,
            retry_s,
            f" (giving up after {plan.max_wait_s:.0f} s)"
            if plan.max_wait_s and not plan.service
            else "",
        )
        warned = True
        time.sleep(retry_s)


def run_client(
    plan: ClientPlan, *, log_path: Path | None = None, retry_s: float = 5.0, poll_s: float = 0.5
) -> int:
    """Run this client's SuperNode until the run is over (one-shot), or until SIGTERM/SIGINT.

    A SuperNode exits when the SuperLink refuses it (its key is not registered yet: a client
    may start before the server has registered the keys) or forgets it (a restarted
    SuperLink); both heal by starting it again. When the server stops answering, the client
    says so once (Flower's own retry warnings are not passed on) and, one-shot, exits when
    the run is over or the server stays gone; as a service (``plan.service``) it waits
    quietly. With ``plan.worker`` it keeps a resident worker holding the model and data
    across rounds (:class:`WorkerKeeper`). Everything it starts is owned
    (:mod:`fedft.supervise`): nothing outlives it.

    Args:
        plan: the client.
        log_path: where the SuperNode's output goes (None = this process's stdout).
        retry_s: seconds between restarts of an exited SuperNode.
        poll_s: seconds between looks at the SuperNode.

    Returns:
        EXIT_DONE (0) when the run is over, or after a requested stop; EXIT_SERVER_GONE (75)
        when the server went away before the run's last round and stayed away
        ``plan.max_wait_s`` seconds; the SuperNode's last exit code (non-zero) when it was
        refused or could not connect for ``plan.max_wait_s`` seconds (e.g. an unregistered
        node key, or a plaintext client on a TLS server).
    """
    state = plan.state_dir or Path(tempfile.mkdtemp(prefix=f"fedft-client-{plan.partition}-"))
    state.mkdir(parents=True, exist_ok=True)
    supervise.become_subreaper()
    guardian = supervise.Guardian(state / "processes.json" if plan.state_dir else None)
    sink = _Sink(log_path)
    keeper: WorkerKeeper | None = None
    with terminate_as_interrupt():
        try:
            if plan.worker:
                keeper = WorkerKeeper(plan, client_env(plan, state), sink.write)
                keeper.start()
            return _serve(plan, state, sink, keeper, retry_s=retry_s, poll_s=poll_s)
        except KeyboardInterrupt:
            logger.info("stopped; the SuperNode, the worker and everything they started are gone")
            return EXIT_DONE
        finally:
            if keeper is not None:
                keeper.close()
            guardian.close()
            sink.close()
            if plan.state_dir is None:
                shutil.rmtree(state, ignore_errors=True)
