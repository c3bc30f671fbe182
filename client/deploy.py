"""The ``fedft client`` recipe: start one Flower SuperNode for one edge client and wait.

The SuperNode connects to the SuperLink over TLS (verified against the deployment's CA),
authenticates with the client's ECDSA P-384 node key, and runs ``client.app:app`` from the
run's Flower App Bundle for every message it gets. What this client is, it says in its
node config (read by ``client/app.py`` through ``context.node_config``):

- ``partition-id`` (int): the client index (which partition of a built-in dataset);
- ``data-path`` (str, optional): the client's own CSV/JSONL file;
- ``epsilon`` (float, optional): this client's own sample-level privacy budget; with it,
  ``delta`` (float) and ``accountant`` (str) say the only privacy settings it trains under;
- ``ledger`` (str): the file where the client records the privacy it has spent (written
  before every DP round it trains, read back when it starts again; never sent);
- ``split-ca``, ``split-cert``, ``split-key``, ``split-client-id`` (str, optional): the CA
  certificate, this client's TLS certificate and key, and its id (``client-<i>``) for mutual
  TLS on the split-learning service (read by ``client.split_round.client_tls_from_node_config``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fedft import supervise
from server.deploy import (
    ChildProcess,
    DeployError,
    flower_env,
    free_port,
    program,
    split_address,
    terminate_as_interrupt,
)

logger = logging.getLogger(__name__)

PARTITION_KEY, DATA_KEY, EPSILON_KEY = "partition-id", "data-path", "epsilon"
DELTA_KEY, ACCOUNTANT_KEY, LEDGER_KEY = "delta", "accountant", "ledger"
#: node-config keys of the split service's mutual TLS (same names as client/split_round.py).
SPLIT_CA_KEY, SPLIT_CERT_KEY, SPLIT_KEY_KEY, SPLIT_ID_KEY = (
    "split-ca",
    "split-cert",
    "split-key",
    "split-client-id",
)
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
        max_wait_s: give up after the SuperNode has kept failing (refused or unable to
            connect) for this many seconds (0 = never).
        state_dir: FLWR_HOME of this SuperNode (None = a temporary folder, removed after).
        split_cert: this client's TLS certificate (``client-<i>.crt``, CN ``client-<i>``) for
            mutual TLS on the split service; its CA is ``root_cert``. None = no split mTLS.
        split_key: the certificate's private key (``client-<i>-tls.key``).
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
    state_dir: Path | None = None
    split_cert: Path | None = None
    split_key: Path | None = None

    def __post_init__(self) -> None:
        split_address(self.server)
        if self.partition < 0:
            raise DeployError(f"--partition {self.partition}: a client index >= 0")
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


def default_ledger(partition: int) -> Path:
    """``$XDG_STATE_HOME/fedft/ledger-client-<N>.json`` (``~/.local/state`` by default)."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fedft" / f"ledger-client-{partition}.json"


def node_config(plan: ClientPlan) -> str:
    """The ``--node-config`` string: ``partition-id=N ledger="..." [data-path="..."]
    [epsilon=E delta=D accountant="..."]``."""
    parts = [f"{PARTITION_KEY}={plan.partition}", f'{LEDGER_KEY}="{plan.ledger_path.resolve()}"']
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


def supernode_argv(plan: ClientPlan, *, runtime_port: int) -> list[str]:
    """The ``flower-supernode`` command line for ``plan``."""
    argv = [
        program("flower-supernode"),
        "--superlink",
        plan.server,
        "--node-config",
        node_config(plan),
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
    if plan.max_wait_s > 0:
        argv += ["--max-wait-time", str(plan.max_wait_s)]
    return argv


def run_client(plan: ClientPlan, *, log_path: Path | None = None, retry_s: float = 5.0) -> int:
    """Run the SuperNode, restarting it when it exits, until SIGTERM/SIGINT or until it has
    kept failing for ``plan.max_wait_s``.

    A SuperNode exits when the SuperLink refuses it (its key is not registered yet: a client
    may start before the server has registered the keys) or forgets it (a restarted
    SuperLink); both heal by starting it again. A SuperNode that ran for a while before
    exiting had been admitted, so its failure clock starts afresh.

    Args:
        plan: the client.
        log_path: where the SuperNode's output goes (None = this process's stdout/stderr).
        retry_s: seconds between restarts.

    Returns:
        0 after a requested stop; the SuperNode's last exit code (non-zero) when it was
        refused for ``plan.max_wait_s`` seconds (e.g. an unregistered node key, or a
        plaintext client on a TLS SuperLink).
    """
    state = plan.state_dir or Path(tempfile.mkdtemp(prefix=f"fedft-client-{plan.partition}-"))
    state.mkdir(parents=True, exist_ok=True)
    port = plan.runtime_port or free_port()
    failing_since: float | None = None
    warned = False
    node: ChildProcess | None = None
    supervise.become_subreaper()
    record = state / "processes.json" if plan.state_dir is not None else None
    guardian = supervise.Guardian(record)
    with terminate_as_interrupt():
        try:
            while True:
                node = ChildProcess(
                    name=f"flower-supernode[{plan.partition}]",
                    argv=supernode_argv(plan, runtime_port=port),
                    log_path=log_path,
                    env=flower_env(state),
                )
                started = time.monotonic()
                code = node.start().wait()
                node.stop(grace_s=2.0)  # what the exited SuperNode left in its session
                now = time.monotonic()
                if failing_since is None or now - started > ADMITTED_S:
                    failing_since = started  # it had been admitted: a new outage begins
                    warned = False
                if plan.max_wait_s > 0 and now - failing_since >= plan.max_wait_s:
                    logger.error(
                        "the SuperNode kept exiting for %.0f s (last code %d); giving up\n%s",
                        now - failing_since,
                        code,
                        node.log_tail(),
                    )
                    return code or 1
                # once per outage, then quietly: a service waits for its server
                (logger.debug if warned else logger.warning)(
                    "the SuperNode exited with code %d (refused, or the server is gone or "
                    "restarted); starting it again every %.0f s until the server takes it%s",
                    code,
                    retry_s,
                    f" (giving up after {plan.max_wait_s:.0f} s)" if plan.max_wait_s else "",
                )
                warned = True
                time.sleep(retry_s)
        except KeyboardInterrupt:
            logger.info("stopping the SuperNode")
            return 0
        finally:
            if node is not None:
                node.stop()
            guardian.close()
            if plan.state_dir is None:
                shutil.rmtree(state, ignore_errors=True)
