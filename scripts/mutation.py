"""Mutation testing of the core (``make mutation``; outside CI): mutmut, one module at a time.

For each module the tracked files are copied to a scratch folder, mutmut is configured there
to mutate only that module and to run only the fast unit tests that cover it, and it runs
niced on one worker. The score is killed / (killed + survived) over the mutants that some
test executes, as mutmut counts it; mutants no selected test executes are listed apart.

    python scripts/mutation.py                 # every module
    python scripts/mutation.py secagg serde    # some of them
    python scripts/mutation.py --keep DIR      # keep the scratch folders (browse survivors)

Needs mutmut (``pip install -r requirements-dev.txt``; ``make mutation`` installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: module -> (glob of the files to mutate, the fast tests that cover it)
MODULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "secagg": ("fedft/secagg/*", ("tests/test_secagg.py",)),
    "serde": ("fedft/transport/serde.py", ("tests/test_serde.py",)),
    "privacy": (
        "fedft/privacy/*",
        ("tests/test_privacy.py", "tests/test_privacy_dpsgd.py", "tests/test_resume_state.py"),
    ),
    "aggregation": (
        "fedft/aggregation/*",
        (
            "tests/test_aggregation.py",
            "tests/test_aggregation_invariants.py",
            "tests/test_robust.py",
            "tests/test_validate.py",
            "tests/test_resume_state.py",
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


def run_module(module: str, scratch: Path) -> dict[str, object]:
    """Run mutmut over one module in ``scratch``; return its counts, score and wall time."""
    _copy_tree(scratch)
    pyproject = scratch / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + _mutmut_table(module))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    mutmut = [str(Path(sys.executable).parent / "mutmut")]
    t0 = time.monotonic()
    log = scratch / "mutmut-run.log"
    with log.open("w") as fh:
        subprocess.run(
            ["nice", "-n", "10", *mutmut, "run", "--max-children", "1"],
            cwd=scratch,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
            check=False,
        )
    wall = time.monotonic() - t0
    listing = subprocess.run(
        [*mutmut, "results", "--all", "true"],
        cwd=scratch,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    counts: dict[str, int] = {}
    survivors: list[str] = []
    for line in listing.splitlines():
        m = _STATUS.match(line)
        if not m:
            continue
        name, status = m.group(1), m.group(2).strip()
        counts[status] = counts.get(status, 0) + 1
        if status == "survived":
            survivors.append(name)
    killed = counts.get("killed", 0) + counts.get("timeout", 0)
    tested = killed + counts.get("survived", 0)
    return {
        "module": module,
        "counts": counts,
        "score": round(100 * killed / tested, 1) if tested else None,
        "wall_s": round(wall),
        "survivors": survivors,
    }


def main(argv: list[str]) -> int:
    """Run the chosen modules and print one line per module plus a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help=f"some of {', '.join(MODULES)} (default all)")
    parser.add_argument("--keep", type=Path, help="keep each module's scratch folder here")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.modules) - set(MODULES))
    if unknown:
        parser.error(f"unknown modules {unknown}; choose from {', '.join(MODULES)}")
    results = []
    for module in args.modules or list(MODULES):
        if args.keep:
            scratch = args.keep / module
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
            res = run_module(module, scratch)
        else:
            with tempfile.TemporaryDirectory(prefix=f"fedft-mutation-{module}-") as tmp:
                res = run_module(module, Path(tmp))
        results.append(res)
        c = res["counts"]
        print(
            f"{module}: score {res['score']}% (killed {c.get('killed', 0)}, timeout "
            f"{c.get('timeout', 0)}, survived {c.get('survived', 0)}, no tests "
            f"{c.get('no tests', 0)}), {res['wall_s']} s",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
