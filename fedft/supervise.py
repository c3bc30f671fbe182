"""Own every process a command starts: nothing outlives ``fedft server`` or ``fedft client``.

Flower's programs start programs of their own: the SuperLink starts ``flower-superexec`` in a
*new session*, which starts ``flwr-serverapp`` for each run; a SuperNode starts
``flower-superexec``, which starts a ``flwr-clientapp`` per message. Killing the SuperLink's
process group therefore misses the ServerApp, and a ServerApp whose SuperLink died was seen
ignoring SIGTERM and living on under init. Four layers close every gap (Linux; elsewhere
the first two are skipped with a warning):

1. **Parent-death signal.** Every child a command starts directly gets
   ``PR_SET_PDEATHSIG = SIGKILL`` before it runs, and re-checks its parent's PID after
   setting it (the parent may have died in between): if ``fedft`` dies, even by SIGKILL, the
   kernel kills its direct children at once.
2. **Child subreaper.** The command marks itself ``PR_SET_CHILD_SUBREAPER``: a process whose
   parent dies inside our tree is reparented to us instead of init, so a walk of our tree
   still finds it.
3. **A guardian.** :class:`Guardian` starts ``python -m fedft.supervise guard``, a small
   process in its own session that records every descendant of the command (PID + start
   time) and every session one of them created, twice a second, in a record file. When the
   command ends, however it ends, the guardian's stdin pipe closes; it then freezes
   (SIGSTOP) every recorded process, every member of a recorded session and all their
   descendants, and kills them (SIGKILL). A process started after the last snapshot is
   still caught through its session or its parent.
4. **Leftovers on the next start.** :func:`reclaim` reads the record file an earlier
   command left (``fedft server --resume`` after a crash that also took the guardian) and
   stops what it names.

Nothing is killed on a guess: a :class:`ProcRecord` matches a live process only when the
PID, the start time (clock ticks since boot), the boot id and the program all agree.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
RECORD_VERSION = 1
#: seconds between the guardian's snapshots of the command's process tree
SNAPSHOT_S = 0.5
_PROC = Path("/proc")


# --- reading /proc -------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcInfo:
    """One live process as /proc shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    start_ticks: int

    @property
    def zombie(self) -> bool:
        """True for a process that has exited and waits to be reaped (or is being torn down)."""
        return self.state in ("Z", "X", "x")


def read_proc(pid: int) -> ProcInfo | None:
    """``/proc/<pid>/stat`` parsed; None when the process does not exist (or no /proc)."""
    try:
        raw = (_PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ... starttime(22nd) ...": comm may hold anything,
    # so split after its last closing parenthesis.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcInfo(
            pid=pid,
            ppid=int(rest[1]),
            pgid=int(rest[2]),
            sid=int(rest[3]),
            state=rest[0].decode("ascii", "replace"),
            start_ticks=int(rest[19]),
        )
    except (IndexError, ValueError):
        return None


def scan() -> dict[int, ProcInfo]:
    """Every process visible in /proc (empty without /proc)."""
    table: dict[int, ProcInfo] = {}
    try:
        names = os.listdir(_PROC)
    except OSError:
        return table
    for name in names:
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                table[info.pid] = info
    return table


def cmdline(pid: int) -> tuple[str, ...]:
    """The process's argv (empty for a zombie, a kernel thread or one that is gone)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return ()
    return tuple(p.decode("utf-8", "replace") for p in raw.split(b"\0") if p)


def boot_id() -> str:
    """This boot's id (start times are counted from boot; a record of another boot is void)."""
    try:
        return (_PROC / "sys" / "kernel" / "random" / "boot_id").read_text().strip()
    except OSError:
        return ""


def descendants(roots: Iterable[int], table: Mapping[int, ProcInfo]) -> set[int]:
    """The PIDs below ``roots`` in ``table`` (by parent PID), roots excluded."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found - set(roots)


def runs_below(root: int, program: str) -> bool:
    """True when a live process named ``program`` runs below ``root``.

    ``program`` as :class:`ProcRecord` names it (``flwr-serverapp``).
    """
    table = scan()
    return any(
        not table[pid].zombie and _program(pid) == program
        for pid in descendants([root], table)
        if pid in table
    )


# --- proof of ownership --------------------------------------------------------------------


@dataclass(frozen=True)
class ProcRecord:
    """A process as recorded while it was ours: enough to recognise it, never its PID alone.

    Attributes:
        pid: its PID.
        start_ticks: its start time, clock ticks since boot (/proc/<pid>/stat field 22).
        boot: the boot id it ran under.
        program: the base name of its argv[0] or of the script Python ran (``flwr-serverapp``,
            ``python`` for an interpreter without a script).
    """

    pid: int
    start_ticks: int
    boot: str
    program: str

    @classmethod
    def of(cls, pid: int, info: ProcInfo | None = None) -> ProcRecord | None:
        """The record of live process ``pid`` (None if it is gone)."""
        info = info or read_proc(pid)
        if info is None or info.zombie:
            return None
        return cls(pid=pid, start_ticks=info.start_ticks, boot=boot_id(), program=_program(pid))

    def matches(self, info: ProcInfo | None = None) -> bool:
        """True when the live process with this PID is the one recorded.

        Same start time, same boot, same program; False when it exited (zombies included)
        or the PID was reused.
        """
        info = info or read_proc(self.pid)
        if info is None or info.zombie or info.start_ticks != self.start_ticks:
            return False
        if self.boot != boot_id():
            return False
        current = _program(self.pid)  # "" when unreadable (another user's, exiting)
        return not self.program or not current or current == self.program

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return {"pid": self.pid, "start": self.start_ticks, "boot": self.boot, "prog": self.program}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ProcRecord:
        """Inverse of :meth:`to_json`; raises ValueError on anything else."""
        try:
            return cls(
                pid=int(obj["pid"]),
                start_ticks=int(obj["start"]),
                boot=str(obj["boot"]),
                program=str(obj["prog"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a process record: {obj!r}") from exc


def _program(pid: int) -> str:
    argv = cmdline(pid)
    if not argv:
        return ""
    name = os.path.basename(argv[0])
    if name.startswith("python") and len(argv) > 1:  # "python /path/flwr-serverapp ..."
        script = next((a for a in argv[1:] if not a.startswith("-")), "")
        return os.path.basename(script) or name
    return name


# --- Linux process controls ----------------------------------------------------------------


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.prctl
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_PRCTL = _prctl()


def parent_death_signal(sig: int = signal.SIGKILL) -> Callable[[], None] | None:
    """A ``preexec_fn`` for :class:`subprocess.Popen`: the child dies with its parent.

    The child gets ``sig`` when the thread that started it dies, and kills itself if its
    parent is already gone. None off Linux.

    The prctl function is looked up here, in the parent, so the child runs no dynamic
    loading between fork and exec. Start children from the main thread (the signal follows
    the starting *thread*).
    """
    prctl = _PRCTL
    if prctl is None:
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def become_subreaper() -> bool:
    """Mark this process a child subreaper (orphans below us reparent to us). False off Linux."""
    global _SUBREAPER
    if _PRCTL is None:
        return False
    _SUBREAPER = _PRCTL(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    return _SUBREAPER


# --- stopping ------------------------------------------------------------------------------


@dataclass
class Targets:
    """What to stop: recorded processes, and sessions whose every member is ours.

    Attributes:
        processes: records of processes (each is stopped only if it still matches).
        sessions: records of session leaders: every live member of such a session (same
            session id, started no earlier than the leader) is ours, even if unrecorded.
        protect: PIDs never signalled (this process, the guardian, ...).
    """

    processes: list[ProcRecord] = field(default_factory=list)
    sessions: list[ProcRecord] = field(default_factory=list)
    protect: set[int] = field(default_factory=set)

    def live(self, table: Mapping[int, ProcInfo]) -> set[int]:
        """The live PIDs these targets cover now.

        Matching records, members of the sessions, and every descendant of those.
        """
        pids = {r.pid for r in self.processes if r.matches(table.get(r.pid))}
        this_boot = boot_id()
        sids = {s.pid: s.start_ticks for s in self.sessions if s.boot == this_boot and s.pid > 1}
        for info in table.values():
            start = sids.get(info.sid)
            if start is not None and info.start_ticks >= start:
                pids.add(info.pid)
        pids |= descendants(pids, table)
        never = self.protect | {0, 1, os.getpid()}
        return {p for p in pids if p not in never and not table[p].zombie} if table else set()


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _reap_ours(pids: Iterable[int], table: Mapping[int, ProcInfo]) -> None:
    """Reap zombies that are our own children (orphans we adopted as a subreaper).

    Children that a Popen object owns are left to it (see :func:`adopt_popen`).
    """
    if not _SUBREAPER:
        return
    me = os.getpid()
    for pid in pids:
        info = table.get(pid)
        if info is not None and info.ppid == me and pid not in _POPEN_PIDS:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


#: True once this process is a subreaper (it then reaps the orphans it adopts).
_SUBREAPER = False
#: PIDs of children that a subprocess.Popen object of this process waits for itself.
_POPEN_PIDS: set[int] = set()


def adopt_popen(pid: int) -> None:
    """Note that a Popen object reaps ``pid`` (so :func:`stop` never steals its exit code)."""
    _POPEN_PIDS.add(pid)


def release_popen(pid: int) -> None:
    """The Popen object of ``pid`` has reaped it."""
    _POPEN_PIDS.discard(pid)


def stop(targets: Targets, *, grace_s: float = 0.0, term: Sequence[int] = ()) -> list[int]:
    """Stop every process ``targets`` covers; returns the PIDs that were signalled.

    With ``grace_s`` > 0, first SIGTERM the PIDs in ``term`` (those that must shut down
    cleanly, e.g. a SuperLink) and give them ``grace_s`` seconds. Then freeze (SIGSTOP)
    everything the targets cover, look again until nothing new appears (a stopped process
    cannot start another), and SIGKILL it all; wait up to 10 s for the kernel to finish.
    """
    signalled: set[int] = set()
    if grace_s > 0 and term:
        live = targets.live(scan())
        first = [p for p in term if p in live]
        _signal_all(first, signal.SIGTERM)
        signalled.update(first)
        deadline = time.monotonic() + grace_s
        while first and time.monotonic() < deadline:
            table = scan()
            first = [p for p in first if p in table and not table[p].zombie]
            if first:
                time.sleep(0.1)
    frozen: set[int] = set()
    for _ in range(20):  # until the frozen set is closed under "started by" and "same session"
        new = targets.live(scan()) - frozen
        if not new:
            break
        _signal_all(new, signal.SIGSTOP)
        frozen |= new
    _signal_all(frozen, signal.SIGKILL)
    signalled |= frozen
    deadline = time.monotonic() + 10.0
    while True:
        table = scan()
        _reap_ours(signalled, table)
        left = [p for p in signalled if p in table and not table[p].zombie]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if frozen:
        logger.info("stopped %d process(es): %s", len(frozen), sorted(frozen))
    return sorted(signalled)


def snapshot(root: int, *, protect: Iterable[int] = ()) -> Targets:
    """Records of ``root``, everything below it, and the sessions they lead (not ours)."""
    table = scan()
    skip = set(protect) | {os.getpid()}
    below = descendants([root], table) - skip
    found = Targets(protect=set(skip))
    for pid in sorted({root} | below):
        info = table.get(pid)
        rec = ProcRecord.of(pid, info)
        if rec is None or info is None:
            continue
        found.processes.append(rec)
        if info.sid == pid:  # it leads a session: everything started in it is ours too
            found.sessions.append(rec)
    own_sid = os.getsid(0)
    found.sessions = [s for s in found.sessions if s.pid != own_sid]
    return found


# --- the guardian --------------------------------------------------------------------------


def write_record(path: Path, payload: Mapping[str, Any]) -> None:
    """Write a record file atomically (a reader never sees half of it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class Record:
    """A record file: who owned the processes, who guarded them, and what they were."""

    owner: ProcRecord | None
    guardian: ProcRecord | None
    targets: Targets

    def to_json(self) -> dict[str, Any]:
        """Plain JSON."""
        return {
            "version": RECORD_VERSION,
            "owner": None if self.owner is None else self.owner.to_json(),
            "guardian": None if self.guardian is None else self.guardian.to_json(),
            "processes": [r.to_json() for r in self.targets.processes],
            "sessions": [r.to_json() for r in self.targets.sessions],
        }

    @classmethod
    def read(cls, path: Path) -> Record | None:
        """The record at ``path``; None if there is none. Raises ValueError if it is not one."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        if len(text) > 4 * 1024 * 1024:
            raise ValueError(f"{path} is too large to be a process record")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not a process record: {exc}") from exc
        if not isinstance(obj, dict) or obj.get("version") != RECORD_VERSION:
            raise ValueError(f"{path} is not a version-{RECORD_VERSION} process record")

        def one(o: Any) -> ProcRecord | None:
            return None if o is None else ProcRecord.from_json(o)

        return cls(
            owner=one(obj.get("owner")),
            guardian=one(obj.get("guardian")),
            targets=Targets(
                processes=[ProcRecord.from_json(o) for o in obj.get("processes", [])],
                sessions=[ProcRecord.from_json(o) for o in obj.get("sessions", [])],
            ),
        )


def guard(owner: ProcRecord, record: Path | None, *, stdin: IO[bytes], interval_s: float) -> int:
    """The guardian's loop: snapshot ``owner``'s tree until its pipe closes, then stop it all.

    Returns the number of processes it had to kill after the owner ended.
    """
    me = ProcRecord.of(os.getpid())
    closed = threading.Event()

    def watch_pipe() -> None:
        while stdin.read(4096):
            pass
        closed.set()

    threading.Thread(target=watch_pipe, daemon=True, name="owner-pipe").start()
    seen: dict[int, ProcRecord] = {}
    sessions: dict[int, ProcRecord] = {}
    written: tuple[frozenset[int], frozenset[int]] | None = None
    announced = False
    while True:
        table = scan()
        owner_alive = owner.matches(table.get(owner.pid))
        if owner_alive:
            below = descendants([owner.pid], table) - {os.getpid()}
            known = Targets(processes=list(seen.values()), sessions=list(sessions.values()))
            below |= known.live(table)
            for pid in below:
                if pid not in seen and (rec := ProcRecord.of(pid, table.get(pid))) is not None:
                    seen[pid] = rec
                    info = table[pid]
                    if info.sid == pid and pid != os.getpid():
                        sessions[pid] = rec
            for pid, rec in list(seen.items()):
                cur = table.get(pid)
                if cur is None or cur.zombie or cur.start_ticks != rec.start_ticks:
                    del seen[pid]  # exited: nothing to stop (its session stays recorded)
                elif (now := _program(pid)) and now != rec.program:  # it exec'd since
                    seen[pid] = ProcRecord(pid, rec.start_ticks, rec.boot, now)
            for sid in [s for s in sessions if not any(i.sid == s for i in table.values())]:
                del sessions[sid]  # no member left: the id may be reused
            if not announced:
                sys.stdout.write("ready\n")
                sys.stdout.flush()
                sys.stdout.close()
                announced = True
            state = (frozenset(seen), frozenset(sessions))
            if record is not None and state != written:
                write_record(
                    record,
                    Record(
                        owner, me, Targets(list(seen.values()), list(sessions.values()))
                    ).to_json(),
                )
                written = state
        if not owner_alive or closed.wait(interval_s):
            break
    targets = Targets(
        processes=list(seen.values()), sessions=list(sessions.values()), protect={os.getpid()}
    )
    killed = stop(targets)
    if killed:
        logger.warning("the owner (pid %d) ended; killed what it left: %s", owner.pid, killed)
    if record is not None:
        left = Targets(processes=[r for r in seen.values() if r.matches()])
        try:
            write_record(record, Record(owner, None, left).to_json())
        except OSError:
            pass  # the folder went away with its owner
    return len(killed)


class Guardian:
    """The guardian process of this command (see the module docstring, layer 3).

    Start it before any other child; :meth:`close` at the very end (it then stops whatever
    is left and exits). If this process dies first, the pipe closes by itself.
    """

    def __init__(self, record: Path | None, *, log_path: Path | None = None) -> None:
        import subprocess

        self.record = record
        me = ProcRecord.of(os.getpid())
        if me is None:  # no /proc: nothing to guard with
            self.proc: Any = None
            return
        argv = [
            sys.executable,
            "-m",
            "fedft.supervise",
            "guard",
            "--owner",
            str(me.pid),
            "--owner-start",
            str(me.start_ticks),
            "--owner-program",
            me.program,
        ]
        if record is not None:
            argv += ["--record", str(record.resolve())]
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
        err = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        finally:
            if log_path is not None:
                err.close()  # type: ignore[union-attr]
        adopt_popen(self.proc.pid)
        # wait until it has taken its first snapshot: a child started before that could be
        # orphaned unseen if we died at once
        ready = self.proc.stdout.readline() if self.proc.stdout is not None else b""
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if ready.strip() != b"ready":
            logger.warning("the process guardian did not start (%r); see %s", ready, log_path)
        logger.debug("guardian started (pid %d)", self.proc.pid)

    @property
    def pid(self) -> int | None:
        """The guardian's PID (None without /proc)."""
        return None if self.proc is None else int(self.proc.pid)

    def close(self, timeout_s: float = 30.0) -> None:
        """Let the guardian stop what is left, and wait for it."""
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=timeout_s)
        except Exception:  # noqa: BLE001 - a stuck guardian must not block our exit
            self.proc.kill()
            self.proc.wait()
        release_popen(self.proc.pid)


# --- leftovers of an earlier command -------------------------------------------------------


class StillRunning(RuntimeError):
    """The command that owns a folder is still alive (the message is its PID, if known)."""


def lock_folder(folder: Path, *, name: str = "owner.lock") -> int:
    """Hold an exclusive lock on ``folder`` for the life of this process.

    The kernel drops it when we exit, however we exit. Returns the lock's file descriptor
    (close it to release).

    Raises:
        StillRunning: another live process holds it.
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode("ascii", "replace").strip()
        os.close(fd)
        raise StillRunning(holder or "?") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def reclaim(record_path: Path, *, wait_guardian_s: float = 15.0) -> list[int]:
    """Stop what an earlier command recorded in ``record_path`` and left running.

    Returns the PIDs stopped. Raises :class:`StillRunning` (with its PID) when that command
    itself still runs: it is not a leftover, and is never killed from here.
    """
    record = Record.read(record_path)
    if record is None:
        return []
    if record.owner is not None and record.owner.matches():
        raise StillRunning(str(record.owner.pid))
    if record.guardian is not None and record.guardian.matches():
        deadline = time.monotonic() + wait_guardian_s
        while record.guardian.matches() and time.monotonic() < deadline:
            time.sleep(0.1)  # it is stopping the same processes right now
        record.targets.processes.append(record.guardian)
    stopped = stop(record.targets)
    if stopped:
        logger.warning("stopped %d process(es) left by an earlier run: %s", len(stopped), stopped)
    return stopped


# --- the guardian's command line -----------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedft.supervise guard --owner PID --owner-start TICKS [--record FILE]``."""
    parser = argparse.ArgumentParser(prog="python -m fedft.supervise")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("guard", help="guard a command's process tree (reads the owner pipe)")
    g.add_argument("--owner", type=int, required=True)
    g.add_argument("--owner-start", type=int, required=True)
    g.add_argument("--owner-program", default="")
    g.add_argument("--record", type=Path)
    g.add_argument("--interval", type=float, default=SNAPSHOT_S)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s fedft-guardian %(levelname)s %(message)s"
    )
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the owner; we follow it
    owner = ProcRecord(
        pid=args.owner, start_ticks=args.owner_start, boot=boot_id(), program=args.owner_program
    )
    guard(owner, args.record, stdin=sys.stdin.buffer, interval_s=args.interval)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
