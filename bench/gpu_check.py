"""``make gpu-check``: fedft's GPU paths, each run once, in one command (<= 5 min on one GPU).

Four real runs of the quickstart recipe, cut down (2 clients, 1 round, :data:`STEPS` local
steps, the model from ``--model``), each a fresh ``fedft`` process:

- **simulation**: ``fedft simulate`` with ``federation.device = "cuda"`` and
  ``gpus_per_client = 0.5`` (both virtual clients share the GPU);
- **dp-sgd**: the same with sample-level DP-SGD (``privacy.mode = "sample"``);
- **split-bf16**: split learning (``adapter.method = "split"``) with the bf16 wire, the
  clients' front, prompt and head on the GPU;
- **deployed**: ``fedft server`` and two ``fedft client`` processes on loopback (TLS and
  node keys from :func:`fedft.certs.write_deployment_certs`), ``device = "cuda"``.

Each prints pass/FAIL, the peak device memory in use while it ran above the memory in use
before it started (sampled every 50 ms with ``torch.cuda.mem_get_info``, so it counts every
process on the GPU: Ray workers, deployed clients) and the time per local step (round 1's
wall time over the local steps, so it includes the round's evaluation). On CUDA the table is
written to docs/benchmarks.md (section ``gpu_check``). Without CUDA it says why and exits 0.

``--device cpu`` runs the same four runs on the CPU and writes nothing: the test suite does
this with a tiny model so the check itself is tested on machines without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import DOC, ROOT, child_env, fedft_cli, md_table, set_args, sim_env, write_section
from fedft.launch import ChildProcess, free_port

#: local steps per client in every check's one round.
STEPS = 20
#: seconds a check may take before it counts as failed.
CHECK_TIMEOUT_S = 600

QUICKSTART = str(ROOT / "simulations" / "quickstart.toml")

BASE = [
    "federation.num_clients=2",
    "federation.clients_per_round=2",
    "federation.rounds=1",
    f"federation.local_steps={STEPS}",
    "data.max_train_examples=400",
    "data.test_size=64",
    "data.public_size=16",
]

#: name -> (what it checks, the overrides on top of :data:`BASE`, deployed?)
CHECKS: dict[str, tuple[str, list[str], bool]] = {
    "simulation": ("fedft simulate, 2 clients sharing the GPU (gpus_per_client 0.5)", [], False),
    "dp-sgd": (
        "sample-level DP-SGD on the GPU (noise 1.0, clip 1.0, budget ε 10)",
        [
            "privacy.mode='sample'",
            "privacy.noise_multiplier=1.0",
            "privacy.max_grad_norm=1.0",
            "privacy.epsilon=10.0",
        ],
        False,
    ),
    "split-bf16": (
        "split learning over loopback gRPC, bf16 wire, client half on the GPU",
        ["adapter.method='split'", "split.wire_dtype='bf16'"],
        False,
    ),
    "deployed": ("fedft server + 2 fedft client processes (TLS, node keys)", [], True),
}


@dataclass
class Result:
    """One check: passed or not, why, peak device memory (MiB, None off CUDA), s per step."""

    name: str
    what: str
    ok: bool
    detail: str
    peak_mib: float | None = None
    step_s: float | None = None
    wall_s: float = 0.0
    log: list[str] = field(default_factory=list)


class DeviceMemory:
    """Peak device-wide memory in use (MiB) above what was in use at start, sampled."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.start = self.peak = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def _used() -> float:
        import torch

        free, total = torch.cuda.mem_get_info()
        return float(total - free)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._used())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> DeviceMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def _fedft(name: str, args: Sequence[str], log: Path) -> ChildProcess:
    """Start ``fedft ARGS`` in its own session, output to ``log``."""
    return ChildProcess(name, fedft_cli(*args), log, child_env()).start()


def _round_one(out: Path) -> dict[str, float]:
    """Round 1's row of ``out``/metrics.jsonl (raises when there is none)."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    return next(r for r in rows if r.get("round") == 1)


def _simulate(overrides: list[str], out: Path, log: Path) -> int:
    proc = _fedft(
        "simulate", ["simulate", QUICKSTART, "--out", str(out), *set_args(overrides)], log
    )
    try:
        return proc.wait(timeout=CHECK_TIMEOUT_S)
    finally:
        proc.stop(grace_s=30)


def _deploy(overrides: list[str], out: Path, log: Path) -> int:
    from fedft.certs import write_deployment_certs

    certs = write_deployment_certs(out.parent / "certs", clients=2).ca_cert.parent
    port = free_port()
    sets = set_args(overrides)
    server = _fedft(
        "server",
        ["server", QUICKSTART, "--out", str(out), "--certs", str(certs)]
        + ["--address", f"127.0.0.1:{port}", "--wait-clients", "300", *sets],
        log,
    )
    clients = [
        _fedft(
            f"client-{i}",
            ["client", QUICKSTART, "--partition", str(i), "--certs", str(certs)]
            + ["--server", f"127.0.0.1:{port}", *sets],
            log.with_name(f"client-{i}.log"),
        )
        for i in range(2)
    ]
    try:
        return server.wait(timeout=CHECK_TIMEOUT_S)
    finally:
        for p in [server, *clients]:  # what this check started, with what they started
            p.stop(grace_s=30)


def run_check(name: str, *, device: str, model: str, work: Path) -> Result:
    """Run check ``name`` on ``device``; never raises (a failure is a FAIL row)."""
    what, extra, deployed = CHECKS[name]
    overrides = [*BASE, f"model.name={json.dumps(model)}", f"federation.device='{device}'", *extra]
    if device == "cuda" and not deployed:
        overrides.append("federation.gpus_per_client=0.5")
    folder = work / name
    folder.mkdir(parents=True)
    out, log = folder / "run", folder / "run.log"
    import torch

    memory = DeviceMemory() if device == "cuda" and torch.cuda.is_available() else None
    t0 = time.perf_counter()
    with memory or contextlib.nullcontext():
        try:
            code = (_deploy if deployed else _simulate)(overrides, out, log)
        except subprocess.TimeoutExpired:
            code = -1
    result = Result(name, what, False, "", wall_s=time.perf_counter() - t0)
    result.peak_mib = memory.peak_mib if memory is not None else None
    tail = log.read_text(errors="replace").splitlines()[-20:] if log.is_file() else []
    if code != 0:
        result.detail = (
            f"exit {code} (timeout {CHECK_TIMEOUT_S} s)" if code == -1 else f"exit {code}"
        )
        result.log = tail
        return result
    try:
        row = _round_one(out)
    except (OSError, StopIteration, ValueError) as exc:
        result.detail, result.log = f"no round-1 metrics: {exc}", tail
        return result
    result.step_s = float(row["wall_s"]) / STEPS
    loss, clients = row.get("loss"), row.get("clients")
    if clients != 2 or loss is None or not math.isfinite(float(loss)):
        refused = row.get("refused", 0)
        result.detail = (
            f"round 1: {clients} of 2 clients aggregated ({refused} refused), loss {loss}"
        )
        result.log = tail
        return result
    result.ok = True
    result.detail = f"loss {float(loss):.4f}" + (
        f", ε {row['epsilon']:.2f}" if row.get("epsilon") is not None else ""
    )
    return result


def table(results: Sequence[Result]) -> str:
    rows = [
        [
            r.name,
            r.what,
            "pass" if r.ok else "FAIL",
            "-" if r.peak_mib is None else f"{r.peak_mib:,.0f}",
            "-" if r.step_s is None else f"{r.step_s:.3f}",
            f"{r.wall_s:.0f}",
            r.detail,
        ]
        for r in results
    ]
    header = ["check", "what", "result", "peak GPU MiB", "s / local step", "wall s", "detail"]
    return md_table(header, rows)


def cuda_status() -> str | None:
    """None when CUDA is usable, else one line saying why not and what to do."""
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (
            f"torch {torch.__version__} is a CPU build: no GPU check to run. On a Linux machine "
            "with an NVIDIA GPU, `make install` from PyPI installs the CUDA build."
        )
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu_check", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", default="minilm", help="model.name for every check")
    parser.add_argument("--only", default="", help="comma-separated checks (default: all)")
    parser.add_argument("--work", type=Path, default=None, help="keep the runs here")
    parser.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    args = parser.parse_args(argv)
    sim_env()
    if args.device == "cuda":
        why = cuda_status()
        if why is not None:
            print(f"gpu-check: skipped: {why}")
            return 0
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    with tempfile.TemporaryDirectory(prefix="fedft-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        results = []
        for name in names:
            print(f"gpu-check: {name} ...", flush=True)
            r = run_check(name, device=args.device, model=args.model, work=work)
            print(f"gpu-check: {name}: {'pass' if r.ok else 'FAIL'} ({r.detail})", flush=True)
            for line in r.log:
                print(f"    {line}")
            results.append(r)
    text = table(results)
    print(text)
    if args.device == "cuda" and not args.no_write:
        import torch

        write_section(
            "gpu_check",
            title="16. The GPU paths (`make gpu-check`)",
            command="make gpu-check",
            body=f"GPU: {torch.cuda.get_device_name(0)}\n\n" + text,
            doc=DOC,
        )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
