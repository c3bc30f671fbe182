"""The ``fedft compare`` recipe: one config, every algorithm, the same split and seed.

Each algorithm runs as its own simulation (``simulate``) into ``OUT/<algorithm>/``; then one
table (``OUT/compare.md`` and ``OUT/compare.json``) and two plots (metric per round, metric vs
total bytes) are written. Algorithms that accept clients of different ranks (FLoRA, HetLoRA)
get the config's ``adapter.ranks``; the single-rank ones run every client at the smallest of
those ranks — the rank every client can afford, which is the comparison heterogeneous-rank
methods are meant to win.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedft.config import ALGORITHMS, MIXED_RANK_ALGORITHMS, ConfigError, RunConfig, build_config
from fedft.reporting.metrics import read_metrics
from fedft.reporting.report import plot_compare

logger = logging.getLogger(__name__)


def config_for(base: RunConfig | Mapping[str, Any], algorithm: str) -> RunConfig:
    """``base`` with ``algorithm``; single-rank algorithms at the smallest configured rank.

    ``base`` is a validated config or a raw table (TOML + overrides): its own
    ``aggregation.algorithm`` is replaced, so only the variants themselves are validated.
    """
    table = base.to_dict() if isinstance(base, RunConfig) else json.loads(json.dumps(base))
    name = table.get("name", "run")
    table.setdefault("aggregation", {})["algorithm"] = algorithm
    table["name"] = f"{name}-{algorithm}"
    adapter = table.get("adapter", {})
    ranks = list(adapter.get("ranks", [])) if isinstance(adapter, dict) else []
    if ranks and algorithm not in MIXED_RANK_ALGORITHMS:
        adapter["ranks"] = []
        adapter["rank"] = min(ranks)
    return build_config(table)


def configs_for(
    base: RunConfig | Mapping[str, Any], algorithms: Sequence[str]
) -> dict[str, RunConfig]:
    """Every algorithm's config, all validated before any run starts.

    Raises:
        ConfigError: naming every algorithm the config is refused for, and why.
    """
    configs, refused = {}, []
    for algorithm in algorithms:
        try:
            configs[algorithm] = config_for(base, algorithm)
        except ConfigError as exc:
            refused.append(f"{algorithm}: {exc}")
    if refused:
        allowed = [a for a in algorithms if a in configs]
        raise ConfigError(
            "this config is refused for "
            f"{len(refused)} of {len(algorithms)} algorithms (nothing was run):\n  "
            + "\n  ".join(refused)
            + (f"\nrun the others with --algorithms {','.join(allowed)}" if allowed else "")
        )
    return configs


def _row(algorithm: str, cfg: RunConfig, summary: dict[str, Any], metric: str) -> dict[str, Any]:
    ranks = cfg.adapter.ranks or [cfg.adapter.rank]
    return {
        "algorithm": algorithm,
        "ranks": "/".join(str(r) for r in sorted(set(ranks))),
        f"{metric}_before": summary["before"][metric],
        metric: summary["after"][metric],
        "loss": summary["after"]["loss"],
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "wall_s": summary["wall_s"],
    }


def _markdown(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """The comparison table; the loss column is left out when the metric is the loss."""
    extra = metric != "loss"
    head = f"| algorithm | ranks | {metric} before | {metric} after |"
    head += " loss |" if extra else ""
    lines = [head + " MB up | MB down | s |", "|---" * (7 + extra) + "|"]
    for r in rows:
        line = (
            f"| {r['algorithm']} | {r['ranks']} | {r[f'{metric}_before']:.4f} | {r[metric]:.4f} |"
        )
        line += f" {r['loss']:.4f} |" if extra else ""
        lines.append(
            line + f" {r['bytes_up'] / 1e6:.2f} | {r['bytes_down'] / 1e6:.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def compare(
    base: RunConfig | Mapping[str, Any],
    out: Path,
    *,
    algorithms: Sequence[str] = ALGORITHMS,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every algorithm on ``base``'s split; write the table and plots; return the rows.

    Every variant is validated before the first run (:func:`configs_for`).
    """
    from simulations.simulate import simulate

    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from {list(ALGORITHMS)}")
    configs = configs_for(base, algorithms)
    task = next(iter(configs.values())).model.task
    metric = "accuracy" if task == "classification" else "loss"
    rows, runs = [], {}
    for algorithm, run_cfg in configs.items():
        logger.info("compare: running %s", algorithm)
        summary = simulate(run_cfg, out / algorithm, progress=progress)
        rows.append(_row(algorithm, run_cfg, summary, metric))
        runs[algorithm] = read_metrics(out / algorithm)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "compare.md").write_text(_markdown(rows, metric))
    plot_compare(runs, out, metric=metric)
    return rows
