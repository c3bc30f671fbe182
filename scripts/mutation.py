"""Mutation testing of the core (``make mutation``; outside CI): mutmut, one module at a time.

For each module the tracked files are copied to a scratch folder, mutmut is configured there
to mutate only that module and to run only the fast unit tests that cover it, and it runs
niced on one worker. mutmut records which tests execute each function and runs only those
against that function's mutants, the fastest first. The score is killed / (killed + survived
+ no tests): a mutant that no selected test executes counts as not caught. Mutants not run
(a run stopped by ``--budget``) are reported apart, as the fraction of the module that ran.

    python scripts/mutation.py                 # every module
    python scripts/mutation.py secagg serde    # some of them
    python scripts/mutation.py --keep DIR      # keep the scratch folders (browse survivors)
    python scripts/mutation.py privacy --keep DIR --budget 1800   # stop after 30 min
    python scripts/mutation.py privacy --keep DIR --rerun         # after adding tests

``--rerun`` copies the current tests into the kept folder and runs again exactly the mutants
that survived or had no test, and those a ``--budget`` left unrun (the selection of test files
must not have changed: mutmut forgets every result when it does).

Needs mutmut (``pip install -r requirements-dev.txt``; ``make mutation`` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent

#: module -> (glob of the files to mutate, the fast tests that cover it)
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "secagg": ("fedft/secagg/*", ("tests/test_secagg.py",)),
    "serde": ("fedft/transport/serde.py", ("tests/test_serde.py",)),
    "privacy": (
        "fedft/privacy/*",
        (
            "tests/test_privacy.py",
            "tests/test_privacy_dpsgd.py",
            "tests/test_privacy_guarantees.py",
            "tests/test_split_dp.py",
            "tests/test_resume_state.py",
        ),
    ),
    "aggregation": (
        "fedft/aggregation/*",
        (
            "tests/test_aggregation.py",
            "tests/test_aggregation_invariants.py",
            "tests/test_robust.py",
            "tests/test_validate.py",
            "tests/test_resume_state.py",
            "tests/test_agg_error.py",
            "tests/test_server_opt.py",
        ),
    ),
}

_STATUS = re.compile(r"^\s*(\S+): (\w[\w ]*)$")


def _copy_tree(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = Path(raw.decode())
        src = ROOT / rel
        if not src.is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)


def _mutmut_table(module: str) -> str:
    """The ``[tool.mutmut]`` table for one module (appended to the scratch pyproject.toml)."""
    pattern, tests = MODULES[module]
    table = {
        "source_paths": ["fedft"],
        "only_mutate": [pattern],
        "pytest_add_cli_args_test_selection": list(tests),
        "pytest_add_cli_args": ["-p", "no:cacheprovider", "-m", "not slow"],
        "also_copy": ["server", "client", "simulations", "scripts", "bench", "protos"],
    }
    return "\n[tool.mutmut]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items())


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return env


def _mutmut() -> str:
    return str(Path(sys.executable).parent / "mutmut")


def _results(scratch: Path) -> dict[str, str]:
    """mutant name -> mutmut status, for every mutant of the module."""
    listing = subprocess.run(
        [_mutmut(), "results", "--all", "true"],
        cwd=scratch,
        env=_env(),
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    out: dict[str, str] = {}
    for line in listing.splitlines():
        m = _STATUS.match(line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _run_mutmut(scratch: Path, names: list[str], *, workers: int, budget: float | None) -> float:
    """``mutmut run`` (all mutants, or ``names``), stopped by SIGINT after ``budget`` s."""
    t0 = time.monotonic()
    with (scratch / "mutmut-run.log").open("a") as fh:
        proc = subprocess.Popen(  # nice execs mutmut: SIGINT reaches mutmut, which stops cleanly
            ["nice", "-n", "10", _mutmut(), "run", "--max-children", str(workers), *names],
            cwd=scratch,
            env=_env(),
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            # mutmut saves each result as it comes; it may finish the mutant in hand on
            # SIGINT, so SIGTERM follows, then SIGKILL (results so far are kept either way)
            for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 30), (signal.SIGKILL, None)):
                proc.send_signal(sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return time.monotonic() - t0


def _summary(module: str, statuses: dict[str, str], wall: float) -> dict[str, object]:
    counts: dict[str, int] = {}
    for status in statuses.values():
        counts[status] = counts.get(status, 0) + 1
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    judged = killed + counts.get("survived", 0) + counts.get("no tests", 0)
    return {
        "module": module,
        "mutants": len(statuses),
        "run": len(statuses) - counts.get("not checked", 0),
        "counts": counts,
        "score": round(100 * killed / judged, 1) if judged else None,
        "wall_s": round(wall),
        "survivors": sorted(n for n, st in statuses.items() if st == "survived"),
    }


def run_module(
    module: str, scratch: Path, *, workers: int = 1, budget: float | None = None
) -> dict[str, object]:
    """Run mutmut over one module in ``scratch``; return its counts, score and wall time."""
    _copy_tree(scratch)
    pyproject = scratch / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + _mutmut_table(module))
    wall = _run_mutmut(scratch, [], workers=workers, budget=budget)
    return _summary(module, _results(scratch), wall)


def rerun_module(
    module: str, scratch: Path, *, workers: int = 1, budget: float | None = None
) -> dict[str, object]:
    """Copy the current tests into a kept ``scratch``; run its uncaught and its unrun mutants."""
    for dest in (scratch / "tests", scratch / "mutants" / "tests"):
        shutil.copytree(ROOT / "tests", dest, dirs_exist_ok=True)
    before = _results(scratch)
    names = sorted(n for n, st in before.items() if st in ("survived", "no tests", "not checked"))
    wall = _run_mutmut(scratch, names, workers=workers, budget=budget) if names else 0.0
    return _summary(module, _results(scratch), wall)


def main(argv: list[str]) -> int:
    """Run the chosen modules and print one line per module plus a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default all)")
    parser.add_argument("--keep", type=Path, help="keep each module's scratch folder here")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--budget", type=float, help="stop each module after this many seconds (a sample)"
    )
    parser.add_argument(
        "--rerun",
        action="store_true",
        help="with --keep: re-run the survived, untested and unrun mutants with the current tests",
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="mutants tested at once (default 1: a shared box)"
    )
    args = parser.parse_args(argv)
    if args.rerun and not args.keep:
        parser.error("--rerun needs --keep DIR (the folder of an earlier run)")
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown}; choose from {', '.join(MODULES)}")
    results = []
    for module in args.modules or list(MODULES):
        opts = {"workers": args.workers, "budget": args.budget}
        if args.rerun:
            scratch = args.keep / module
            if not (scratch / "mutants").is_dir():
                parser.error(f"{scratch} holds no earlier mutmut run of {module}")
            res = rerun_module(module, scratch, **opts)
        elif args.keep:
            scratch = args.keep / module
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            res = run_module(module, scratch, **opts)
        else:
            with tempfile.TemporaryDirectory(prefix=f"fedft-mutation-{module}-") as tmp:
                res = run_module(module, Path(tmp), **opts)
        results.append(res)
        c = cast("dict[str, int]", res["counts"])
        print(
            f"{module}: score {res['score']}% (killed {c.get('killed', 0)}, timeout "
            f"{c.get('timeout', 0)}, survived {c.get('survived', 0)}, no tests "
            f"{c.get('no tests', 0)}); ran {res['run']} of {res['mutants']} mutants, "
            f"{res['wall_s']} s",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
