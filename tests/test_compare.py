"""``fedft compare``: per-algorithm configs and the results table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedft.config import ALGORITHMS, ConfigError, load_config, load_table
from simulations.compare import _markdown, config_for, configs_for


def test_single_rank_algorithms_run_at_the_smallest_configured_rank() -> None:
    cfg = load_config("simulations/compare.toml", [])
    assert list(cfg.adapter.ranks) == [4, 8, 16]
    flora, fedit = config_for(cfg, "flora"), config_for(cfg, "fedit")
    assert list(flora.adapter.ranks) == [4, 8, 16]
    assert not fedit.adapter.ranks and fedit.adapter.rank == 4
    assert fedit.aggregation.algorithm == "fedit" and fedit.name == "compare-fedit"
    assert fedit.data == cfg.data and fedit.seed == cfg.seed  # same split, same seed


ROW = {
    "algorithm": "fedit",
    "ranks": "4",
    "accuracy_before": 0.4,
    "accuracy": 0.75,
    "loss_before": 3.5,
    "loss": 2.25,
    "bytes_up": 1.5e6,
    "bytes_down": 3e6,
    "wall_s": 12.0,
}


def test_table_has_a_loss_column_only_when_the_metric_is_not_the_loss() -> None:
    acc = _markdown([ROW], "accuracy").splitlines()
    assert acc[0].count("|") == acc[1].count("|") == acc[2].count("|") == 9
    assert acc[2] == "| fedit | 4 | 0.4000 | 0.7500 | 2.2500 | 1.50 | 3.00 | 12 |"
    loss = _markdown([ROW], "loss").splitlines()
    assert loss[0].count("|") == loss[1].count("|") == loss[2].count("|") == 8
    assert loss[2] == "| fedit | 4 | 3.5000 | 2.2500 | 1.50 | 3.00 | 12 |"


def test_every_variant_is_validated_before_any_run(tmp_path) -> None:
    # the base file's own algorithm (flora) is replaced by each variant's: not refused itself
    table = load_table("simulations/compare.toml", ["privacy.mode=user"])
    with pytest.raises(ConfigError) as err:
        configs_for(table, ALGORITHMS)
    text = str(err.value)
    for refused in ("flora", "lora_fair", "hetlora", "fedex"):
        assert f"\n  {refused}: privacy.mode = 'user' is not allowed" in text
    assert "--algorithms fedit,fedsb,ffa" in text
    assert set(configs_for(table, ["fedit", "ffa"])) == {"fedit", "ffa"}
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "fedft.cli", "compare", "simulations/compare.toml"]
        + ["--set", "privacy.mode=user", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "refused for 4 of 7 algorithms (nothing was run)" in proc.stderr
    assert not out.exists()


# --- several seeds (`fedft compare --seeds N`) ------------------------------------------


def test_spread_matches_hand_computed_values() -> None:
    from fedft.reporting.spread import spread

    # mean 2, std 1 (n - 1), t(0.975, 2) = 4.302653, half-width 4.302653 / sqrt(3) = 2.484138
    s = spread([1.0, 2.0, 3.0])
    assert s.n == 3 and s.mean == 2.0 and s.std == pytest.approx(1.0, abs=1e-12)
    assert s.low == pytest.approx(2 - 2.484138, abs=1e-6)
    assert s.high == pytest.approx(2 + 2.484138, abs=1e-6)
    assert s.format() == "2.0000 ± 1.0000" and s.format_interval() == "[-0.4841, 4.4841]"
    # 0.70, 0.74, 0.78: std 0.04, half-width 0.04 * 2.484138 = 0.099366
    s = spread([0.70, 0.74, 0.78])
    assert s.std == pytest.approx(0.04, abs=1e-12)
    assert (s.low, s.high) == (pytest.approx(0.640634, abs=1e-6), pytest.approx(0.839366, abs=1e-6))
    # two values 1, 3: mean 2, std sqrt(2), t(0.975, 1) = 12.706205, half 12.706205
    s = spread([1.0, 3.0])
    assert s.std == pytest.approx(2**0.5) and s.high == pytest.approx(2 + 12.706205, abs=1e-5)
    one = spread([0.5])
    assert (one.mean, one.std, one.low, one.high) == (0.5, None, None, None)
    assert one.format() == "0.5000" and one.format_interval() == "-"
    for bad in ([], [float("nan")], [1.0, float("inf")]):
        with pytest.raises(ValueError):
            spread(bad)


def test_tell_apart_reads_intervals_then_paired_differences() -> None:
    from fedft.reporting.spread import spread, tell_apart

    acc = {"metric": "accuracy", "higher_is_better": True}
    # [0.785, 0.835] vs [0.685, 0.735]: disjoint
    v = tell_apart("flora", spread([0.80, 0.81, 0.82]), "fedit", spread([0.70, 0.71, 0.72]), **acc)
    assert (v.better, v.how) == ("flora", "intervals")
    assert v.text == "flora > fedit (accuracy 0.8100 vs 0.7100): intervals do not overlap"
    # order of the arguments does not change who is ahead
    v = tell_apart("fedit", spread([0.70, 0.71, 0.72]), "flora", spread([0.80, 0.81, 0.82]), **acc)
    assert v.better == "flora" and v.text.startswith("flora > fedit")
    # overlapping intervals; per-seed differences 0.02, 0.01, 0.015: mean 0.015, std 0.005,
    # interval 0.015 ± 0.012421 = [0.0026, 0.0274], excludes 0
    a, b = spread([0.70, 0.75, 0.80]), spread([0.68, 0.74, 0.785])
    assert a.low is not None and b.high is not None and a.low < b.high
    v = tell_apart("hetlora", a, "fedit", b, **acc)
    assert (v.better, v.how) == ("hetlora", "paired")
    assert v.diff is not None and v.diff.format_interval() == "[0.0026, 0.0274]"
    assert "paired by seed only" in v.text and "excludes 0" in v.text
    # the same numbers from different seeds (unpaired): cannot tell
    v = tell_apart("hetlora", a, "fedit", b, paired=False, **acc)
    assert (v.better, v.how) == (None, "none") and "cannot tell apart" in v.text
    # differences -0.04, 0.08, -0.01 include 0
    v = tell_apart("a", spread([0.70, 0.80, 0.74]), "b", spread([0.76, 0.72, 0.77]), **acc)
    assert v.better is None and v.text.startswith(
        "a vs b: cannot tell apart (accuracy 0.7467 vs 0.7500;"
    )  # the means in the order of the names
    # a loss: lower is ahead
    v = tell_apart(
        "a",
        spread([0.50, 0.51, 0.52]),
        "b",
        spread([0.60, 0.61, 0.62]),
        metric="loss",
        higher_is_better=False,
    )
    assert v.better == "a" and v.text == "a < b (loss 0.5100 vs 0.6100): intervals do not overlap"
    # one seed: never told apart
    v = tell_apart("a", spread([0.9]), "b", spread([0.1]), **acc)
    assert v.better is None and "one seed" in v.text


def test_a_seed_gives_every_algorithm_the_same_split_and_seeds_differ() -> None:
    from fedft import builders
    from fedft.data import build_federated_data
    from simulations.compare import seeds_for

    table = load_table(
        "simulations/compare.toml", ["data.max_train_examples=600", "data.test_size=100"]
    )
    assert seeds_for(table, 3) == [0, 1, 2]
    assert seeds_for(load_table("simulations/compare.toml", ["seed=7"]), 2) == [7, 8]
    with pytest.raises(ValueError):
        seeds_for(table, 0)

    def split(algorithm: str, seed: int) -> tuple[list[list[str]], list[str]]:
        cfg = config_for(table, algorithm, seed=seed)
        assert cfg.seed == seed and cfg.name == f"compare-{algorithm}-seed{seed}"
        fed = build_federated_data(**builders.data_kwargs(cfg))
        return [c.text for c in fed.clients], fed.test.text

    flora1, fedit1, fedsb1 = split("flora", 1), split("fedit", 1), split("fedsb", 1)
    assert flora1 == fedit1 == fedsb1
    flora2 = split("flora", 2)
    assert flora2[0] != flora1[0] and flora2[1] != flora1[1]  # partition and test set differ
    assert split("flora", 2) == flora2  # and are reproducible


# (algorithm, seed) -> final accuracy of the stand-in runs below
FAKE_ACC = {
    ("flora", 0): 0.80, ("flora", 1): 0.81, ("flora", 2): 0.82,
    ("fedit", 0): 0.70, ("fedit", 1): 0.71, ("fedit", 2): 0.72,
    ("hetlora", 0): 0.72, ("hetlora", 1): 0.72, ("hetlora", 2): 0.735,
}  # fmt: skip


def _fake_simulate(calls):
    """A stand-in for ``simulate`` that writes what a run writes, from FAKE_ACC."""
    import json

    def simulate(cfg, out, *, progress=True):
        algorithm, seed = cfg.aggregation.algorithm, cfg.seed
        calls.append((algorithm, seed, out, cfg.name))
        acc = FAKE_ACC[(algorithm, seed)]
        agg = {"fedit": 0.30 + 0.01 * seed, "flora": 1e-7}.get(algorithm)
        rows = [
            {"round": r, "accuracy": 0.5 + (acc - 0.5) * r / 2, "loss": 1 - acc * r / 2}
            | {"bytes_up": 1000 * r, "bytes_down": 2000 * r, "epsilon": None, "clients": 3}
            | ({"agg_error": agg} if agg is not None and r else {})
            for r in range(3)
        ]
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        final = {
            "before": {"accuracy": 0.5, "loss": 1.0},
            "after": {"accuracy": acc, "loss": 1 - acc},
            "bytes_up": 3000,
            "bytes_down": 6000,
            "wall_s": 10.0 + seed,
        }
        summary = {"final": final, "config": cfg.to_dict()}
        (out / "summary.json").write_text(json.dumps(summary))
        return final

    return simulate


def test_seeds_run_every_algorithm_per_seed_and_report_the_spread(monkeypatch, tmp_path) -> None:
    import json

    import simulations.simulate
    from simulations.compare import compare

    calls: list = []
    monkeypatch.setattr(simulations.simulate, "simulate", _fake_simulate(calls))
    out = tmp_path / "cmp"
    rows = compare(
        load_table("simulations/compare.toml", []),
        out,
        algorithms=["flora", "fedit", "hetlora"],
        seeds=3,
        progress=False,
    )
    # seed by seed, every algorithm, into OUT/<algorithm>/seed<s>/
    assert [(a, s) for a, s, _, _ in calls] == [
        (a, s) for s in (0, 1, 2) for a in ("flora", "fedit", "hetlora")
    ]
    assert all(o == out / a / f"seed{s}" for a, s, o, _ in calls)
    assert calls[4][3] == "compare-fedit-seed1"
    assert len(rows) == 9 and rows[4]["seed"] == 1 and rows[4]["accuracy"] == 0.71
    assert rows[4]["agg_error"] == pytest.approx(0.31)  # mean over rounds 1-2

    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [0, 1, 2] and report["metric"] == "accuracy"
    assert "Student-t" in report["interval"]
    by_alg = {s["algorithm"]: s for s in report["summary"]}
    fedit = by_alg["fedit"]["accuracy"]
    assert fedit["values"] == [0.70, 0.71, 0.72] and fedit["mean"] == pytest.approx(0.71)
    assert fedit["std"] == pytest.approx(0.01)
    assert fedit["low"] == pytest.approx(0.71 - 0.024841, abs=1e-6)
    assert by_alg["flora"]["ranks"] == "4/8/16" and by_alg["fedit"]["ranks"] == "4"
    assert "agg_error" not in by_alg["hetlora"]
    texts = {(d["a"], d["b"], d["metric"]): d["text"] for d in report["differences"]}
    assert texts[("flora", "fedit", "accuracy")] == (
        "flora > fedit (accuracy 0.8100 vs 0.7100): intervals do not overlap"
    )
    # hetlora - fedit per seed: 0.02, 0.01, 0.015 -> paired only
    assert "hetlora > fedit" in texts[("fedit", "hetlora", "accuracy")]
    assert "paired by seed only" in texts[("fedit", "hetlora", "accuracy")]

    md = (out / "compare.md").read_text()
    assert "3 seeds (0, 1, 2)" in md
    assert "| fedit | 4 | 0.5000 ± 0.0000 | 0.7100 ± 0.0100 | [0.6852, 0.7348] |" in md
    assert "- flora > fedit (accuracy 0.8100 vs 0.7100): intervals do not overlap" in md
    assert "| 0.31 ± 0.01 | 0.00 | 0.01 | 11 |" in md  # fedit's agg_error, 2 significant digits
    assert "| fedit | 1 | 4 | 0.5000 | 0.7100 | 0.2900 | 0.31 | 0.00 | 0.01 | 11 |" in md
    for png in ("compare_accuracy_rounds", "compare_accuracy_bytes", "compare_agg_error_rounds"):
        assert (out / f"{png}.png").stat().st_size > 1000


def test_one_seed_keeps_its_layout_and_table(monkeypatch, tmp_path) -> None:
    import json

    import simulations.simulate
    from simulations.compare import compare

    calls: list = []
    monkeypatch.setattr(simulations.simulate, "simulate", _fake_simulate(calls))
    out = tmp_path / "cmp"
    rows = compare(load_table("simulations/compare.toml", []), out, algorithms=["flora", "fedit"])
    assert [(a, s, o, n) for a, s, o, n in calls] == [
        ("flora", 0, out / "flora", "compare-flora"),
        ("fedit", 0, out / "fedit", "compare-fedit"),
    ]
    assert json.loads((out / "compare.json").read_text()) == rows
    assert "seed" not in rows[0] and rows[1]["agg_error"] == pytest.approx(0.30)
    md = (out / "compare.md").read_text().splitlines()
    assert md[0].startswith("| algorithm | ranks | accuracy before |") and "agg_error" in md[0]
    assert md[3] == "| fedit | 4 | 0.5000 | 0.7000 | 0.3000 | 0.3 | 0.00 | 0.01 | 10 |"
    assert (out / "compare_accuracy_rounds.png").is_file()
    assert (out / "compare_agg_error.png").is_file()


@pytest.mark.slow  # four Ray simulations: 340 s at load 10 on 2 cores
def test_cli_compare_with_seeds_runs_tiny_models(tiny_bert_dir, tmp_path) -> None:
    """`fedft compare --seeds 2` end to end: real simulations of a tiny BERT."""
    import json

    out = tmp_path / "out"
    sets = [
        f"model.name='{tiny_bert_dir}'",
        "data.max_train_examples=120",
        "data.test_size=32",
        "data.public_size=16",
        "data.max_length=16",
        "federation.num_clients=2",
        "federation.clients_per_round=2",
        "federation.rounds=1",
        "federation.local_steps=2",
        "federation.batch_size=8",
        "federation.device='cpu'",
        "adapter.ranks=[2, 4]",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "fedft.cli", "compare", "simulations/compare.toml"]
        + [a for s in sets for a in ("--set", s)]
        + ["--seeds", "2", "--algorithms", "fedit,flora", "--out", str(out), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # progress for the user, run by run
    for i, label in enumerate(["fedit, seed 0", "flora, seed 0", "fedit, seed 1", "flora, seed 1"]):
        assert f"compare: run {i + 1} of 4: {label}" in proc.stdout + proc.stderr
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [0, 1]
    assert [(r["algorithm"], r["seed"]) for r in report["runs"]] == [
        ("fedit", 0), ("flora", 0), ("fedit", 1), ("flora", 1)
    ]  # fmt: skip
    # every run in its own folder; seed s: the same split for both algorithms, seeds differ
    parts = {}
    for alg in ("fedit", "flora"):
        for seed in (0, 1):
            summary = json.loads((out / alg / f"seed{seed}" / "summary.json").read_text())
            parts[alg, seed] = summary["partition"]["counts"]
    assert parts["fedit", 0] == parts["flora", 0] and parts["fedit", 1] == parts["flora", 1]
    assert parts["fedit", 0] != parts["fedit", 1]
    for s in report["summary"]:
        acc = s["accuracy"]
        assert len(acc["values"]) == 2 and acc["low"] <= acc["mean"] <= acc["high"]
    md = (out / "compare.md").read_text()
    assert "2 seeds (0, 1)" in md and "Differences beyond the spread over seeds:" in md
    assert "fedit vs flora" in md or "flora vs fedit" in md or " > " in md
    assert md in proc.stdout
    assert (out / "compare_accuracy_rounds.png").is_file()
    assert (out / "compare_accuracy_bytes.png").is_file()


def test_cli_refuses_zero_seeds(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedft.cli", "compare", "simulations/compare.toml"]
        + ["--seeds", "0", "--out", str(tmp_path / "o"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--seeds must be at least 1, got 0" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_reuse_runs_only_what_is_new_or_changed(monkeypatch, tmp_path) -> None:
    import json

    import simulations.simulate
    from simulations.compare import compare

    calls: list = []
    monkeypatch.setattr(simulations.simulate, "simulate", _fake_simulate(calls))
    out = tmp_path / "cmp"
    table = load_table("simulations/compare.toml", [])
    compare(table, out, algorithms=["flora", "fedit"], seeds=2, progress=False)
    assert len(calls) == 4
    calls.clear()
    rows = compare(
        table, out, algorithms=["flora", "fedit", "hetlora"], seeds=3, reuse=True, progress=False
    )
    # only the new seed and the new algorithm ran; the four earlier runs were read back
    assert [(a, s) for a, s, _, _ in calls] == [
        ("hetlora", 0), ("hetlora", 1), ("flora", 2), ("fedit", 2), ("hetlora", 2)
    ]  # fmt: skip
    assert len(rows) == 9 and rows[1] == {**rows[1], "algorithm": "fedit", "seed": 0}
    assert rows[1]["accuracy"] == 0.70 and rows[1]["agg_error"] == pytest.approx(0.30)
    report = json.loads((out / "compare.json").read_text())
    assert [s["algorithm"] for s in report["summary"]] == ["flora", "fedit", "hetlora"]
    # a run of another config in the folder (here: another number of rounds) runs again
    calls.clear()
    changed = load_table("simulations/compare.toml", ["federation.rounds=4"])
    compare(changed, out, algorithms=["fedit"], seeds=2, reuse=True, progress=False)
    assert [(a, s) for a, s, _, _ in calls] == [("fedit", 0), ("fedit", 1)]
    # a saved config without a key fedft added since (at its default) is the same config
    saved = json.loads((out / "flora" / "seed0" / "summary.json").read_text())
    del saved["config"]["aggregation"]["fair_steps"]
    (out / "flora" / "seed0" / "summary.json").write_text(json.dumps(saved))
    calls.clear()
    compare(table, out, algorithms=["flora"], seeds=2, reuse=True, progress=False)
    assert calls == []
    # without --reuse everything runs
    calls.clear()
    compare(changed, out, algorithms=["fedit"], seeds=2, progress=False)
    assert len(calls) == 2
