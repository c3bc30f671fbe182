"""Process ownership with real processes: a command that dies, however it dies, leaves nothing.

The "owner" here is a small Python program shaped like ``fedft server``: it starts its children
with :class:`fedft.launch.ChildProcess` (parent-death signal, own session), and one child
starts a grandchild in a session of its own which starts a great-grandchild that ignores
SIGTERM, as the SuperLink -> flower-superexec -> flwr-serverapp chain does. The tests list the
whole tree by PID while it is alive and check that none of those PIDs is left afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedft import supervise

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

# A "SuperLink": starts a "superexec" in a new session, which starts a "serverapp" that ignores
# SIGTERM and SIGINT; with --orphan the superexec exits, leaving the serverapp to be reparented.
_CHAIN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    level = sys.argv[1]
    if level == "link":
        subprocess.Popen([sys.executable, __file__, "exec", *sys.argv[2:]],
                         start_new_session=True)
    elif level == "exec":
        subprocess.Popen([sys.executable, __file__, "app"])
        if "--orphan" in sys.argv:
            time.sleep(0.5)
            sys.exit(0)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        time.sleep(0.2)
    """
)

_OWNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from fedft import supervise
    from fedft.launch import ChildProcess, terminate_as_interrupt
    chain, record, extra = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    supervise.become_subreaper()
    guardian = supervise.Guardian(record)
    child = ChildProcess(name="link", argv=[sys.executable, chain, "link", *extra],
                         log_path=None, env=dict(__import__("os").environ))
    with terminate_as_interrupt():
        try:
            child.start()
            print("started", flush=True)
            while True:
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        finally:
            child.stop(grace_s=2.0)
            guardian.close()
    """
)


def _tree(root: int) -> dict[int, int]:
    """PID -> start ticks of ``root`` and everything below it now."""
    table = supervise.scan()
    pids = {root} | supervise.descendants([root], table)
    return {p: table[p].start_ticks for p in pids if p in table}


def _alive(recorded: dict[int, int]) -> list[int]:
    """Recorded PIDs still running as the same process (zombies count as gone)."""
    left = []
    for pid, start in recorded.items():
        info = supervise.read_proc(pid)
        if info is not None and not info.zombie and info.start_ticks == start:
            left.append(pid)
    return left


def _start_owner(
    tmp_path: Path, *extra: str, blocked: frozenset[int] = frozenset()
) -> tuple[subprocess.Popen, dict[int, int]]:
    chain = tmp_path / "chain.py"
    chain.write_text(_CHAIN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    owner = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(chain), str(tmp_path / "record.json"), *extra],
        env=env,
        stdout=subprocess.PIPE,
        start_new_session=True,
        # signals a parent left blocked stay blocked across exec
        preexec_fn=(lambda: signal.pthread_sigmask(signal.SIG_BLOCK, blocked)) if blocked else None,
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == b"started"
    recorded: dict[int, int] = {}
    deadline = time.monotonic() + 30
    # owner + guardian + link + exec + app (exec gone in the orphan case)
    want = 4 if "--orphan" in extra else 5
    while time.monotonic() < deadline:
        recorded.update(_tree(owner.pid))
        names = [supervise.cmdline(p) for p in _alive(recorded)]
        apps = [n for n in names if len(n) > 2 and n[2] == "app"]
        if apps and len(_alive(recorded)) >= want:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the tree never formed: {recorded}")
    recorded.update(_tree(owner.pid))
    _wait_recorded(tmp_path / "record.json", recorded, owner.pid)
    return owner, recorded


def _wait_recorded(path: Path, recorded: dict[int, int], owner: int, timeout: float = 60) -> None:
    """Wait until the guardian's record lists every live process below the owner (on a
    loaded machine its snapshots can lag behind the fixed interval)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {}
        guardian = (record.get("guardian") or {}).get("pid")
        listed = {int(p["pid"]) for p in record.get("processes", [])}
        if record and set(_alive(recorded)) - {owner, guardian} <= listed:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the guardian never recorded {recorded} (record: {record})")
        time.sleep(0.1)


def _wait_gone(recorded: dict[int, int], timeout: float = 60.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _alive(recorded)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _cleanup(recorded: dict[int, int]) -> None:
    for pid in _alive(recorded):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("orphan", [False, True], ids=["chain", "orphaned-app"])
def test_sigkilled_owner_leaves_no_process(tmp_path, orphan):
    owner, recorded = _start_owner(tmp_path, *(["--orphan"] if orphan else []))
    try:
        assert len(recorded) >= 4
        owner.kill()
        owner.wait()
        assert _wait_gone(recorded) == []
    finally:
        _cleanup(recorded)


@pytest.mark.parametrize("blocked", [False, True], ids=["", "blocked-by-parent"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_terminated_owner_stops_its_tree_itself(tmp_path, sig, blocked):
    # blocked: the parent left the signal blocked (a full CI run did, for SIGHUP); the owner
    # unblocks what it handles, else it never sees the signal and never stops
    owner, recorded = _start_owner(tmp_path, blocked=frozenset({sig}) if blocked else frozenset())
    try:
        owner.send_signal(sig)
        assert owner.wait(timeout=120) == 0  # bounds a hang; not a timing requirement
        assert owner.stdout is not None and b"interrupted" in owner.stdout.read()
        assert _wait_gone(recorded, timeout=30) == []
        record = json.loads((tmp_path / "record.json").read_text())
        assert record["guardian"] is None and record["processes"] == []
    finally:
        _cleanup(recorded)


def test_without_the_guardian_the_app_outlives_its_owner(tmp_path):
    """The control: what the guardian is for (SIGTERM-deaf app in another session)."""
    chain = tmp_path / "chain.py"
    chain.write_text(_CHAIN)
    link = subprocess.Popen([sys.executable, str(chain), "link"], start_new_session=True)
    recorded: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 30
        while len(recorded) < 3 and time.monotonic() < deadline:
            recorded.update(_tree(link.pid))
            time.sleep(0.2)
        os.killpg(link.pid, signal.SIGKILL)  # the link's own group: what stop() used to do
        link.wait()
        time.sleep(1.0)
        assert len(_alive(recorded)) == 2  # exec and app live on in their own session
    finally:
        _cleanup(recorded)


def test_reclaim_stops_recorded_leftovers_and_spares_reused_pids(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        rec = supervise.ProcRecord.of(sleeper.pid)
        other_rec = supervise.ProcRecord.of(other.pid)
        assert rec is not None and other_rec is not None
        # `other` under a different start time: a reused PID, not ours
        reused = supervise.ProcRecord(
            pid=other.pid,
            start_ticks=other_rec.start_ticks - 1,
            boot=other_rec.boot,
            program=other_rec.program,
        )
        path = tmp_path / "record.json"
        dead_owner = supervise.ProcRecord(pid=1, start_ticks=-1, boot=rec.boot, program="x")
        supervise.write_record(
            path, supervise.Record(dead_owner, None, supervise.Targets([rec, reused])).to_json()
        )
        assert supervise.reclaim(path) == [sleeper.pid]
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None
        # a live owner is never a leftover
        me = supervise.ProcRecord.of(os.getpid())
        supervise.write_record(path, supervise.Record(me, None, supervise.Targets()).to_json())
        with pytest.raises(supervise.StillRunning, match=str(os.getpid())):
            supervise.reclaim(path)
    finally:
        for p in (sleeper, other):
            p.kill()
            p.wait()


def test_folder_lock_refuses_a_second_owner(tmp_path):
    code = (
        "import sys, time; from pathlib import Path; from fedft import supervise; "
        "supervise.lock_folder(Path(sys.argv[1])); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"locked"
        with pytest.raises(supervise.StillRunning, match=str(holder.pid)):
            supervise.lock_folder(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    fd = supervise.lock_folder(tmp_path)  # released by the kernel when the holder died
    os.close(fd)


def test_proc_records_round_trip_and_reject_garbage(tmp_path):
    rec = supervise.ProcRecord.of(os.getpid())
    assert rec is not None and rec.matches()
    assert supervise.ProcRecord.from_json(rec.to_json()) == rec
    with pytest.raises(ValueError, match="not a process record"):
        supervise.ProcRecord.from_json({"pid": "x"})
    bad = tmp_path / "r.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="process record"):
        supervise.Record.read(bad)
    assert supervise.Record.read(tmp_path / "none.json") is None


_FAILING_CLIENT = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    import client.deploy as deploy
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # a SuperNode that is refused at once, every time (exit code 3)
    deploy.supernode_argv = lambda plan, runtime_port, **kw: [sys.executable, "-c", "exit(3)"]
    plan = deploy.ClientPlan(partition=0, server="127.0.0.1:9", max_wait_s=float(sys.argv[1]),
                             state_dir=Path(sys.argv[2]), worker=False)
    sys.exit(deploy.run_client(plan, retry_s=0.2))
    """
)


def test_a_client_whose_server_is_gone_says_so_once_and_exits_with_its_status(tmp_path):
    res = subprocess.run(
        [sys.executable, "-c", _FAILING_CLIENT, "3", str(tmp_path / "state")],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
    )
    log = res.stderr.decode()
    assert res.returncode == 3, log
    assert log.count("the SuperNode exited with code 3") == 1, log  # not once per retry
    assert log.count("giving up") >= 1 and "kept exiting" in log
    assert log.count("started flower-supernode") >= 3  # it did retry, quietly


# --- a client's life after its server (#20): one-shot exits, a service waits, quietly --------

# A "SuperNode" that is admitted, receives train messages up to round argv[2], starts a child
# (as a SuperNode starts flower-superexec), then loses its server: Flower retries for ever,
# with a warning per try. It writes its own record and its child's to argv[1].
_FAKE_NODE = textwrap.dedent(
    """
    import json, subprocess, sys, time
    from fedft import supervise
    record, last_round = sys.argv[1], int(sys.argv[2])
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    recs = [supervise.ProcRecord.of(p).to_json() for p in (supervise.os.getpid(), child.pid)]
    with open(record, "w") as fh:
        json.dump(recs, fh)
    print("INFO :      SuperNode ID: 42", flush=True)
    for r in range(1, last_round + 1):
        print(f"INFO :      [RUN 7, ROUND {r}]", flush=True)
        print("INFO :      Receiving: train message (ID: x)", flush=True)
    while True:
        print("WARNING :   Connection attempt failed, retrying in 0.05 seconds", flush=True)
        time.sleep(0.05)
    """
)

_LIFE_CLIENT = textwrap.dedent(
    """
    import logging, sys
    from pathlib import Path
    import client.deploy as deploy
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    fake, record, last_round, max_wait, mode = sys.argv[1:6]
    deploy.supernode_argv = lambda plan, runtime_port, **kw: [
        sys.executable, fake, record, last_round]
    # a service keeps a resident worker (a real one, without a config to preload)
    plan = deploy.ClientPlan(partition=0, server="127.0.0.1:9", max_wait_s=float(max_wait),
                             service=mode == "service", rounds=2, worker=mode == "service")
    sys.exit(deploy.run_client(plan, retry_s=0.2, poll_s=0.1))
    """
)


def _life_client(tmp_path: Path, *, last_round: int, max_wait: float, mode: str):
    fake = tmp_path / "fake_node.py"
    fake.write_text(_FAKE_NODE)
    record = tmp_path / "node.json"
    out, err = open(tmp_path / "out.log", "wb"), open(tmp_path / "err.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-c", _LIFE_CLIENT, str(fake), str(record), str(last_round)]
        + [str(max_wait), mode],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=out,
        stderr=err,
        start_new_session=True,
    )
    out.close()
    err.close()
    return proc, record


def _node_records(record: Path) -> list[supervise.ProcRecord]:
    _wait(record.is_file, 60)
    return [supervise.ProcRecord.from_json(o) for o in json.loads(record.read_text())]


def _wait(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s")
        time.sleep(0.1)


@pytest.mark.parametrize(
    ("last_round", "code", "said"),
    [
        (2, 0, "the run is over (this client trained up to round 2 of 2)"),
        (1, 75, "has been gone for"),
    ],
    ids=["run-over", "server-gone-mid-run"],
)
def test_one_shot_client_says_once_that_the_server_is_gone_and_exits(
    tmp_path, last_round, code, said
):
    proc, record = _life_client(tmp_path, last_round=last_round, max_wait=1.5, mode="one-shot")
    try:
        node = _node_records(record)
        assert proc.wait(timeout=120) == code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (tmp_path / "out.log").read_text(), (tmp_path / "err.log").read_text()
    assert "SuperNode ID: 42" in out  # the SuperNode's own lines are passed on ...
    assert "Connection attempt failed" not in out + err  # ... but not its retry warnings
    assert err.count(said) == 1, err
    if code:  # gone mid-run: it said so when the server stopped answering, then gave up
        assert err.count("does not answer (after round 1)") == 1, err
    assert not [r.pid for r in node if r.matches()]  # the SuperNode and its child are gone


def test_service_client_waits_quietly_and_sigterm_stops_everything(tmp_path):
    proc, record = _life_client(tmp_path, last_round=2, max_wait=0.5, mode="service")
    try:
        node = _node_records(record)
        err_log = tmp_path / "err.log"
        _wait(lambda: "waiting quietly" in err_log.read_text(), 60)
        time.sleep(2.0)  # ~40 retry warnings from the SuperNode meanwhile; past --max-wait
        assert proc.poll() is None, err_log.read_text()  # a service does not exit on its own
        assert all(r.matches() for r in node)  # its SuperNode still retries
        proc.send_signal(signal.SIGTERM)  # what Docker and systemd send
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out, err = (tmp_path / "out.log").read_text(), err_log.read_text()
    assert err.count("does not answer") == 1, err
    assert "Connection attempt failed" not in out + err
    assert not [r.pid for r in node if r.matches()]  # nothing it started outlives it
    worker = re.search(r"started fedft-worker\[0\] \(pid (\d+)\)", err)
    assert worker is not None, err  # the resident worker (#20 item 2) was started ...
    left = supervise.read_proc(int(worker.group(1)))
    assert left is None or left.zombie  # ... and stopped with it


def test_runs_below_finds_a_program_anywhere_in_the_tree(tmp_path):
    """What ``fedft server`` asks before it polls the run status: is the ServerApp running?"""
    chain = tmp_path / "chain.py"
    chain.write_text(_CHAIN)
    link = subprocess.Popen([sys.executable, str(chain), "link"], start_new_session=True)
    try:
        _wait(lambda: supervise.runs_below(link.pid, "chain.py") and len(_tree(link.pid)) >= 3, 60)
        assert not supervise.runs_below(link.pid, "flwr-serverapp")
    finally:
        supervise.stop(supervise.snapshot(link.pid))
        link.wait()
    assert not supervise.runs_below(link.pid, "chain.py")
