"""Config validation: each bad input stops before any work with its own message, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedft.config import ConfigError, build_config, config_from_json, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_and_roundtrip():
    cfg = load_config(None)
    assert cfg.federation.num_clients == 10
    assert config_from_json(cfg.to_json()) == cfg


def test_shipped_configs_are_valid():
    for path in sorted((ROOT / "simulations").glob("*.toml")):
        load_config(path)


def test_overrides_apply_with_types():
    cfg = load_config(
        ROOT / "simulations" / "quickstart.toml",
        ["federation.rounds=2", "aggregation.algorithm=flora", "adapter.ranks=[4, 8]"],
    )
    assert cfg.federation.rounds == 2
    assert cfg.aggregation.algorithm == "flora"
    assert cfg.adapter.ranks == [4, 8]
    assert [cfg.adapter.rank_of(i) for i in range(3)] == [4, 8, 4]


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["federation.clients_per_round=20"], "federation.clients_per_round = 20"),
        (["privacy.epsilon=0"], "privacy.epsilon = 0.0"),
        (["privacy.epsilon=-1"], "privacy.epsilon = -1.0"),
        (["adapter.rank=0"], "adapter.rank = 0"),
        (["federation.rounds='many'"], "federation.rounds = 'many'"),
        (["federation.rounds=2.5"], "an integer"),
        (["aggregation.algorithm=fedprox"], "one of 'fedit', 'flora'"),
        (["model.task=translation"], "model.task = 'translation'"),
        (["data.partition=random"], "'iid', 'dirichlet', 'natural'"),
        (["federation.colour=1"], "unknown key 'federation.colour'"),
        (["nonsense.key=1"], "unknown key 'nonsense'"),
        (["adapter.ranks=[8, 4]"], "adapter.ranks = [8, 4]"),
        (["privacy.mode=user", "aggregation.algorithm=flora"], "not linear"),
        (["aggregation.secure=true", "aggregation.algorithm=flora"], "needs each client's"),
        (["data.alpha=0"], "data.alpha = 0.0"),
        (["privacy.delta=1.5"], "privacy.delta = 1.5"),
        (["federation.device=tpu"], "federation.device = 'tpu'"),
        (["privacy.client_epsilon={12 = 1.0}"], "client indices run from 0 to 9"),
        (["rounds"], "--set 'rounds'"),
        (["adapter.method=split", "privacy.mode=sample"], "not implemented for adapter.method"),
        (["adapter.method=prompt", "aggregation.algorithm=flora"], "use 'fedit'"),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "simulations" / "quickstart.toml", overrides)
    assert fragment in str(err.value)


def test_mixed_ranks_allowed_for_flora_and_hetlora():
    for algo in ("flora", "hetlora"):
        cfg = build_config({"adapter": {"ranks": [4, 8, 16]}, "aggregation": {"algorithm": algo}})
        assert cfg.adapter.ranks == [4, 8, 16]


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_cli_exits_2_on_bad_config_before_any_work(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedft.cli",
            "simulate",
            str(ROOT / "simulations/quickstart.toml"),
            "--set",
            "federation.clients_per_round=11",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert proc.returncode == 2, proc.stderr
    assert "federation.clients_per_round = 11" in proc.stderr
    assert "at most federation.num_clients (10)" in proc.stderr
    assert not out.exists()
