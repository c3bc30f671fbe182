"""The ``fedft compare`` recipe: one config, every algorithm, the same split and seed(s).

Each algorithm runs as its own simulation (``simulate``); then one table (``OUT/compare.md``
and ``OUT/compare.json``) and two plots (metric per round, metric vs total bytes) are
written. Algorithms that accept clients of different ranks (FLoRA, HetLoRA) get the config's
``adapter.ranks``; the single-rank ones run every client at the smallest of those ranks — the
rank every client can afford, which is the comparison heterogeneous-rank methods are meant
to win.

With one seed (the default) each algorithm runs into ``OUT/<algorithm>/`` on the config's
seed. With ``seeds = N > 1`` each algorithm runs on the seeds ``seed, seed + 1, ...,
seed + N - 1`` into ``OUT/<algorithm>/seed<s>/``: seed s gives every algorithm the same
split, test set and client sampling, and different seeds differ. The table then reports each
metric's mean ± std and 95 % Student-t interval over the seeds
(:mod:`fedft.reporting.spread`), the plots draw the mean with its interval, and the table
says which differences between algorithms exceed the spread.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedft.config import ALGORITHMS, MIXED_RANK_ALGORITHMS, ConfigError, RunConfig, build_config
from fedft.reporting.metrics import read_metrics
from fedft.reporting.report import plot_agg_error, plot_compare, plot_compare_seeds
from fedft.reporting.spread import INTERVAL_NAME, Spread, spreads_by_key, tell_apart

logger = logging.getLogger(__name__)

#: per-round keys whose mean over the rounds is reported per run when the rows carry them.
ROUND_MEANS = ("agg_error",)


def config_for(
    base: RunConfig | Mapping[str, Any], algorithm: str, *, seed: int | None = None
) -> RunConfig:
    """``base`` with ``algorithm``; single-rank algorithms at the smallest configured rank.

    ``base`` is a validated config or a raw table (TOML + overrides): its own
    ``aggregation.algorithm`` is replaced, so only the variants themselves are validated.
    ``seed`` replaces the config's seed (and names the run ``<name>-<algorithm>-seed<s>``).
    """
    table = base.to_dict() if isinstance(base, RunConfig) else json.loads(json.dumps(base))
    name = table.get("name", "run")
    table.setdefault("aggregation", {})["algorithm"] = algorithm
    table["name"] = f"{name}-{algorithm}"
    if seed is not None:
        table["seed"] = seed
        table["name"] += f"-seed{seed}"
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


def seeds_for(base: RunConfig | Mapping[str, Any], n: int) -> list[int]:
    """The ``n`` seeds of a compare: the config's seed and the ``n - 1`` after it."""
    if n < 1:
        raise ValueError(f"--seeds must be at least 1, got {n}")
    first = base.seed if isinstance(base, RunConfig) else int(base.get("seed", 0))
    return list(range(first, first + n))


def _round_means(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean over the trained rounds (round ≥ 1) of each :data:`ROUND_MEANS` key present."""
    out = {}
    for key in ROUND_MEANS:
        values = [
            float(r[key])
            for r in rows
            if int(r.get("round", 0)) >= 1
            and isinstance(r.get(key), int | float)
            and not isinstance(r.get(key), bool)
            and math.isfinite(r[key])
        ]
        if values:
            out[key] = math.fsum(values) / len(values)
    return out


def _row(
    algorithm: str,
    cfg: RunConfig,
    summary: dict[str, Any],
    metric: str,
    rounds: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
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
        **_round_means(rounds),
    }


def _markdown(rows: Sequence[dict[str, Any]], metric: str) -> str:
    """The comparison table; the loss column is left out when the metric is the loss.

    Rows carrying ``agg_error`` (mean over rounds) get that column; rows with a ``seed`` get a
    seed column after the algorithm.
    """
    extra = metric != "loss"
    agg = any("agg_error" in r for r in rows)
    seeded = any("seed" in r for r in rows)
    head = "| algorithm |" + (" seed |" if seeded else "")
    head += f" ranks | {metric} before | {metric} after |"
    head += " loss |" if extra else ""
    head += " agg_error |" if agg else ""
    lines = [head + " MB up | MB down | s |", "|---" * (7 + extra + agg + seeded) + "|"]
    for r in rows:
        line = f"| {r['algorithm']} |" + (f" {r.get('seed', '')} |" if seeded else "")
        line += f" {r['ranks']} | {r[f'{metric}_before']:.4f} | {r[metric]:.4f} |"
        line += f" {r['loss']:.4f} |" if extra else ""
        if agg:
            line += f" {r['agg_error']:.4g} |" if "agg_error" in r else " - |"
        lines.append(
            line + f" {r['bytes_up'] / 1e6:.2f} | {r['bytes_down'] / 1e6:.2f} | {r['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def _summary_rows(
    rows: Sequence[dict[str, Any]], algorithms: Sequence[str], metric: str
) -> list[dict[str, Any]]:
    """Per algorithm: ranks and the spread over seeds of every numeric column."""
    keys = [f"{metric}_before", metric, "loss", *ROUND_MEANS, "bytes_up", "bytes_down", "wall_s"]
    keys = list(dict.fromkeys(keys))  # the loss once when it is the metric
    out = []
    for algorithm in algorithms:
        mine = sorted((r for r in rows if r["algorithm"] == algorithm), key=lambda r: r["seed"])
        spreads = spreads_by_key(mine, keys)
        out.append(
            {
                "algorithm": algorithm,
                "ranks": mine[0]["ranks"],
                "seeds": [r["seed"] for r in mine],
                **{k: s.to_dict() for k, s in spreads.items()},
            }
        )
    return out


def _spread_of(entry: Mapping[str, Any], key: str) -> Spread | None:
    value = entry.get(key)
    if not isinstance(value, Mapping):
        return None
    return Spread(tuple(value["values"]), value["mean"], value["std"], value["low"], value["high"])


def _verdicts(summary: Sequence[Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Every pair of algorithms, told apart (or not) in the metric and, if different, the loss."""
    keys = [metric] + (["loss"] if metric != "loss" else [])
    out = []
    for a, b in itertools.combinations(summary, 2):
        for key in keys:
            sa, sb = _spread_of(a, key), _spread_of(b, key)
            if sa is None or sb is None:
                continue
            verdict = tell_apart(
                a["algorithm"],
                sa,
                b["algorithm"],
                sb,
                metric=key,
                higher_is_better=key != "loss",
                paired=a["seeds"] == b["seeds"],
            )
            out.append(verdict.to_dict())
    return out


def _seeds_markdown(
    summary: Sequence[Mapping[str, Any]],
    verdicts: Sequence[Mapping[str, Any]],
    rows: Sequence[dict[str, Any]],
    metric: str,
    seeds: Sequence[int],
) -> str:
    """Mean ± std and interval per algorithm, the differences in words, then every run."""
    extra = metric != "loss"
    agg = any("agg_error" in s for s in summary)
    head = f"| algorithm | ranks | {metric} before | {metric} after | 95 % interval |"
    head += " loss | loss 95 % interval |" if extra else ""
    head += " agg_error |" if agg else ""
    lines = [
        f"{len(seeds)} seeds ({', '.join(str(s) for s in seeds)}); mean ± std over the seeds "
        f"and the {INTERVAL_NAME}.",
        "",
        head + " MB up | MB down | s |",
        "|---" * (8 + 2 * extra + agg) + "|",
    ]
    for s in summary:
        m = _spread_of(s, metric)
        before = _spread_of(s, f"{metric}_before")
        assert m is not None and before is not None
        line = (
            f"| {s['algorithm']} | {s['ranks']} | {before.format()} | {m.format()} |"
            f" {m.format_interval()} |"
        )
        if extra:
            loss = _spread_of(s, "loss")
            assert loss is not None
            line += f" {loss.format()} | {loss.format_interval()} |"
        if agg:
            ae = _spread_of(s, "agg_error")
            line += f" {ae.format(spec='.2g')} |" if ae is not None else " - |"
        up, down, wall = (_spread_of(s, k) for k in ("bytes_up", "bytes_down", "wall_s"))
        assert up is not None and down is not None and wall is not None
        lines.append(line + f" {up.mean / 1e6:.2f} | {down.mean / 1e6:.2f} | {wall.mean:.0f} |")
    if agg:
        lines += ["", "agg_error: mean over the trained rounds of each run, then over the seeds."]
    lines += ["", "Differences beyond the spread over seeds:", ""]
    told = [v for v in verdicts if v["better"] is not None]
    untold = [v for v in verdicts if v["better"] is None]
    lines += [f"- {v['text']}" for v in told + untold] or ["- (one algorithm: nothing to compare)"]
    lines += ["", "Every run:", "", _markdown(rows, metric)]
    return "\n".join(lines)


def finished_run(run_out: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The final block of a finished run of exactly ``cfg`` in ``run_out``, or None.

    A run counts as finished when its ``summary.json`` exists and records this config (the
    whole resolved config, seed included, read through the validator so that a key added to
    fedft since, at its default, does not count as a difference); anything else is run
    again.
    """
    path = run_out / "summary.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("compare: %s is unreadable (%s): running it again", path, exc)
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("final"), dict):
        return None
    try:  # through the validator: a key added since, at its default, is the same config
        same = build_config(saved.get("config") or {}).to_dict() == cfg.to_dict()
    except ConfigError:
        same = False
    if not same:
        logger.warning(
            "compare: %s holds a run of another config: running it again",
            run_out,
            extra={"console": True},
        )
        return None
    return dict(saved["final"])


def _eta(done: int, total: int, elapsed: float) -> str:
    if done == 0:
        return ""
    left = elapsed / done * (total - done)
    return f", about {left / 60:.0f} min left" if left >= 60 else f", about {left:.0f} s left"


def compare(
    base: RunConfig | Mapping[str, Any],
    out: Path,
    *,
    algorithms: Sequence[str] = ALGORITHMS,
    seeds: int = 1,
    reuse: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run every algorithm on ``base``'s split; write the table and plots; return the rows.

    With ``seeds = N > 1`` every algorithm runs on N seeds (:func:`seeds_for`), into
    ``out/<algorithm>/seed<s>/``; the rows then carry their ``seed``, and the table and plots
    report the spread. Runs go seed by seed (every algorithm on the first seed, then the
    next), so a stopped compare leaves whole seeds behind. With ``reuse`` a run whose folder
    already holds a finished run of the same config (:func:`finished_run`) is read, not run
    again: a stopped compare continues, and a compare of more algorithms or seeds runs only
    what is new. Every variant is validated before the first run (:func:`configs_for`).
    """
    from simulations.simulate import simulate

    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        raise ValueError(f"unknown algorithms {unknown}; choose from {list(ALGORITHMS)}")
    configs = configs_for(base, algorithms)
    seed_list = seeds_for(base, seeds)
    task = next(iter(configs.values())).model.task
    metric = "accuracy" if task == "classification" else "loss"
    multi = seeds > 1
    plan = [(s, a) for s in seed_list for a in configs]
    rows: list[dict[str, Any]] = []
    runs: dict[str, list[list[dict[str, Any]]]] = {a: [] for a in configs}
    t0 = time.monotonic()
    for i, (seed, algorithm) in enumerate(plan):
        run_cfg = config_for(base, algorithm, seed=seed) if multi else configs[algorithm]
        run_out = out / algorithm / f"seed{seed}" if multi else out / algorithm
        label = f"{algorithm}, seed {seed}" if multi else algorithm
        logger.info(
            "compare: run %d of %d: %s (%.0f min so far%s)",
            i + 1,
            len(plan),
            label,
            (time.monotonic() - t0) / 60,
            _eta(i, len(plan), time.monotonic() - t0),
            extra={"console": True},
        )
        summary = finished_run(run_out, run_cfg) if reuse else None
        if summary is None:
            summary = simulate(run_cfg, run_out, progress=progress)
        else:
            logger.info(
                "compare: %s: reusing the finished run in %s",
                label,
                run_out,
                extra={"console": True},
            )
        per_round = read_metrics(run_out)
        row = _row(algorithm, run_cfg, summary, metric, per_round)
        if multi:
            row = {
                "algorithm": algorithm,
                "seed": seed,
                **{k: v for k, v in row.items() if k != "algorithm"},
            }
        rows.append(row)
        runs[algorithm].append(per_round)
        logger.info(
            "compare: %s done: %s %.4f, loss %.4f, %.0f s",
            label,
            metric,
            row[metric],
            row["loss"],
            row["wall_s"],
            extra={"console": True},
        )
    out.mkdir(parents=True, exist_ok=True)
    if not multi:
        (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
        (out / "compare.md").write_text(_markdown(rows, metric))
        plot_compare({a: r[0] for a, r in runs.items()}, out, metric=metric)
        if any("agg_error" in r for r in rows):
            plot_agg_error({a: r[0] for a, r in runs.items()}, out)
        return rows
    summary_rows = _summary_rows(rows, list(configs), metric)
    verdicts = _verdicts(summary_rows, metric)
    report = {
        "metric": metric,
        "seeds": seed_list,
        "interval": INTERVAL_NAME,
        "summary": summary_rows,
        "differences": verdicts,
        "runs": rows,
    }
    (out / "compare.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "compare.md").write_text(
        _seeds_markdown(summary_rows, verdicts, rows, metric, seed_list)
    )
    plot_compare_seeds(runs, out, metric=metric)
    if any("agg_error" in r for r in rows):
        plot_compare_seeds(runs, out, metric="agg_error")
    return rows
