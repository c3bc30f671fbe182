"""metrics.jsonl, summary.json, PNG plots and report.html."""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch

from fedft.config import RunConfig
from fedft.reporting import MetricsWriter, read_metrics, read_summary, write_summary
from fedft.reporting.report import plot_compare, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _write_rounds(out: Path, *, dp: bool, rounds: int = 4) -> MetricsWriter:
    w = MetricsWriter(out)
    for r in range(1, rounds + 1):
        w.write(
            round=r,
            loss=1.0 / r,
            accuracy=0.5 + 0.1 * r,
            bytes_up=1000 * r,
            bytes_down=2000,
            epsilon=0.7 * r if dp else None,
            clients=5,
            wall_s=1.5,
            lr=torch.tensor(5e-4),  # tensor scalars are written as numbers
        )
    return w


def test_metrics_writer_appends_flushed_rows(tmp_path: Path) -> None:
    w = _write_rounds(tmp_path / "run", dp=False, rounds=3)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3  # visible on disk without closing anything
    rows = read_metrics(tmp_path / "run")
    assert [r["round"] for r in rows] == [1, 2, 3]
    required = {"round", "loss", "accuracy", "bytes_up", "bytes_down", "epsilon", "clients"}
    assert required | {"wall_s", "lr"} == set(rows[0])
    assert rows[0]["epsilon"] is None and rows[2]["bytes_up"] == 3000
    assert rows[1]["lr"] == pytest.approx(5e-4)
    with pytest.raises(ValueError, match="not after the last round"):
        w.write(round=3, loss=0.1, bytes_up=0, bytes_down=0, clients=1, wall_s=0.0)
    # a resumed run continues the same file and keeps the round order
    w2 = MetricsWriter(tmp_path / "run")
    with pytest.raises(ValueError, match="not after the last round written \\(3\\)"):
        w2.write(round=2, loss=0.1, bytes_up=0, bytes_down=0, clients=1, wall_s=0.0)
    row = w2.write(round=4, loss=math.nan, bytes_up=1, bytes_down=1, clients=1, wall_s=0.0)
    assert row["loss"] is None  # JSON has no NaN
    assert [r["round"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="bytes_up"):
        w2.write(round=5, loss=0.1, bytes_up=-1, bytes_down=0, clients=1, wall_s=0.0)


def test_read_metrics_skips_a_torn_last_line_but_not_a_bad_middle_one(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 1, "loss": 1.0}\n{"round": 2, "lo')
    assert [r["round"] for r in read_metrics(p)] == [1]
    p.write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(p)


def test_write_summary_is_atomic_and_complete(tmp_path: Path) -> None:
    cfg = RunConfig().to_dict()
    final = {"accuracy": 0.81, "bytes_total": 123456, "epsilon": None, "nan": math.nan}
    path = write_summary(tmp_path, final=final, config=cfg)
    data = json.loads(path.read_text())
    assert data["config"] == json.loads(json.dumps(cfg))
    assert data["final"] == {**final, "nan": None}
    assert read_summary(tmp_path) == data
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp files left
    with pytest.raises(TypeError, match="final.bad"):
        write_summary(tmp_path, final={"bad": object()}, config=cfg)
    assert json.loads(path.read_text()) == data  # a failed write leaves the old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [
        base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', html_text)
    ]


@pytest.mark.parametrize("dp", [True, False])
def test_report_with_and_without_epsilon(tmp_path: Path, dp: bool) -> None:
    _write_rounds(tmp_path, dp=dp)
    write_summary(tmp_path, final={"accuracy": 0.9}, config={"name": "quick<start>"})
    report = write_report(tmp_path, title="Run & report")
    assert report == tmp_path / "report.html"
    text = report.read_text()
    expected = {"plot_accuracy.png", "plot_loss.png", "plot_bytes.png"}
    if dp:
        expected.add("plot_epsilon.png")
    assert {p.name for p in tmp_path.glob("*.png")} == expected
    for name in expected:
        w, h = _png_size(tmp_path / name)
        assert (w, h) == (600, 360)
    pngs = _embedded_pngs(text)
    assert len(pngs) == len(expected) and all(p.startswith(PNG_MAGIC) for p in pngs)
    assert ("No differential privacy" in text) is (not dp)
    assert "Run &amp; report" in text and "quick&lt;start&gt;" in text  # escaped
    # one table row per round plus the final-figures row
    assert text.count("<tr>") == 1 + 4 + 2
    assert "0.9" in text and "4000" in text


def test_report_from_rows_without_summary(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"round": r, "loss": 3.0 - r, "perplexity": 20.0 / r, "bytes_up": 10, "bytes_down": 5}
        for r in (1, 2)
    ]
    path = write_report(tmp_path, title="lm", rows=rows)
    text = path.read_text()
    assert (tmp_path / "plot_perplexity.png").is_file()
    assert "Resolved configuration" not in text and "task metric: perplexity" in text


def test_plot_compare_makes_two_valid_plots(tmp_path: Path) -> None:
    runs = {}
    for algo, up in (("fedit", 1000), ("fedsb", 50)):
        out = tmp_path / algo
        w = MetricsWriter(out)
        for r in range(1, 4):
            w.write(
                round=r,
                loss=1.0,
                accuracy=0.6 + 0.05 * r,
                bytes_up=up,
                bytes_down=up,
                clients=2,
                wall_s=0.1,
            )
        runs[algo] = read_metrics(out)
    rounds_png, bytes_png = plot_compare(runs, tmp_path / "cmp", metric="accuracy")
    assert rounds_png.name == "compare_accuracy_rounds.png"
    assert bytes_png.name == "compare_accuracy_bytes.png"
    for p in (rounds_png, bytes_png):
        assert _png_size(p) == (600, 360)
    assert rounds_png.read_bytes() != bytes_png.read_bytes()


def test_partition_heat_map_in_summary_and_report(tmp_path: Path) -> None:
    from fedft.data import PartitionSummary

    _write_rounds(tmp_path, dp=False)
    summary = PartitionSummary.of(
        [[0, 1, 2], [3, 4], [5]], [1, 1, 0, 0, 0, 1], ("rotten", "fresh"), method="x", by="label"
    )
    write_summary(tmp_path, final={}, config={}, partition=summary.to_dict())
    assert read_summary(tmp_path)["partition"]["counts"] == [[1, 2], [2, 0], [0, 1]]
    text = write_report(tmp_path, title="t").read_text()
    assert "What each client held" in text and "partition x" in text
    heat = tmp_path / "plot_partition.png"
    assert heat.read_bytes().startswith(PNG_MAGIC) and heat.read_bytes() in _embedded_pngs(text)
    # many groups: the 29 largest are drawn, the rest summed into one column
    many = {"names": [f"g{j}" for j in range(80)], "counts": [list(range(80))] * 3}
    from fedft.reporting.report import plot_partition

    assert plot_partition(many, tmp_path / "many.png").read_bytes().startswith(PNG_MAGIC)


def test_report_plots_agg_error_when_rounds_carry_it(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"round": 0, "accuracy": 0.5},  # round 0 (the untuned model) has no aggregation
        *({"round": r, "accuracy": 0.5 + 0.1 * r, "agg_error": 0.4 / r} for r in (1, 2, 3)),
    ]
    text = write_report(tmp_path, title="fedit", rows=rows).read_text()
    assert _png_size(tmp_path / "plot_agg_error.png") == (600, 360)
    assert len(_embedded_pngs(text)) == 2  # accuracy and agg_error
    assert "Σ p_k s_k B_k A_k" in text
    plain = tmp_path / "plain"
    write_report(plain, title="no agg_error", rows=[{"round": 1, "accuracy": 0.6}])
    assert not (plain / "plot_agg_error.png").exists()


def test_plot_agg_error_compares_runs_and_skips_runs_without_it(tmp_path: Path) -> None:
    from fedft.reporting.report import plot_agg_error

    runs = {
        "fedit": [{"round": r, "agg_error": 0.5 / r} for r in (1, 2, 3)],
        "flora": [{"round": r, "agg_error": 3e-8} for r in (1, 2, 3)],
        "secure": [{"round": r, "accuracy": 0.6} for r in (1, 2, 3)],
    }
    path = plot_agg_error(runs, tmp_path)
    assert path == tmp_path / "compare_agg_error.png"
    assert _png_size(path) == (600, 360)
    linear = plot_agg_error({"fedit": runs["fedit"]}, tmp_path, name="one.png")
    assert linear.read_bytes() != path.read_bytes()
