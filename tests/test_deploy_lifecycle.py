"""Kill and resume a real deployment on loopback: nothing is left behind, the run ends right.

`fedft server` (Flower SuperLink -> flower-superexec -> flwr-serverapp) and two `fedft client`
(SuperNode -> flower-superexec -> flwr-clientapp), plaintext, a tiny config-built model,
2 clients x 2 rounds. A recorder thread lists every process below each command by PID (and
start time) while it runs; after a kill the test counts which of those PIDs still run.
Every test stops only the processes it started (by PID).

Kill points:

1. before submit: the server is killed (SIGKILL) as soon as its SuperLink runs; nothing of
   it survives, and the next server in the same folder starts without a hand kill;
2. during the checkpoint write (CI): the ServerApp is frozen between the two renames that
   swap round 2's checkpoint in (tests/fault_hooks), and the server and client 1 are killed
   there (SIGKILL); nothing of either survives; client 1 is started again, `fedft server
   --resume` continues on the same port, and the final adapter equals an uninterrupted run's
   (in-process, same config) within 1e-6;
3. mid-round 2 (slow): round 1 checkpointed, clients training round 2; the same checks.

SIGTERM (what Docker and systemd send) stops a server or a client and everything it started.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from local_grid import LocalGrid
from safetensors.torch import load_file
from test_deploy import Proc, _rows, _wait_for

from fedft import supervise
from fedft.config import load_config
from server.deploy import free_port
from server.federation import run_federation

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")
RUN_TIMEOUT_S = 600
HOOKS = Path(__file__).resolve().parent / "fault_hooks"


class TreeRecorder:
    """Every process at or below some root PIDs, recorded (PID -> start ticks) while alive."""

    def __init__(self) -> None:
        self.roots: set[int] = set()
        self.seen: dict[int, dict[int, int]] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def watch(self, pid: int) -> None:
        with self._lock:
            self.roots.add(pid)
            self.seen.setdefault(pid, {})
        self.poll()

    def poll(self) -> None:
        table = supervise.scan()
        with self._lock:
            for root in self.roots:
                for pid in {root} | supervise.descendants([root], table):
                    if pid in table and not table[pid].zombie:
                        self.seen[root].setdefault(pid, table[pid].start_ticks)

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.poll()

    def alive(self, root: int) -> list[str]:
        """The recorded processes of ``root`` that still run: "pid program"."""
        left = []
        with self._lock:
            recorded = dict(self.seen.get(root, {}))
        for pid, start in recorded.items():
            info = supervise.read_proc(pid)
            if info is not None and not info.zombie and info.start_ticks == start:
                left.append(f"{pid} {' '.join(supervise.cmdline(pid))[:120]}")
        return left

    def programs(self, root: int) -> set[str]:
        with self._lock:
            return {supervise._program(p) for p in self.seen.get(root, {})} - {""}

    def wait_gone(self, root: int, timeout: float = 30.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while (left := self.alive(root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        return left

    def close(self) -> None:
        """Stop recording; SIGKILL whatever recorded process a failed test left running."""
        self._stop.set()
        self._thread.join()
        for root in list(self.seen):
            for line in self.alive(root):
                try:
                    os.kill(int(line.split()[0]), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _cfg_file(path: Path, model_dir: str) -> Path:
    path.write_text(
        "\n".join(
            [
                'name = "kill-test"',
                "seed = 0",
                "[model]",
                f"name = {json.dumps(model_dir)}",
                "[data]",
                "max_train_examples = 80",
                "test_size = 16",
                "public_size = 8",
                'partition = "iid"',
                "[federation]",
                "num_clients = 2",
                "clients_per_round = 2",
                "rounds = 2",
                "local_steps = 1",
                "batch_size = 4",
                'device = "cpu"',
                "[adapter]",
                "rank = 2",
            ]
        )
        + "\n"
    )
    return path


def _server(
    tag: str, cfg: Path, out: Path, port: int, logs: Path, *extra: str, freeze_round: int = 0
) -> Proc:
    """A `fedft server`; with ``freeze_round``, its ServerApp stops itself in the middle of
    that round's checkpoint write (tests/fault_hooks/sitecustomize.py)."""
    args = ["server", str(cfg), "--out", str(out), "--insecure"]
    env = None
    if freeze_round:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HOOKS), env.get("PYTHONPATH", "")])
        env["FEDFT_TEST_FREEZE_CHECKPOINT"] = str(freeze_round)
    return Proc.start(tag, [*args, "--address", f"127.0.0.1:{port}", *extra], logs, env=env)


def _client(tag: str, cfg: Path, i: int, port: int, logs: Path) -> Proc:
    """A `fedft client` in service mode: it waits for a server that went away to come back."""
    args = ["client", str(cfg), "--partition", str(i), "--insecure", "--service"]
    return Proc.start(tag, [*args, "--server", f"127.0.0.1:{port}"], logs)


def _assert_same_as_uninterrupted(cfg_path: Path, out: Path, ref_out: Path) -> float:
    """The resumed run's rows and adapter equal an uninterrupted in-process run's (≤ 1e-6)."""
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    cfg = load_config(str(cfg_path), [])
    run_federation(LocalGrid(cfg), cfg, ref_out, progress=False)
    ref = load_file(str(ref_out / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    diff = max(float((ref[k] - got[k]).abs().max()) for k in ref)
    assert diff <= 1e-6, diff
    torch.testing.assert_close(
        torch.tensor(rows[2]["loss"]), torch.tensor(_rows(ref_out)[2]["loss"]), atol=1e-6, rtol=0
    )
    return diff


def _sigterm_leaves_nothing(recorder: TreeRecorder, proc: Proc, *, code: int) -> None:
    """SIGTERM ``proc``: it exits with ``code`` and nothing it started runs on."""
    assert recorder.programs(proc.proc.pid), "nothing recorded"
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(timeout=60) == code, proc.text()[-2000:]
    assert recorder.wait_gone(proc.proc.pid) == []


@pytest.fixture
def recorder():
    rec = TreeRecorder()
    yield rec
    rec.close()


def test_killed_during_checkpoint_write_leaves_nothing_and_resumes_exactly(
    tiny_bert_dir, tmp_path, recorder
):
    cfg_path = _cfg_file(tmp_path / "run.toml", tiny_bert_dir)
    out, port, logs = tmp_path / "run", free_port(), tmp_path
    t0 = time.monotonic()
    procs: list[Proc] = []
    try:
        server = _server("server-1", cfg_path, out, port, logs, freeze_round=2)
        clients = [_client(f"client-{i}", cfg_path, i, port, logs) for i in range(2)]
        procs += [server, *clients]
        for p in (server, *clients):
            recorder.watch(p.proc.pid)
        frozen = out / "frozen-at-checkpoint-write"
        _wait_for(frozen.is_file, RUN_TIMEOUT_S, "round 2's checkpoint write")
        recorder.poll()
        assert {"flwr-serverapp", "flower-superlink"} <= recorder.programs(server.proc.pid)
        # the crash: round 2's checkpoint half swapped in (the old one moved aside)
        assert not (out / "checkpoint").exists()
        assert json.loads((out / ".checkpoint.old" / "state.json").read_text())["round"] == 1
        server.proc.kill()
        clients[1].proc.kill()
        server.proc.wait()
        clients[1].proc.wait()
        assert recorder.wait_gone(server.proc.pid) == []
        assert recorder.wait_gone(clients[1].proc.pid) == []
        assert [r["round"] for r in _rows(out)] == [0, 1]

        # resume on the same port, client 1 started again: no hand kill anywhere
        clients.append(_client("client-1b", cfg_path, 1, port, logs))
        resumed = _server("server-2", cfg_path, out, port, logs, "--resume")
        procs += [clients[-1], resumed]
        recorder.watch(resumed.proc.pid)
        recorder.watch(clients[-1].proc.pid)
        assert resumed.wait(RUN_TIMEOUT_S) == 0, resumed.text()[-3000:]
        assert recorder.wait_gone(resumed.proc.pid) == []
        for c in (clients[0], clients[-1]):  # service clients stop on SIGTERM, with exit 0
            _sigterm_leaves_nothing(recorder, c, code=0)
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL)
    run_s = time.monotonic() - t0
    diff = _assert_same_as_uninterrupted(cfg_path, out, tmp_path / "reference")
    print(f"adapter max |resumed - uninterrupted| = {diff:.3g}; deployed part {run_s:.0f} s")


def test_server_killed_before_submit_or_stopped_leaves_nothing(tiny_bert_dir, tmp_path, recorder):
    """SIGKILL before the run is submitted, then SIGTERM once it runs (no client joins):
    each time nothing the server started survives, and the second server needs no hand
    kill of the first one's leftovers."""
    cfg_path = _cfg_file(tmp_path / "run.toml", tiny_bert_dir)
    out, port, logs = tmp_path / "run", free_port(), tmp_path
    procs: list[Proc] = []
    try:
        early = _server("server-0", cfg_path, out, port, logs)
        procs.append(early)
        recorder.watch(early.proc.pid)
        _wait_for(lambda: (out / ".superlink" / "superlink.pid").is_file(), 120, "a SuperLink")
        recorder.poll()
        early.proc.kill()
        early.proc.wait()
        assert recorder.wait_gone(early.proc.pid) == []

        server = _server("server-1", cfg_path, out, port, logs)
        procs.append(server)
        recorder.watch(server.proc.pid)
        _wait_for(
            lambda: "flwr-serverapp" in recorder.programs(server.proc.pid),
            RUN_TIMEOUT_S,
            "the ServerApp",
        )
        _sigterm_leaves_nothing(recorder, server, code=1)  # 1: the run did not finish
        assert "interrupted" in server.text()
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL)


@pytest.mark.slow
def test_killed_mid_round_leaves_nothing_and_resumes_exactly(tiny_bert_dir, tmp_path, recorder):
    cfg_path = _cfg_file(tmp_path / "run.toml", tiny_bert_dir)
    out, port, logs = tmp_path / "run", free_port(), tmp_path
    procs: list[Proc] = []
    try:
        server = _server("server-1", cfg_path, out, port, logs)
        clients = [_client(f"client-{i}", cfg_path, i, port, logs) for i in range(2)]
        procs += [server, *clients]
        for p in (server, *clients):
            recorder.watch(p.proc.pid)
        ckpt = out / "checkpoint" / "state.json"
        _wait_for(lambda: ckpt.is_file(), RUN_TIMEOUT_S, "round 1's checkpoint")
        _wait_for(
            lambda: (
                "flwr-clientapp" in recorder.programs(clients[1].proc.pid)
                and clients[1].text().count("train message") >= 2
            ),
            RUN_TIMEOUT_S,
            "client 1 to train in round 2",
        )
        assert {"flwr-serverapp", "flower-superlink"} <= recorder.programs(server.proc.pid)
        server.proc.kill()
        clients[1].proc.kill()
        server.proc.wait()
        clients[1].proc.wait()
        assert recorder.wait_gone(server.proc.pid) == []
        assert recorder.wait_gone(clients[1].proc.pid) == []
        assert json.loads(ckpt.read_text())["round"] == 1

        clients.append(_client("client-1b", cfg_path, 1, port, logs))
        resumed = _server("server-2", cfg_path, out, port, logs, "--resume")
        procs += [clients[-1], resumed]
        recorder.watch(resumed.proc.pid)
        recorder.watch(clients[-1].proc.pid)
        assert resumed.wait(RUN_TIMEOUT_S) == 0, resumed.text()[-3000:]
        assert recorder.wait_gone(resumed.proc.pid) == []
        for c in (clients[0], clients[-1]):
            _sigterm_leaves_nothing(recorder, c, code=0)
    finally:
        for p in reversed(procs):
            p.stop(signal.SIGKILL)
    _assert_same_as_uninterrupted(cfg_path, out, tmp_path / "reference")
