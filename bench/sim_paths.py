"""``fedft simulate`` (``run_simulation``) vs Flower's supported path (``flwr run``).

Flower 1.41 marks ``flwr.simulation.run_simulation`` deprecated in favour of ``flwr run``
against a SuperLink started with ``--simulation``: the SuperLink starts ``flower-superexec``,
which starts a ``flower-simulation`` process that installs the app bundle (this project,
built by ``flwr run`` from ``[tool.flwr.app]`` in pyproject.toml) and runs the same
ServerApp and ClientApp on the same Ray backend. This benchmark runs one small config both
ways, offline, with the same seed, one after the other, ``repeats`` times alternating:

* **run_simulation**: ``fedft simulate CONFIG`` as a user types it (a child process, from
  launch to exit: imports, data check, Ray start, rounds, report).
* **flwr run**: a private ``FLWR_HOME`` with a connection to a ``flower-superlink
  --simulation`` on a free loopback port, then ``flwr run . fedft --stream`` with the
  resolved config as run config and the same resources as federation config (from the
  SuperLink's launch to ``flwr run`` returning at the run's end); the SuperLink is stopped
  afterwards (not timed).

Both write ``metrics.jsonl``; the test metric of every round must be equal.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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

logger = logging.getLogger(__name__)

CONFIG = "simulations/quickstart.toml"


def _sets(*, size: Size, model: str) -> list[str]:
    clients, rounds, steps = {"smoke": (2, 1, 2), "default": (4, 2, 10), "full": (10, 3, 20)}[size]
    return [
        f"model.name='{model}'",
        f"federation.num_clients={clients}",
        f"federation.clients_per_round={max(2, clients // 2)}",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "federation.batch_size=8",
        "federation.device='cpu'",
        "data.test_size=64",
        "data.public_size=8",
        "data.max_train_examples=800",
    ]


@dataclass
class PathRun:
    """One run of one path."""

    path: str
    wall_s: float  #: launch to the end of the run, as the user waits for it
    rounds_s: float  #: sum of the rounds' wall_s in metrics.jsonl (round 0 included)
    rows: list[dict[str, object]]


def _rows(out: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_fedft_simulate(sets: Sequence[str], out: Path) -> PathRun:
    """``fedft simulate CONFIG --set ...`` in a child process (run_simulation inside)."""
    argv = fedft_cli("simulate", CONFIG, "--out", str(out), "--no-progress", *set_args(sets))
    t0 = time.perf_counter()
    res = subprocess.run(
        argv, cwd=ROOT, env=child_env(), capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"fedft simulate failed ({res.returncode}): {res.stderr[-2000:]}")
    rows = _rows(out)
    return PathRun("run_simulation", wall, sum(float(str(r["wall_s"])) for r in rows), rows)


def run_flwr(sets: Sequence[str], out: Path) -> PathRun:
    """The same run through ``flower-superlink --simulation`` and ``flwr run --stream``."""
    from fedft.config import load_config
    from server import deploy

    cfg = load_config(ROOT / CONFIG, list(sets))
    out.mkdir(parents=True, exist_ok=True)
    home = (out / ".flwr").resolve()
    env = deploy.flower_env(home, child_env())
    port = deploy.free_port(deploy.LOCAL_HOST)
    deploy.write_connection(home, address=f"{deploy.LOCAL_HOST}:{port}", root_certificates=None)
    run_cfg = deploy.write_run_config(home / "run_config.toml", cfg, out=out, resume=False)
    f = cfg.federation
    federation = (
        f"num-supernodes={f.num_clients} client-resources-num-cpus={f.cpus_per_client} "
        f"client-resources-num-gpus={f.gpus_per_client} init-args-num-cpus={os.cpu_count() or 1}"
    )
    superlink = deploy.ChildProcess(
        name="flower-superlink",
        argv=[
            deploy.program("flower-superlink"),
            "--insecure",
            "--simulation",
            "--host",
            deploy.LOCAL_HOST,
            "--port",
            str(port),
            "--disable-runtime-dependency-installation",
        ],
        log_path=home / "superlink.log",
        env=env,
    )
    t0 = time.perf_counter()
    superlink.start()
    try:
        deploy.wait_for_port(deploy.LOCAL_HOST, port, child=superlink, timeout_s=120)
        argv = [deploy.program("flwr"), "run", str(deploy.APP_DIR), deploy.CONNECTION]
        argv += ["--run-config", str(run_cfg), "--federation-config", federation, "--stream"]
        with (home / "flwr-run.log").open("w") as log:
            subprocess.run(argv, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
        wall = time.perf_counter() - t0
        status = deploy.FlwrCli(flwr_home=home, env=env).call("ls", deploy.CONNECTION)
    finally:
        superlink.stop()
    runs = status.get("runs") or [{}]
    if runs[0].get("status") != "finished:completed" or not (out / "summary.json").is_file():
        tail = (home / "flwr-run.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"flwr run ended {runs[0].get('status')!r}:\n{tail}")
    rows = _rows(out)
    return PathRun("flwr run", wall, sum(float(str(r["wall_s"])) for r in rows), rows)


def _metric(rows: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    return [(r["round"], r.get("accuracy"), r.get("loss")) for r in rows]


def run(
    *, size: Size = "default", doc: Path | None = DOC, model: str = "minilm", repeats: int = 2
) -> list[str]:
    """Run both paths ``repeats`` times, alternating; return the RATIO line."""
    sets = _sets(size=size, model=model)
    runs: list[PathRun] = []
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="bench-sim-paths-") as tmp:
        for i in range(1 if size == "smoke" else repeats):
            runs.append(run_fedft_simulate(sets, Path(tmp) / f"sim-{i}"))
            loads.append(os.getloadavg()[0])
            runs.append(run_flwr(sets, Path(tmp) / f"flwr-{i}"))
            loads.append(os.getloadavg()[0])
    sim = [r for r in runs if r.path == "run_simulation"]
    flwr = [r for r in runs if r.path == "flwr run"]
    same = all(_metric(r.rows) == _metric(sim[0].rows) for r in runs)
    best_sim, best_flwr = min(r.wall_s for r in sim), min(r.wall_s for r in flwr)
    line = ratio_line(
        "sim_paths",
        f"flwr run / run_simulation wall time {best_flwr / best_sim:.2f} (best of "
        f"{len(sim)} each: {best_flwr:.1f} s vs {best_sim:.1f} s); metrics "
        f"{'identical' if same else 'DIFFER'} in every round",
    )
    table = md_table(
        ["run", "path", "wall s", "rounds s", "test accuracy per round", "test loss per round"],
        [
            [
                str(i // 2 + 1),
                r.path,
                f"{r.wall_s:.1f}",
                f"{r.rounds_s:.1f}",
                " ".join(f"{float(str(m[1])):.4f}" for m in _metric(r.rows)),
                " ".join(f"{float(str(m[2])):.4f}" for m in _metric(r.rows)),
            ]
            for i, r in enumerate(runs)
        ],
    )
    write_section(
        "sim_paths",
        title="12. Simulation path: run_simulation (fedft simulate) vs flwr run",
        command=f"python -m bench --only sim_paths   # {CONFIG} with --set " + " ".join(sets),
        body=table
        + "\n\n**Reading.** *wall s*: from launch to the end of the run as the user waits "
        "(`fedft simulate`: the whole command; `flwr run`: SuperLink start, bundle build and "
        "install, `flwr run --stream` returning). *rounds s*: the rounds' own `wall_s` "
        "(metrics.jsonl), the same engine on both paths. Same seed, so the test metrics of "
        f"every round must be equal: {'they are' if same else 'they are NOT'}. "
        f"{line.removeprefix('RATIO sim_paths: ')}. 1-min load average of the machine "
        f"between runs: {min(loads):.1f}-{max(loads):.1f} (2 cores).",
        doc=doc,
    )
    return [line]


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run(size="default")
