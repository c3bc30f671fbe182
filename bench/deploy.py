"""A deployed round beside a simulated one: where the time goes (issue 20).

One small config (MiniLM + LoRA on Rotten Tomatoes by default), run three ways one after
the other on this machine, with ``FEDFT_PHASE_LOG`` set so every client message records its
phases (``client/phases.py``):

* **simulated**: ``fedft simulate CONFIG`` (Flower's Simulation Engine on Ray);
* **deployed, resident worker**: ``fedft certs``, ``fedft server`` (TLS, node keys) and one
  ``fedft client --threads 1`` per client on loopback, as README's one-machine deployment
  (one training thread each, as each simulated client has: three clients with torch's
  default of every core each ran their local rounds 6-15x slower than the simulated
  clients, measured 2026-12-02); each
  client keeps its model and data in its worker (the default);
* **deployed, a process per message**: the same with ``fedft client --no-worker`` (what
  every deployed client did before the worker: Flower starts a fresh ``flwr-clientapp``
  process for every message, which imports the model code and loads the model again).

Per path and round: the round's ``wall_s`` (the server's metrics.jsonl), the server's work
outside the round's exchange with the clients (building the starts, validating,
aggregating, evaluating, the checkpoint), and per client train message the mean of each
phase: from the server's send until the client's code starts (deployed: the SuperLink, the
SuperNode's poll (every 3 s when idle), its SuperExec's (every 1 s), a new process), that
process's start until fedft's code runs (interpreter, Flower's imports, pulling the task,
installing the app bundle), fedft's imports, model + data load, the local round (decode +
train), encoding the reply, the hand-over to the worker (socket + protobuf, both ways); and
from the last client's reply until the server has them all (the push back, the server's
ask every 0.5 s).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

from bench import (
    DOC,
    ROOT,
    Size,
    child_env,
    fedft_cli,
    md_table,
    ratio_line,
    set_args,
    write_section,
)
from fedft.launch import ChildProcess, free_port

logger = logging.getLogger(__name__)

CONFIG = "simulations/quickstart.toml"
PATHS = ("simulated", "deployed, resident worker", "deployed, a process per message")
RUN_TIMEOUT_S = 3600


def _sets(*, size: Size, model: str) -> list[str]:
    clients, rounds, steps = {"smoke": (2, 2, 2), "default": (3, 2, 10), "full": (3, 3, 20)}[size]
    return [
        f"model.name='{model}'",
        f"federation.num_clients={clients}",
        f"federation.clients_per_round={clients}",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "federation.batch_size=8",
        "federation.device='cpu'",
        "data.test_size=100",
        "data.public_size=8",
        "data.max_train_examples=600",
    ]


@dataclass
class PathRun:
    """One path's run: its rounds and its clients' phases."""

    path: str
    wall_s: float  #: launch to the server's (or the simulation's) exit
    rounds: list[dict[str, object]]  #: metrics.jsonl rows of rounds >= 1
    app: list[dict[str, float]] = field(default_factory=list)  #: ClientApp lines, train
    handler: list[dict[str, float]] = field(default_factory=list)  #: handler lines, train
    server: list[dict[str, float]] = field(default_factory=list)  #: train exchanges


def _read(out: Path, phase_log: Path, path: str, wall: float) -> PathRun:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    text = phase_log.read_text() if phase_log.is_file() else ""
    lines = [json.loads(x) for x in text.splitlines()]
    train = sorted((x for x in lines if x.get("kind") == "train"), key=lambda x: x["at"])
    return PathRun(
        path,
        wall,
        [r for r in rows if int(r["round"]) >= 1],
        app=[x for x in train if x["side"] == "app"],
        handler=[x for x in train if x["side"] == "handler"],
        server=[x for x in train if x["side"] == "server"],
    )


def run_simulated(sets: Sequence[str], work: Path) -> PathRun:
    """``fedft simulate CONFIG --set ...`` in a child process."""
    out, log = work / "sim", work / "sim-phases.jsonl"
    argv = fedft_cli("simulate", CONFIG, "--out", str(out), "--no-progress", *set_args(sets))
    t0 = time.perf_counter()
    res = subprocess.run(
        argv,
        cwd=ROOT,
        env=child_env(FEDFT_PHASE_LOG=str(log)),
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(f"fedft simulate failed ({res.returncode}): {res.stderr[-2000:]}")
    return _read(out, log, PATHS[0], time.perf_counter() - t0)


def run_deployed(sets: Sequence[str], work: Path, *, worker: bool, clients: int) -> PathRun:
    """``fedft server`` + ``clients`` x ``fedft client`` (TLS, node keys) on loopback."""
    tag = "worker" if worker else "per-message"
    out, log, logs = work / f"dep-{tag}", work / f"dep-{tag}-phases.jsonl", work / f"logs-{tag}"
    logs.mkdir(parents=True)
    certs = work / "certs"
    env = child_env(FEDFT_PHASE_LOG=str(log))
    if not certs.is_dir():
        certs_argv = fedft_cli("certs", str(certs), "--clients", str(clients))
        subprocess.run(certs_argv, cwd=ROOT, env=env, check=True, capture_output=True)
    port, config = free_port(), str(ROOT / CONFIG)
    common = [*set_args(sets), "--certs", str(certs)]
    procs: list[ChildProcess] = []

    def start(name: str, argv: list[str]) -> ChildProcess:
        procs.append(ChildProcess(name, argv, logs / f"{name}.log", env).start())
        return procs[-1]

    t0 = time.perf_counter()
    server = start(
        "server",
        fedft_cli("server", config, "--out", str(out), "--address", f"127.0.0.1:{port}", *common),
    )
    # the clients share this machine: each trains on one thread, as each simulated client
    # does (federation.cpus_per_client = 1: Ray sets one OpenMP thread per actor)
    extra = ["--threads", "1"] + ([] if worker else ["--no-worker"])
    for i in range(clients):
        start(
            f"client-{i}",
            fedft_cli("client", config, "--partition", str(i), "--server", f"127.0.0.1:{port}")
            + common
            + extra,
        )
    try:
        code = server.wait(timeout=RUN_TIMEOUT_S)
        wall = time.perf_counter() - t0
        for p in procs[1:]:
            p.wait(timeout=180)  # one-shot clients exit once the run is over
    finally:
        for p in procs:  # only what this benchmark started, by PID, with what they started
            p.stop(grace_s=60)
    if code != 0:
        tail = (logs / "server.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"fedft server ({tag}) exited {code}:\n{tail}")
    return _read(out, log, PATHS[1] if worker else PATHS[2], wall)


def flower_start_s() -> float:
    """Wall seconds for a bare interpreter to import what ``flwr-clientapp`` imports."""
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import flwr.supernode.runtime.run_clientapp"],
        check=True,
        env=child_env(FEDFT_PHASE_LOG=os.devnull),
    )
    return time.perf_counter() - t0


# -- the table -----------------------------------------------------------------------------


def _chunks(items: list[dict[str, float]], n: int) -> list[list[dict[str, float]]]:
    return [items[i : i + n] for i in range(0, len(items), n)]


def _avg(values: Sequence[float]) -> str:
    return f"{mean(values):.1f}" if values else "-"


def phase_row(run: PathRun, rnd: int, clients: int) -> list[str]:
    """One table row: round ``rnd`` (1-based) of ``run``."""
    apps = _chunks(run.app, clients)[rnd - 1] if len(run.app) >= rnd * clients else []
    hands = _chunks(run.handler, clients)[rnd - 1] if len(run.handler) >= rnd * clients else []
    ex = run.server[rnd - 1] if len(run.server) >= rnd else None
    wall = float(str(run.rounds[rnd - 1]["wall_s"]))
    deployed = run.path != PATHS[0]
    start = [a["import_start"] - a["proc_start"] for a in apps if deployed and a.get("proc_start")]
    imports = [
        (a["import_end"] - a["import_start"] if deployed else 0.0) + float(a.get("import_s", 0.0))
        for a in apps
    ]
    work = {h["client"]: h["load_s"] + h["round_s"] + h["encode_s"] for h in hands}
    handover = [
        (a["handler_end"] - a["handler_start"]) - work[a["client"]]
        for a in apps
        if a.get("worker") and a["client"] in work
    ]
    first = "proc_start" if deployed else "handler_start"
    delivery = [a[first] - ex["sent"] for a in apps if ex and a.get(first)]
    back = ex["done"] - max(a["handler_end"] for a in apps) if ex and apps else None
    outside = wall - (ex["done"] - ex["begin"]) if ex else None
    return [
        run.path,
        str(rnd),
        f"{wall:.1f}",
        "-" if outside is None else f"{outside:.1f}",
        _avg(delivery),
        _avg(start),
        _avg(imports),
        _avg([h["load_s"] for h in hands]),
        _avg([h["round_s"] for h in hands]),
        _avg([h["encode_s"] for h in hands]),
        _avg(handover) if handover else "-",
        "-" if back is None else f"{back:.1f}",
    ]


HEADER = [
    "path",
    "round",
    "round wall s",
    "server work outside the exchange s",
    "sent -> client process s",
    "process start -> fedft code s",
    "fedft imports s",
    "model + data load s",
    "local round s",
    "encode reply s",
    "hand-over s",
    "last reply -> server has all s",
]


def _col(rows: list[list[str]], path: str, name: str) -> float:
    """Mean over the rounds of column ``name`` of ``path``'s rows (0 where not measured)."""
    i = HEADER.index(name)
    values = [float(r[i]) for r in rows if r[0] == path and r[i] not in ("-", "nan")]
    return mean(values) if values else 0.0


def reading(rows: list[list[str]], runs: list[PathRun], flwr_s: float) -> str:
    """The measured reading of the table: what the worker removed, what is left and why."""
    sim, worker, per = PATHS
    mean_wall = {r.path: mean(float(str(x["wall_s"])) for x in r.rounds) for r in runs}
    ratios = [
        float(str(x["wall_s"])) / float(str(s["wall_s"]))
        for x, s in zip(runs[1].rounds, runs[0].rounds, strict=True)
    ]
    target = "met in every round" if max(ratios) <= 1.5 else "not met in every round"
    return (
        f"**Reading.** A process per message spent {_col(rows, per, 'fedft imports s'):.1f} s "
        f"importing fedft's model code and {_col(rows, per, 'model + data load s'):.1f} s "
        f"loading the model and data, per message (means over the rounds); with the resident "
        f"worker these are {_col(rows, worker, 'fedft imports s'):.1f} s and "
        f"{_col(rows, worker, 'model + data load s'):.2f} s, and the hand-over costs "
        f"{_col(rows, worker, 'hand-over s'):.2f} s. What a deployed round still pays over a "
        f"simulated one ({mean_wall[worker] - mean_wall[sim]:.1f} s a round on average): "
        f"Flower starts a `flwr-clientapp` process for every message "
        f"({_col(rows, worker, 'process start -> fedft code s'):.1f} s from its start to "
        f"fedft's code; a bare interpreter importing Flower alone takes {flwr_s:.1f} s), the "
        f"way to it ({_col(rows, worker, 'sent -> client process s'):.1f} s from the server's "
        f"send; the SuperNode asks for messages every 3 s when idle and its SuperExec for "
        f"tasks every 1 s, both fixed in flwr 1.41; simulated: "
        f"{_col(rows, sim, 'sent -> client process s'):.1f} s) and back "
        f"({_col(rows, worker, 'last reply -> server has all s'):.1f} s vs "
        f"{_col(rows, sim, 'last reply -> server has all s'):.1f} s), and the server's work "
        f"outside the exchange ({_col(rows, worker, 'server work outside the exchange s'):.1f} "
        f"s deployed, {_col(rows, sim, 'server work outside the exchange s'):.1f} s "
        f"simulated). The local rounds themselves: "
        f"{_col(rows, worker, 'local round s'):.1f} s deployed, "
        f"{_col(rows, sim, 'local round s'):.1f} s simulated (one thread per client on both; "
        f"three deployed clients train at once on the 2 cores, the simulation two). Target "
        f"deployed <= 1.5x simulated: {target} (per round "
        + " / ".join(f"{r:.2f}" for r in ratios)
        + ")."
    )


def run(*, size: Size = "default", doc: Path | None = DOC, model: str = "minilm") -> list[str]:
    """Run the three paths; write the table; return the RATIO line."""
    sets = _sets(size=size, model=model)
    clients = int(next(s for s in sets if "num_clients" in s).split("=")[1])
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        work = Path(tmp)
        runs = [run_simulated(sets, work)]
        loads.append(os.getloadavg()[0])
        runs.append(run_deployed(sets, work, worker=True, clients=clients))
        loads.append(os.getloadavg()[0])
        runs.append(run_deployed(sets, work, worker=False, clients=clients))
        loads.append(os.getloadavg()[0])
        flwr_s = flower_start_s()
    n_rounds = len(runs[0].rounds)
    rows = [phase_row(r, k, clients) for r in runs for k in range(1, n_rounds + 1)]
    mean_wall = {r.path: mean(float(str(x["wall_s"])) for x in r.rounds) for r in runs}
    sim = mean_wall[PATHS[0]]
    per_round = {
        r.path: " / ".join(
            f"{float(str(x['wall_s'])) / float(str(s['wall_s'])):.2f}"
            for x, s in zip(r.rounds, runs[0].rounds, strict=True)
        )
        for r in runs[1:]
    }
    line = ratio_line(
        "deploy",
        f"deployed/simulated round wall time: resident worker {mean_wall[PATHS[1]] / sim:.2f} "
        f"(rounds {per_round[PATHS[1]]}), a process per message "
        f"{mean_wall[PATHS[2]] / sim:.2f} (rounds {per_round[PATHS[2]]}); mean round "
        f"{sim:.1f} / {mean_wall[PATHS[1]]:.1f} / {mean_wall[PATHS[2]]:.1f} s",
    )
    body = (
        md_table(HEADER, rows)
        + "\n\n"
        + md_table(
            ["path", "launch to exit s", "mean round s", "round / simulated"],
            [
                [
                    r.path,
                    f"{r.wall_s:.1f}",
                    f"{mean_wall[r.path]:.1f}",
                    f"{mean_wall[r.path] / sim:.2f}",
                ]
                for r in runs
            ],
        )  # fmt: skip
        + "\n\n"
        + reading(rows, runs, flwr_s)
        + f"\n\nA bare `python -c 'import flwr.supernode.runtime.run_clientapp'` (what "
        f"every `flwr-clientapp` process imports before fedft's code) took {flwr_s:.1f} s. "
        f"1-min load average of the machine between runs: {min(loads):.1f}-{max(loads):.1f} "
        f"(2 cores). {line.removeprefix('RATIO deploy: ')}."
    )
    print(body, flush=True)
    write_section(
        "deploy",
        title="15. A deployed round beside a simulated one: where the time goes",
        command=f"python -m bench --only deploy   # {CONFIG} with --set " + " ".join(sets),
        body=body,
        doc=doc,
    )
    return [line]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run(size="default")
