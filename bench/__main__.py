"""``python -m bench [--full] [--only NAME[,NAME...]]``: run the benchmark suite.

Runs every benchmark in turn (each measures ours and its reference side by side and writes
its section of docs/benchmarks.md), then ``bench.split_bench.main()``, whose table is
captured into the "split" section. Prints every ``RATIO`` line again at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import sys
import time
from collections.abc import Sequence

from bench import DOC, Size, machine, ratio_line, sim_env, write_section

NAMES = (
    "comm",
    "aggregation_cost",
    "dp_overhead",
    "overhead",
    "quality",
    "profile_sim",
    "sim_scale",
    "split",
    "secagg_round",
    "config_partition",
    "sim_paths",
    "deploy",
)


def run_split(size: Size) -> list[str]:
    """Run ``bench.split_bench.main()``, echo its table and store it in the doc."""
    from bench import split_bench

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        split_bench.main()
    table = buf.getvalue()
    print(table, end="")
    rows = [
        r.split("|") for r in table.splitlines() if r.startswith("| fp") or r.startswith("| bf")
    ]
    ratios = ", ".join(f"{r[1].strip()} {r[4].strip()}" for r in rows)
    write_section(
        "split",
        title="8. Split learning: a step over loopback gRPC vs in process",
        command="python -m bench --only split",
        body=table.strip()
        + "\n\n**Reading.** gRPC/in-process is the share of the in-process step rate kept when "
        "the body runs behind fedft's split-training gRPC service on loopback; bytes per "
        "sample against the analytic 4 T H b + T (activations up, body output down, two "
        "gradients, the padding mask) checks that nothing else travels.",
        doc=DOC if size != "smoke" else None,
    )
    return [ratio_line("split", f"gRPC/in-process steps/s per wire dtype: {ratios}")]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--full", action="store_true", help="larger settings")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {NAMES}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sim_env()
    size: Size = "full" if args.full else "default"
    chosen = [n for n in args.only.split(",") if n] or list(NAMES)
    unknown = sorted(set(chosen) - set(NAMES))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {list(NAMES)}")
    print(f"fedft benchmarks ({size}) on {machine()}", flush=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    for name in chosen:
        t = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            if name == "split":
                lines += run_split(size)
            else:
                lines += importlib.import_module(f"bench.{name}").run(size=size)
        except Exception as exc:  # noqa: BLE001 - one failure must not hide the others
            logging.getLogger("bench").exception("%s failed", name)
            lines.append(ratio_line(name, f"FAILED: {exc!r}"))
        print(f"== {name} done in {time.perf_counter() - t:.0f} s", flush=True)
    print(f"\nsuite done in {time.perf_counter() - t0:.0f} s; tables in {DOC}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
