"""Utility vs privacy: each algorithm without DP and at each ε, on one split and seed.

``python -m simulations.dp_sweep CONFIG [--set K=V ...] --epsilons 1,3,8
--algorithms fedit,fedsb --out runs/dp_sweep``

Every (algorithm, ε) pair is its own simulation (``simulate``) into ``OUT/<algorithm>-<ε>/``
with sample-level DP-SGD (``privacy.mode = "sample"``, noise calibrated by each client over
the whole planned run); ``off`` is the same run without DP. Writes ``OUT/dp_sweep.md``,
``OUT/dp_sweep.json`` and ``OUT/dp_sweep.png`` (the metric against ε, one line per
algorithm, the no-DP value drawn as a dashed line). The noise multiplier column is what the
clients train with: the smallest and the largest σ over the clients (each client's own
budget, or the configured ``privacy.noise_multiplier``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedft.config import ALGORITHMS, RunConfig, build_config, load_config

logger = logging.getLogger(__name__)

#: algorithms sample-level DP is compared on by default (the Fed-SB paper's comparison).
DEFAULT_ALGORITHMS = ("fedit", "fedsb")


def config_for(cfg: RunConfig, algorithm: str, epsilon: float | None) -> RunConfig:
    """``cfg`` with ``algorithm``, and sample-level DP at ``epsilon`` (None: DP off)."""
    table = cfg.to_dict()
    table["aggregation"]["algorithm"] = algorithm
    table["name"] = f"{cfg.name}-{algorithm}-{_label(epsilon)}"
    table["privacy"]["mode"] = "off" if epsilon is None else "sample"
    if epsilon is not None:
        table["privacy"]["epsilon"] = epsilon
    return build_config(table)


def _label(epsilon: float | None) -> str:
    return "off" if epsilon is None else f"eps{epsilon:g}"


def noise_range(cfg: RunConfig) -> tuple[float, float]:
    """The smallest and largest σ ``cfg``'s clients train with (their own calibration)."""
    from fedft import builders
    from fedft.data import build_federated_data

    fed = build_federated_data(**builders.data_kwargs(cfg))
    sigmas = [builders.client_sigma(cfg, i, len(records)) for i, records in enumerate(fed.clients)]
    return min(sigmas), max(sigmas)


def sweep(
    cfg: RunConfig,
    out: Path,
    *,
    algorithms: Sequence[str] = DEFAULT_ALGORITHMS,
    epsilons: Sequence[float] = (1.0, 3.0, 8.0),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every (algorithm, ε) pair and ``off``; write the table and plot; return the rows."""
    from simulations.simulate import simulate

    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from {list(ALGORITHMS)}")
    bad = [e for e in epsilons if not (e > 0 and math.isfinite(e))]
    if bad:
        raise ValueError(f"epsilons {bad}: each must be a finite number > 0 (e.g. 1,3,8)")
    metric = "accuracy" if cfg.model.task == "classification" else "loss"
    rows: list[dict[str, Any]] = []
    for algorithm in algorithms:
        for epsilon in [None, *sorted(epsilons)]:
            run_cfg = config_for(cfg, algorithm, epsilon)
            logger.info("dp_sweep: %s at %s", algorithm, _label(epsilon))
            summary = simulate(run_cfg, out / f"{algorithm}-{_label(epsilon)}", progress=progress)
            sigma = noise_range(run_cfg) if epsilon is not None else None
            rows.append(
                {
                    "algorithm": algorithm,
                    "epsilon_target": epsilon,
                    "epsilon_spent": summary.get("epsilon"),
                    "sigma_min": None if sigma is None else sigma[0],
                    "sigma_max": None if sigma is None else sigma[1],
                    f"{metric}_before": summary["before"][metric],
                    metric: summary["after"][metric],
                    "loss": summary["after"]["loss"],
                    "wall_s": summary["wall_s"],
                }
            )
            (out / "dp_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "dp_sweep.md").write_text(markdown(rows, metric))
    plot(rows, out / "dp_sweep.png", metric=metric)
    return rows


def markdown(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """The sweep as a markdown table."""
    lines = [
        f"| algorithm | ε target | ε spent | σ (clients) | {metric} before | {metric} after "
        "| loss | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "off" if r["epsilon_target"] is None else f"{r['epsilon_target']:g}"
        spent = "-" if r["epsilon_spent"] is None else f"{r['epsilon_spent']:.2f}"
        sigma = "-" if r["sigma_min"] is None else f"{r['sigma_min']:.2f}–{r['sigma_max']:.2f}"
        lines.append(
            f"| {r['algorithm']} | {target} | {spent} | {sigma} | {r[f'{metric}_before']:.4f} | "
            f"{r[metric]:.4f} | {r['loss']:.4f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path, *, metric: str) -> Path:
    """``metric`` against ε (log axis), one line per algorithm; no-DP values dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for i, algorithm in enumerate(dict.fromkeys(r["algorithm"] for r in rows)):
        mine = [r for r in rows if r["algorithm"] == algorithm]
        dp = sorted((r["epsilon_target"], r[metric]) for r in mine if r["epsilon_target"])
        color = f"C{i}"
        if dp:
            ax.plot(*zip(*dp, strict=True), marker="o", color=color, label=f"{algorithm} (DP)")
        for r in mine:
            if r["epsilon_target"] is None:
                ax.axhline(r[metric], color=color, linestyle="--", label=f"{algorithm}, no DP")
    ax.set_xscale("log")
    ticks = sorted({r["epsilon_target"] for r in rows if r["epsilon_target"]})
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("ε (δ fixed; sample-level DP-SGD)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} vs privacy budget")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the sweep, print the table."""
    p = argparse.ArgumentParser(prog="python -m simulations.dp_sweep", description=__doc__)
    p.add_argument("config", help="run config (TOML)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default="runs/dp_sweep", help="output folder")
    p.add_argument("--epsilons", default="1,3,8", help="comma-separated budgets ε")
    p.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        epsilons = [float(e) for e in args.epsilons.split(",") if e.strip()]
    except ValueError:
        epsilons = []
    if not epsilons or not all(e > 0 and math.isfinite(e) for e in epsilons):
        p.error(f"--epsilons {args.epsilons!r}: expected finite numbers > 0 separated by commas")
    cfg = load_config(args.config, args.set)
    rows = sweep(
        cfg,
        Path(args.out),
        algorithms=[a for a in args.algorithms.split(",") if a],
        epsilons=epsilons,
        progress=not args.no_progress,
    )
    sys.stdout.write(markdown(rows, "accuracy" if cfg.model.task == "classification" else "loss"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
