"""Config load and partitioning: the hand-written code (before) vs pydantic / flwr-datasets.

The "before" code is read from git (``fedft/config.py`` and ``fedft/data/partition.py`` at
``BEFORE``, the commit before the pydantic config) and imported from a temporary folder, so
old and new run side by side in one process run:

- config: a fresh interpreter importing the module and loading ``simulations/quickstart.toml``
  (median of ``--starts`` runs), and ``load_config`` with three overrides in a warm process;
- partition: the 12,244 training records of the quickstart split (Rotten Tomatoes), every
  method the old code had, old vs new on the same keys (the splits must be identical), then
  the flwr-datasets methods (no old counterpart) and the one-off cost of importing them.

    python -m bench.config_partition [--starts 7] [--calls 200] [--repeat 15]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from bench import DOC, ROOT, Size, best_of, md_table, ratio_line, write_section

BEFORE = "de81431"
QUICKSTART = ROOT / "simulations" / "quickstart.toml"
OVERRIDES = ["federation.rounds=2", "aggregation.algorithm=flora", "adapter.ranks=[4, 8]"]
LIBRARY = ("pathological", "shard", "inner_dirichlet", "linear", "square", "natural_id")


def _old_source(path: str, folder: Path) -> Path:
    text = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{BEFORE}:{path}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    target = folder / Path(path).name.replace(".py", "_before.py")
    target.write_text(text)
    return target


def _module(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


_START = """
import importlib.util, sys, time
t = time.perf_counter()
spec = importlib.util.spec_from_file_location("cfgmod", {path!r})
m = importlib.util.module_from_spec(spec); sys.modules["cfgmod"] = m; spec.loader.exec_module(m)
m.load_config({toml!r})
print(time.perf_counter() - t)
"""


def _fresh_starts(paths: list[Path], starts: int) -> list[float]:
    """Median seconds for a fresh interpreter to import each path and load the quickstart.

    The interpreters alternate between the paths, so load on the machine hits both alike.
    """
    times: list[list[float]] = [[] for _ in paths]
    for _ in range(starts):
        for slot, path in zip(times, paths):
            code = _START.format(path=str(path), toml=str(QUICKSTART))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            slot.append(float(out.stdout.strip().splitlines()[-1]))
    return [statistics.median(t) for t in times]


def _import_seconds(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _interleaved(old: Callable[[], Any], new: Callable[[], Any], repeat: int) -> list[float]:
    """Fastest wall time of each, timed alternately (old, new, old, ...) ``repeat`` times."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for slot, fn in enumerate((old, new)):
            t0 = time.perf_counter()
            fn()
            best[slot] = min(best[slot], time.perf_counter() - t0)
    return best


def run(*, size: Size = "default", doc: Path | None = DOC, **kw: int) -> list[str]:
    """Measure old vs new; write the section; return the RATIO lines."""
    starts = kw.get("starts", 2 if size == "smoke" else 7)
    calls = kw.get("calls", 20 if size == "smoke" else 200)
    repeat = kw.get("repeat", 1 if size == "smoke" else 15)
    from fedft import builders, config
    from fedft.data import load_records, split_records
    from fedft.data import partition as new_partition

    with tempfile.TemporaryDirectory() as tmp:
        old_cfg_path = _old_source("fedft/config.py", Path(tmp))
        old_part = _module(_old_source("fedft/data/partition.py", Path(tmp)), "partition_before")
        old_cfg = _module(old_cfg_path, "config_before")
        new_cfg_path = Path(config.__file__)
        start_old, start_new = _fresh_starts([old_cfg_path, new_cfg_path], starts)
        pydantic_import = statistics.median(
            _import_seconds("import pydantic.dataclasses") for _ in range(starts)
        )
    load_old, load_new = (
        t / calls
        for t in _interleaved(
            lambda: [old_cfg.load_config(QUICKSTART, OVERRIDES) for _ in range(calls)],
            lambda: [config.load_config(QUICKSTART, OVERRIDES) for _ in range(calls)],
            repeat,
        )
    )
    rows = [
        ["config: fresh interpreter, import + load quickstart", start_old, start_new],
        ["  of which importing pydantic (new only)", 0.0, pydantic_import],
        ["config: load_config with 3 overrides (warm)", load_old, load_new],
    ]

    cfg = config.load_config(QUICKSTART)
    kwargs = builders.data_kwargs(cfg)
    records = load_records(kwargs["dataset"], task=kwargs["task"])
    train, _, _ = split_records(
        records,
        test_size=kwargs["test_size"],
        public_size=kwargs["public_size"],
        max_train_examples=kwargs["max_train_examples"],
        seed=cfg.seed,
    )
    labels, groups = list(train.target), list(train.group)
    n = len(labels)
    cases = [
        ("iid", labels, {}),
        ("dirichlet", labels, {"alpha": 2.0}),
        ("dirichlet", labels, {"alpha": 0.5}),
        ("natural", groups, {}),
    ]
    for method, keys, extra in cases:
        args = {"num_clients": 10, "method": method, "seed": 0, **extra}
        before = old_part.partition(keys, **args)
        after = new_partition(keys, **args)
        if before != after:
            raise AssertionError(f"{method} {extra}: the new code splits differently")
        t_old, t_new = _interleaved(
            lambda k=keys, a=args: old_part.partition(k, **a),
            lambda k=keys, a=args: new_partition(k, **a),
            2 * repeat,
        )
        label = ", ".join(f"{k}={v}" for k, v in extra.items())
        rows.append([f"partition {n:,} records: {method} {label}".rstrip(), t_old, t_new])

    table = md_table(
        ["what", "before (s)", "after (s)", "after / before"],
        [[r[0], f"{r[1]:.4f}", f"{r[2]:.4f}", f"{r[2] / r[1]:.2f}" if r[1] else "–"] for r in rows],
    )
    smoke = size == "smoke"
    import_fd = 0.0 if smoke else _import_seconds("import flwr_datasets.partitioner")
    lib_rows = []
    for method in () if smoke else LIBRARY:
        keys = groups if method == "natural_id" else labels
        clients = len(set(groups)) if method == "natural_id" else 10
        t, _ = best_of(
            lambda m=method, k=keys, c=clients: new_partition(k, num_clients=c, method=m),
            max(1, repeat // 2),
        )
        lib_rows.append([method, str(clients), f"{t:.3f}"])
    lib_table = md_table(["flwr-datasets method", "clients", "partition (s)"], lib_rows)
    print(table)
    print(lib_table)
    print(f"import flwr_datasets.partitioner in a fresh interpreter: {import_fd:.2f} s")
    lines = [
        ratio_line(
            "config_partition",
            f"config fresh start after/before {start_new / start_old:.2f}, warm load "
            f"{load_new / load_old:.2f}; partition after/before "
            + ", ".join(f"{r[0].split(': ')[1]} {r[2] / r[1]:.2f}" for r in rows[3:]),
        )
    ]
    load = os.getloadavg()[0]
    reading = (
        f"\n\n**Reading.** Measured with a load average of {load:.0f} on {os.cpu_count()} cores "
        "(other work running), so the absolute times are inflated and noisy. A fresh "
        f"interpreter takes {start_new - start_old:.2f} s longer to import and load the config, "
        f"{pydantic_import:.2f} s of it importing pydantic (once per process; every fedft "
        "command also imports torch and Flower); once imported, a load with overrides is "
        f"{load_old / load_new:.1f}x faster (pydantic-core validates, the old code walked "
        "the type hints in Python on every call). Partitioning runs the same code for the three "
        "old methods (the splits are identical, checked in the run): their after/before "
        "ratios show the timing noise, not a change."
    )
    body = (
        table
        + reading
        + "\n\nFlower Datasets' methods, which had no counterpart before (their first call in "
        f"a process also imports flwr-datasets: {import_fd:.2f} s in a fresh interpreter, "
        "datasets + pandas + seaborn):\n\n" + lib_table
    )
    write_section(
        "config_partition",
        title="11. Config load and partitioning: hand-written vs pydantic / flwr-datasets",
        command="python -m bench.config_partition",
        body=body,
        doc=doc,
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--starts", type=int, default=7, help="fresh interpreters per config")
    p.add_argument("--calls", type=int, default=200, help="load_config calls per timing")
    p.add_argument("--repeat", type=int, default=15, help="best of this many timings")
    p.add_argument("--no-doc", action="store_true", help="print only")
    args = p.parse_args(argv)
    run(
        doc=None if args.no_doc else DOC,
        starts=args.starts,
        calls=args.calls,
        repeat=args.repeat,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
