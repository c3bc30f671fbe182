"""Plots (PNG) and a self-contained HTML report of a run, and cross-run comparison plots.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no display, no
global backend switch), so this works headless and inside worker threads.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedft.reporting.metrics import read_metrics, read_summary

logger = logging.getLogger(__name__)

#: the task metric looked for when none is named, in order.
METRIC_CANDIDATES = ("accuracy", "f1", "perplexity", "eval_loss")
_BASE_COLUMNS = ("round", "loss", "bytes_up", "bytes_down", "epsilon", "clients", "wall_s")


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(rounds, values) of the rows whose ``key`` is a number."""
    xs, ys = [], []
    for row in rows:
        value = row.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


def pick_metric(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The task metric these rows carry: the first of ``METRIC_CANDIDATES`` present."""
    for name in METRIC_CANDIDATES:
        if _series(rows, name)[0]:
            return name
    return None


def _file_part(name: str) -> str:
    """``name`` reduced to characters safe in a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "metric"


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    return path


def _line_plot(
    path: Path,
    title: str,
    ylabel: str,
    lines: Mapping[str, tuple[Sequence[float], Sequence[float]]],
) -> Path:
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for label, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    return _save(fig, path)


def write_plots(
    rows: Sequence[Mapping[str, Any]], out_dir: str | Path, *, metric: str | None = None
) -> dict[str, Path]:
    """Write the per-round PNGs that exist for these rows.

    Produces ``plot_<metric>.png``, ``plot_loss.png``, ``plot_epsilon.png`` (only when some
    round has an ε), ``plot_bytes.png`` (bytes up and down per round) and
    ``plot_agg_error.png`` (only when some round has an ``agg_error``) in ``out_dir``.

    Returns:
        plot name ("metric", "loss", "epsilon", "bytes", "agg_error") -> path, for those
        written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metric = metric or pick_metric(rows)
    plots: dict[str, Path] = {}
    if metric is not None and _series(rows, metric)[0]:
        plots["metric"] = _line_plot(
            out / f"plot_{_file_part(metric)}.png",
            f"{metric} per round",
            metric,
            {metric: _series(rows, metric)},
        )
    if _series(rows, "loss")[0]:
        plots["loss"] = _line_plot(
            out / "plot_loss.png", "loss per round", "loss", {"loss": _series(rows, "loss")}
        )
    if _series(rows, "epsilon")[0]:
        plots["epsilon"] = _line_plot(
            out / "plot_epsilon.png",
            "privacy spent per round",
            "ε (max over clients)",
            {"ε": _series(rows, "epsilon")},
        )
    if _series(rows, "bytes_up")[0] or _series(rows, "bytes_down")[0]:
        plots["bytes"] = _line_plot(
            out / "plot_bytes.png",
            "communication per round",
            "bytes",
            {"up": _series(rows, "bytes_up"), "down": _series(rows, "bytes_down")},
        )
    if _series(rows, "agg_error")[0]:
        plots["agg_error"] = plot_agg_error({"": rows}, out, name="plot_agg_error.png")
    return plots


#: what agg_error measures, for plot titles and the report.
AGG_ERROR_MEANING = (
    "agg_error: ||update the global model received − Σ p_k s_k B_k A_k|| / ||Σ p_k s_k B_k A_k||"
    " over all adapted modules (each client's change from its start; 0 = exact)"
)


def plot_agg_error(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    out_dir: str | Path,
    *,
    name: str = "compare_agg_error.png",
) -> Path:
    """Plot ``agg_error`` per round for one or more runs (one line each).

    Args:
        runs: run label (e.g. the algorithm; "" for a single unlabelled run) -> its
            per-round rows (``metrics.jsonl``). Runs without any ``agg_error`` (secure
            aggregation, user-level DP, prompt tuning) are left out with a log line.
        out_dir: where the PNG goes.
        name: the PNG's file name.

    Returns:
        The PNG's path. The y axis is logarithmic when the values span more than 100x
        (exact methods sit at float rounding, ~1e-8, beside FedIT's ~0.1-1), with values
        of 0 drawn at 1e-12.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines: dict[str, tuple[list[int], list[float]]] = {}
    for label, rows in runs.items():
        xs, ys = _series(sorted(rows, key=lambda r: int(r["round"])), "agg_error")
        if xs:
            lines[label or "agg_error"] = (xs, ys)
        else:
            logger.info("run %r has no agg_error to plot", label)
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    values = [y for _, ys in lines.values() for y in ys]
    log = bool(values) and max(values) > 0 and max(values) > 100 * max(min(values), 1e-12)
    for label, (xs, ys) in lines.items():
        ax.plot(
            xs, [max(y, 1e-12) if log else y for y in ys], marker="o", markersize=3, label=label
        )
    if log:
        ax.set_yscale("log")
    ax.set_title("aggregation error per round")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("agg_error (relative, 0 = exact)")
    ax.grid(True, alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    return _save(fig, out / name)


#: most label (group) columns drawn in the partition heat map; the rest are summed.
MAX_HEATMAP_COLUMNS = 30


def plot_partition(partition: Mapping[str, Any], path: Path) -> Path:
    """Heat map of examples per client (rows) and label or group (columns).

    Args:
        partition: ``PartitionSummary.to_dict()``: ``names``, ``counts`` (clients x names),
            ``by`` and ``method``.
        path: the PNG to write.
    """
    names = [str(n) for n in partition["names"]]
    counts = [[int(c) for c in row] for row in partition["counts"]]
    if len(names) > MAX_HEATMAP_COLUMNS:  # keep the largest columns, sum the others
        totals = [sum(row[j] for row in counts) for j in range(len(names))]
        keep = sorted(range(len(names)), key=lambda j: (-totals[j], j))[: MAX_HEATMAP_COLUMNS - 1]
        keep.sort()
        rest = [j for j in range(len(names)) if j not in keep]
        names = [names[j] for j in keep] + [f"{len(rest)} others"]
        counts = [[row[j] for j in keep] + [sum(row[j] for j in rest)] for row in counts]
    rows, cols = len(counts), len(names)
    fig = Figure(figsize=(min(3 + 0.45 * cols, 16), min(1.5 + 0.32 * rows, 16)))
    ax = fig.add_subplot()
    image = ax.imshow(counts, aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="examples")
    ax.set_xticks(range(cols), names, rotation=45 if cols > 4 else 0, ha="right")
    step = max(1, rows // 40)
    ax.set_yticks(range(0, rows, step), [str(k) for k in range(0, rows, step)])
    ax.set_xlabel(str(partition.get("by", "label")))
    ax.set_ylabel("client")
    ax.set_title(f"partition {partition.get('method', '')!s}: examples per client")
    if rows * cols <= 400:  # numbers in the cells while they stay readable
        peak = max((max(row) for row in counts if row), default=0)
        for k, row in enumerate(counts):
            for j, value in enumerate(row):
                color = "black" if value > 0.6 * peak else "white"
                ax.text(j, k, str(value), ha="center", va="center", fontsize=7, color=color)
    return _save(fig, path)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return html.escape(str(value))


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = [c for c in _BASE_COLUMNS if any(c in r for r in rows)]
    for row in rows:
        columns += [k for k in row if k not in columns]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in columns) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(path.name)}</figcaption></figure>"
    )


_CSS = (
    "body{font-family:sans-serif;margin:2em;max-width:70em}"
    "table{border-collapse:collapse;font-size:90%}"
    "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
    "figure{display:inline-block;margin:0.5em}pre{background:#f6f6f6;padding:1em}"
)


def _audit_section(audit: Mapping[str, Any]) -> list[str]:
    """``[audit]``'s attacks on this run's payloads, one row per (attack, defence)."""
    rows = [dict(r) for r in audit.get("attacks", [])]
    for r in rows:
        r["defence"] = r.get("defence") or "none"
    return [
        "<h2>Audit: what a curious server recovers from this run</h2>",
        f"<p>Attacks run after the run on its own model, data and defences "
        f"({int(audit.get('examples', 0))} of client 0's examples, "
        f"{float(audit.get('seconds', 0.0)):.0f} s): recovery = fraction of real tokens whose "
        "id the server recovers from the cut activations; accuracy = labels read off one "
        "example's update of one step; f1 = tokens recovered from it. Each beside its chance "
        "level (blind_guess, chance, random_guess_f1). Measured on this run, not a bound: a "
        "client's update after several local steps can reveal more.</p>",
        _table(rows) if rows else "<p>No attack applies to this configuration.</p>",
    ]


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    rows: list[dict[str, Any]] | None = None,
    metric: str | None = None,
) -> Path:
    """Write the PNG plots and ``report.html`` of a run folder.

    Args:
        out_dir: the run folder (reads ``metrics.jsonl`` and, if present, ``summary.json``).
        title: the report's heading.
        rows: per-round rows; read from ``metrics.jsonl`` when None.
        metric: the task metric to plot; picked from ``METRIC_CANDIDATES`` when None.

    Returns:
        Path of ``report.html``. The PNGs are embedded (base64), so the file stands alone;
        they also stay next to it.
    """
    out = Path(out_dir)
    if rows is None:
        rows = read_metrics(out)
    metric = metric or pick_metric(rows)
    plots = write_plots(rows, out, metric=metric)
    summary = read_summary(out)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(rows)} rounds; task metric: {html.escape(metric or 'none recorded')}.</p>",
    ]
    if summary is not None and summary.get("final"):
        parts += ["<h2>Final figures</h2>", _table([{"round": "final", **summary["final"]}])]
    if summary is not None and summary.get("audit"):
        parts += _audit_section(summary["audit"])
    parts.append("<h2>Plots</h2>")
    for name, path in plots.items():
        parts.append(_img(path, name))
    if summary is not None and summary.get("partition"):
        partition = summary["partition"]
        heat = plot_partition(partition, out / "plot_partition.png")
        parts += [
            "<h2>What each client held</h2>",
            f"<p>partition {html.escape(str(partition.get('method')))}: examples per client "
            f"and {html.escape(str(partition.get('by', 'label')))} (mean distance of a "
            f"client's mix from the overall mix: {float(partition.get('skew', 0.0)):.2f}).</p>",
            _img(heat, "partition"),
        ]
    if "agg_error" in plots:
        parts.append(f"<p>{html.escape(AGG_ERROR_MEANING)}.</p>")
    if "epsilon" not in plots:
        parts.append("<p>No differential privacy in this run: no ε is reported.</p>")
    elif any(r.get("epsilon_covers") == "release" for r in rows):
        parts.append(
            "<p>ε is the release ε: it covers the trained parameters this run publishes. In "
            "split learning the activations and gradients that cross the cut are seen by the "
            "split server as they are: no ε covers them.</p>"
        )
    parts += ["<h2>Per-round metrics</h2>", _table(rows) if rows else "<p>No rounds.</p>"]
    if summary is not None and summary.get("config") is not None:
        config = json.dumps(summary["config"], indent=2, sort_keys=True)
        parts += ["<h2>Resolved configuration</h2>", f"<pre>{html.escape(config)}</pre>"]
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    logger.info("wrote %s with %d plots", path, len(plots))
    return path


def plot_compare(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, *, metric: str
) -> tuple[Path, Path]:
    """Compare runs: ``metric`` per round, and ``metric`` against cumulative total bytes.

    Args:
        runs: run label (e.g. the algorithm) -> its per-round rows.
        out_dir: where ``compare_<metric>_rounds.png`` and ``compare_<metric>_bytes.png`` go.
        metric: the row key to compare (e.g. "accuracy").

    Returns:
        (per-round plot, vs-bytes plot). Total bytes = Σ over rounds so far of
        bytes_up + bytes_down.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_round: dict[str, tuple[list[int], list[float]]] = {}
    vs_bytes: dict[str, tuple[list[float], list[float]]] = {}
    for label, rows in runs.items():
        ordered = sorted(rows, key=lambda r: int(r["round"]))
        per_round[label] = _series(ordered, metric)
        total, xs, ys = 0.0, [], []
        for row in ordered:
            total += float(row.get("bytes_up") or 0) + float(row.get("bytes_down") or 0)
            value = row.get(metric)
            if isinstance(value, int | float) and not isinstance(value, bool):
                xs.append(total)
                ys.append(float(value))
        vs_bytes[label] = (xs, ys)
        if not xs:
            logger.warning("run %r has no %r values to compare", label, metric)
    rounds_png = _line_plot(
        out / f"compare_{_file_part(metric)}_rounds.png", f"{metric} per round", metric, per_round
    )
    fig = Figure(figsize=(6, 3.6))
    ax = fig.add_subplot()
    for label, (xs, ys) in vs_bytes.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set_title(f"{metric} vs communication")
    ax.set_xlabel("cumulative bytes (up + down)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if any(xs and min(xs) > 0 and max(xs) / min(xs) > 100 for xs, _ in vs_bytes.values()):
        ax.set_xscale("log")
    ax.legend()
    bytes_png = _save(fig, out / f"compare_{_file_part(metric)}_bytes.png")
    return rounds_png, bytes_png


def _mean_band(
    series: Sequence[tuple[Sequence[float], Sequence[float]]],
) -> tuple[list[float], list[float], list[float], list[float]]:
    """Mean and Student-t interval per x over several (xs, ys) series.

    x values are the rounds; only the rounds every series has are kept. For one series the
    band is the line itself.
    """
    from fedft.reporting.spread import spread

    common = sorted(set.intersection(*(set(xs) for xs, _ in series))) if series else []
    xs_out, mean, low, high = [], [], [], []
    for x in common:
        values = [ys[list(xs).index(x)] for xs, ys in series]
        s = spread(values)
        xs_out.append(float(x))
        mean.append(s.mean)
        low.append(s.mean if s.low is None else s.low)
        high.append(s.mean if s.high is None else s.high)
    return xs_out, mean, low, high


def plot_compare_seeds(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
    out_dir: str | Path,
    *,
    metric: str,
    vs_bytes: bool | None = None,
) -> list[Path]:
    """Compare algorithms over seeds: the mean of ``metric`` with its 95 % t-interval.

    Args:
        runs: label (the algorithm) -> one list of per-round rows per seed.
        out_dir: where ``compare_<metric>_rounds.png`` (mean per round, the interval as a
            band) and ``compare_<metric>_bytes.png`` (mean against the mean cumulative
            bytes, the interval as error bars) go.
        metric: the row key (e.g. "accuracy", "agg_error").
        vs_bytes: also draw the bytes plot (default: for every metric but ``agg_error``).

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_seeds = max((len(per_seed) for per_seed in runs.values()), default=0)
    band = f"mean over {n_seeds} seeds, band: 95 % t-interval" if n_seeds > 1 else "one seed"
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    bands = {}
    for label, per_seed in runs.items():
        series = [_series(sorted(rows, key=lambda r: int(r["round"])), metric) for rows in per_seed]
        series = [s for s in series if s[0]]
        if series:
            bands[label] = (len(series), _mean_band(series))
        else:
            logger.warning("run %r has no %r values to compare", label, metric)
    means = [y for _, (_, ys, _, _) in bands.values() for y in ys]
    # exact aggregators' agg_error sits at float rounding beside FedIT's ~0.1: a log axis
    log = bool(means) and min(means) >= 0 and max(means) > 100 * max(min(means), 1e-12)
    for label, (n, (xs, mean, low, high)) in bands.items():
        if log:
            mean, low, high = ([max(y, 1e-12) for y in v] for v in (mean, low, high))
        (line,) = ax.plot(xs, mean, marker="o", markersize=3, label=label)
        if n > 1:
            ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    if log:
        ax.set_yscale("log")
    ax.set_title(f"{metric} per round ({band})", fontsize=10)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    paths = [_save(fig, out / f"compare_{_file_part(metric)}_rounds.png")]
    if vs_bytes is None:
        vs_bytes = metric != "agg_error"
    if not vs_bytes:
        return paths
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.add_subplot()
    spans = []
    for label, per_seed in runs.items():
        per_round: dict[int, tuple[list[float], list[float]]] = {}
        for rows in per_seed:
            total = 0.0
            for row in sorted(rows, key=lambda r: int(r["round"])):
                total += float(row.get("bytes_up") or 0) + float(row.get("bytes_down") or 0)
                value = row.get(metric)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    bx, by = per_round.setdefault(int(row["round"]), ([], []))
                    bx.append(total)
                    by.append(float(value))
        keep = sorted(r for r, (bx, _) in per_round.items() if len(bx) == len(per_seed))
        if not keep:
            continue
        from fedft.reporting.spread import spread

        xs = [sum(per_round[r][0]) / len(per_round[r][0]) for r in keep]
        stats = [spread(per_round[r][1]) for r in keep]
        ys = [s.mean for s in stats]
        err = [
            [s.mean - (s.low if s.low is not None else s.mean) for s in stats],
            [(s.high if s.high is not None else s.mean) - s.mean for s in stats],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", markersize=3, capsize=3, label=label)
        spans.append(xs)
    ax.set_title(f"{metric} vs communication ({band})", fontsize=10)
    ax.set_xlabel("cumulative bytes (up + down)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    if any(xs and min(xs) > 0 and max(xs) / min(xs) > 100 for xs in spans):
        ax.set_xscale("log")
    ax.legend(fontsize=8)
    paths.append(_save(fig, out / f"compare_{_file_part(metric)}_bytes.png"))
    return paths
