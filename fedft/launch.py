"""Flower's programs as children that ``fedft server`` and ``fedft client`` own.

What both commands share to start ``flower-superlink`` / ``flower-supernode``: the environment
they run in (offline, a private ``FLWR_HOME``), where the programs are, :class:`ChildProcess`
(own session, a parent-death signal, stopped with everything it started: see
:mod:`fedft.supervise`), SIGTERM/SIGHUP turned into a clean stop, and address and port helpers.
Nothing here imports Flower: the programs are run by path.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from fedft import supervise

logger = logging.getLogger(__name__)


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and what to do."""


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower's programs.

    Offline, no telemetry, no update check, no ``uv sync`` at run time, this interpreter's
    ``bin`` first on PATH (the SuperLink and SuperNode start ``flower-superexec`` by name).
    """
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def program(name: str) -> str:
    """Absolute path of a Flower program installed next to this interpreter."""
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"{name!r} not found; install the pinned flwr (make install)")
    return found


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM, SIGHUP and SIGINT raise KeyboardInterrupt.

    So ``finally`` clauses stop the children, which run in sessions of their own. SIGINT is
    set too because a process started in the background by a shell script inherits SIGINT
    *ignored* (and Python then leaves it ignored), so ``kill -INT`` would not stop it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    stops = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    previous = {sig: signal.signal(sig, _raise) for sig in stops}
    # a parent may have left these blocked (the mask is inherited across fork and exec): a
    # handler never runs for a blocked signal, and the process would not stop
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(stops))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class ChildProcess:
    """A child started in its own session, stopped by PID.

    Its output goes to ``on_line`` (each line, decoded, from a reader thread) when that is
    set, else to ``log_path`` (appended) or, when that is None too, to our own stdout/stderr.
    """

    name: str
    argv: list[str]
    log_path: Path | None
    env: dict[str, str]
    on_line: Callable[[str], None] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _reader: threading.Thread | None = field(default=None, init=False, repr=False)
    #: the child as started: the leader of the session everything it starts inherits
    record: supervise.ProcRecord | None = field(default=None, init=False)

    def start(self) -> ChildProcess:
        """Start the child (with a parent-death signal: it dies with this process)."""
        kwargs: dict[str, Any] = {
            "stdin": subprocess.DEVNULL,
            "env": self.env,
            "start_new_session": True,
            "preexec_fn": supervise.parent_death_signal(),
        }
        if self.on_line is not None:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                self.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
            )
            self._reader = threading.Thread(
                target=self._read, args=(self.proc.stdout, self.on_line), daemon=True
            )
            self._reader.start()
        elif self.log_path is None:
            self.proc = subprocess.Popen(self.argv, **kwargs)  # noqa: S603 - fixed argv
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log_file:
                self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                    self.argv, stdout=log_file, stderr=subprocess.STDOUT, **kwargs
                )
        supervise.adopt_popen(self.proc.pid)
        self.record = supervise.ProcRecord.of(self.proc.pid)
        logger.info(
            "started %s (pid %d); output: %s",
            self.name,
            self.proc.pid,
            self.log_path or "this terminal",
        )
        return self

    @staticmethod
    def _read(stream: IO[bytes] | None, on_line: Callable[[str], None]) -> None:
        """Hand every line of ``stream`` to ``on_line`` until it closes.

        It closes when everything that holds the pipe (the child and what it started) exited.
        """
        if stream is None:
            return
        with stream:
            for raw in stream:
                on_line(raw.decode("utf-8", errors="replace").rstrip("\n"))

    @property
    def pid(self) -> int:
        """The child's PID (raises if not started)."""
        if self.proc is None:
            raise DeployError(f"{self.name} was never started")
        return self.proc.pid

    def alive(self) -> bool:
        """True while the child runs."""
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit; its exit code."""
        if self.proc is None:
            raise DeployError(f"{self.name} was never started")
        return self.proc.wait(timeout=timeout)

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines of the child's log ("" without a log file)."""
        if self.log_path is None:
            return ""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, *, grace_s: float = 10.0) -> int | None:
        """SIGTERM the child, give it ``grace_s`` seconds, then kill what it started.

        That is everything still there: its session, the sessions its descendants opened
        (the SuperLink starts ``flower-superexec`` in a session of its own, which starts the
        ServerApp) and their descendants. Returns the child's exit code.
        """
        if self.proc is None:
            return None
        tree = supervise.snapshot(self.proc.pid)
        if self.record is not None:  # its session outlives it (e.g. a SuperExec it left)
            tree.sessions.append(self.record)
        if self.proc.poll() is None:
            logger.info("stopping %s (pid %d)", self.name, self.pid)
        supervise.stop(tree, grace_s=grace_s, term=[self.proc.pid])
        try:
            self.proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        supervise.release_popen(self.proc.pid)
        if self._reader is not None:  # its last lines (the pipe closed with the tree)
            self._reader.join(timeout=grace_s)
        logger.info("%s (pid %d) exited with %s", self.name, self.pid, self.proc.returncode)
        return self.proc.returncode


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (bind to port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """True when ``host:port`` cannot be bound now (another program listens there)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def split_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> (host, port); IPv6 hosts in brackets (``"[::1]:9092"``)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address {address!r} is not HOST:PORT (e.g. 0.0.0.0:9092)")
    return host.strip("[]"), int(port)


def wait_for_port(host: str, port: int, *, child: ChildProcess, timeout_s: float) -> None:
    """Block until ``host:port`` accepts TCP connections; fail if ``child`` dies first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not child.alive():
            raise DeployError(
                f"{child.name} exited with code {child.proc.returncode if child.proc else '?'}"
                f" before listening on {host}:{port}:\n{child.log_tail()}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise DeployError(f"{child.name} did not listen on {host}:{port} within {timeout_s:.0f} s")
