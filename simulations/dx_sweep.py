"""Utility vs protection of the split cut: task accuracy and token recovery per d_χ ε.

``python -m simulations.dx_sweep CONFIG [--set K=V ...] --epsilons 1000,500,250,100
--out runs/dx_sweep``

CONFIG must be a split run (``adapter.method = "split"``). Every ε is its own simulation
(``simulate``) into ``OUT/dx-<ε>/`` with ``split.privatize = "dx"`` at that
``split.dx_epsilon``, and ``off`` the same run without it; every run is audited
(``[audit] enabled``), so each row has the run's test accuracy beside the fraction of client
0's tokens a curious split server recovers from what it received (the audit's ridge
inverter; with the noise on, the better of an inverter fitted on clean and on noised public
text). Writes ``OUT/dx_sweep.md``, ``OUT/dx_sweep.json`` and ``OUT/dx_sweep.png`` (accuracy
and recovery against ε, ``off`` drawn as dashed lines).
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

from fedft.config import RunConfig, build_config, load_config

logger = logging.getLogger(__name__)


def config_for(cfg: RunConfig, epsilon: float | None) -> RunConfig:
    """``cfg`` audited, with d_χ noise at ``epsilon`` on the cut (None: no noise)."""
    table = cfg.to_dict()
    table["name"] = f"{cfg.name}-dx-{_label(epsilon)}"
    table["split"]["privatize"] = "off" if epsilon is None else "dx"
    if epsilon is not None:
        table["split"]["dx_epsilon"] = epsilon
    table["audit"]["enabled"] = True
    return build_config(table)


def _label(epsilon: float | None) -> str:
    return "off" if epsilon is None else f"{epsilon:g}"


def row_of(epsilon: float | None, final: dict[str, Any], audit: dict[str, Any]) -> dict[str, Any]:
    """One table row from a run's ``final`` figures and its ``audit`` record."""
    cut = [r for r in audit["attacks"] if r["attack"] == "cut inversion"]
    clean = next(r for r in cut if r["defence"] == "none")
    seen = next((r for r in cut if r["defence"] != "none"), clean)
    return {
        "dx_epsilon": epsilon,
        "accuracy": final["after"].get("accuracy"),
        "accuracy_before": final["before"].get("accuracy"),
        "test_loss": final["after"].get("loss"),
        "recovery": seen["recovery"],
        "recovery_without_dx": clean["recovery"],
        "blind_guess": clean["blind_guess"],
        "rounds": final["rounds"],
        "wall_s": final["wall_s"],
    }


def sweep(
    cfg: RunConfig, out: Path, *, epsilons: Sequence[float], progress: bool = True
) -> list[dict[str, Any]]:
    """Run ``off`` and every ε; write the table, JSON and plot; return the rows."""
    from simulations.simulate import simulate

    if cfg.adapter.method != "split":
        raise ValueError("dx_sweep needs a split run: set adapter.method = 'split'")
    bad = [e for e in epsilons if not (e > 0 and math.isfinite(e))]
    if bad:
        raise ValueError(f"epsilons {bad}: each must be a finite number > 0 (e.g. 1000,250)")
    rows = []
    for epsilon in [None, *sorted(epsilons, reverse=True)]:
        run_cfg = config_for(cfg, epsilon)
        run_out = out / f"dx-{_label(epsilon)}"
        logger.info("dx_sweep: %s", _label(epsilon))
        final = simulate(run_cfg, run_out, progress=progress)
        audit = json.loads((run_out / "summary.json").read_text())["audit"]
        rows.append(row_of(epsilon, final, audit))
        logger.info("dx_sweep: %s", rows[-1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "dx_sweep.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "dx_sweep.md").write_text(table(rows))
    plot(rows, out / "dx_sweep.png")
    return rows


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of the sweep."""
    lines = [
        "| dx ε | test accuracy | test loss | tokens recovered (ridge) | blind guess |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        eps = "off" if r["dx_epsilon"] is None else f"{r['dx_epsilon']:g}"
        lines.append(
            f"| {eps} | {r['accuracy']:.3f} | {r['test_loss']:.3f} | {r['recovery']:.3f} "
            f"| {r['blind_guess']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Accuracy and recovery against ε (log x); the ``off`` run as dashed lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    noisy = [r for r in rows if r["dx_epsilon"] is not None]
    off = next((r for r in rows if r["dx_epsilon"] is None), None)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    xs = [r["dx_epsilon"] for r in noisy]
    for key, label, colour in (
        ("accuracy", "test accuracy", "C0"),
        ("recovery", "tokens recovered", "C3"),
    ):
        ax.plot(xs, [r[key] for r in noisy], marker="o", color=colour, label=label)
        if off is not None:
            ax.axhline(off[key], linestyle="--", color=colour, label=f"{label}, no dx")
    if off is not None:
        ax.axhline(off["blind_guess"], linestyle=":", color="grey", label="blind guess")
    ax.set_xscale("log")
    ax.set_xlabel("split.dx_epsilon (per token; larger = less noise)")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep; print the table."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a split run's config (TOML)")
    p.add_argument("--set", action="append", default=[], help="KEY=VALUE override")
    p.add_argument("--epsilons", default="1000,500,250,100", help="comma-separated dx ε")
    p.add_argument("--out", type=Path, default=Path("runs/dx_sweep"))
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(a.config, a.set)
    epsilons = [float(e) for e in a.epsilons.split(",") if e.strip()]
    rows = sweep(cfg, a.out, epsilons=epsilons, progress=not a.no_progress)
    sys.stdout.write(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
