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
