"""``fedft`` command line: simulate, privacy plan, and the deployment commands.

Entry points read as recipes: parse arguments -> load and validate the config -> hand over
to the recipe -> report. Bad configuration exits with code 2 before any work starts; a
failed run exits with 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from fedft.config import ConfigError, RunConfig, load_config

EXIT_OK, EXIT_FAILED, EXIT_BAD_CONFIG = 0, 1, 2


def _setup_environment() -> None:
    """Offline by default; quiet third-party loggers."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("flwr", "ray", "httpx", "transformers", "filelock", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args: argparse.Namespace) -> RunConfig:
    return load_config(args.config, args.set or ())


def _cmd_simulate(args: argparse.Namespace) -> int:
    cfg = _load(args)
    out = Path(args.out or f"runs/{cfg.name}")
    from simulations.simulate import SimulationFailed, simulate

    try:
        summary = simulate(cfg, out, progress=not args.no_progress)
    except SimulationFailed as exc:
        print(f"fedft simulate: {exc}", file=sys.stderr)
        return EXIT_FAILED
    before, final = summary["before"], summary["after"]
    metric = "accuracy" if cfg.model.task == "classification" else "loss"
    print(
        f"{cfg.name}: test {metric} {before[metric]:.4f} -> {final[metric]:.4f} "
        f"after {summary['rounds']} rounds in {summary['wall_s']:.0f} s; outputs in {out}/"
    )
    return EXIT_OK


def _add_config_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="run config (TOML)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set federation.rounds=2 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``fedft`` subcommand."""
    parser = argparse.ArgumentParser(prog="fedft", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federation on Flower's Simulation Engine")
    _add_config_args(sim)
    sim.add_argument("--out", help="output folder (default runs/<name>)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.set_defaults(func=_cmd_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedft`` command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_environment()
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        print(f"fedft: configuration error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
