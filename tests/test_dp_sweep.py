"""``python -m simulations.dp_sweep``: utility vs ε, real simulations of a tiny model."""

from __future__ import annotations

import json

import pytest

from fedft.config import load_config
from simulations import dp_sweep


def _cfg(model_dir: str):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        [
            f"model.name='{model_dir}'",
            "data.max_train_examples=160",
            "data.test_size=32",
            "data.public_size=16",
            "federation.num_clients=2",
            "federation.clients_per_round=2",
            "federation.rounds=2",
            "federation.local_steps=2",
            "federation.batch_size=8",
            "federation.device='cpu'",
            "adapter.rank=2",
            "privacy.epsilon=0.5",
        ],
    )


def test_config_for_sets_the_mode_and_budget(tiny_bert_dir: str) -> None:
    cfg = _cfg(tiny_bert_dir)
    off = dp_sweep.config_for(cfg, "fedsb", None)
    dp = dp_sweep.config_for(cfg, "fedsb", 4.0)
    assert (off.privacy.mode, off.aggregation.algorithm) == ("off", "fedsb")
    assert (dp.privacy.mode, dp.privacy.epsilon) == ("sample", 4.0)
    assert dp.privacy.delta == cfg.privacy.delta and dp.name != off.name


def test_smaller_budget_needs_more_noise(tiny_bert_dir: str) -> None:
    cfg = _cfg(tiny_bert_dir)
    lo = dp_sweep.noise_range(dp_sweep.config_for(cfg, "fedit", 8.0))
    hi = dp_sweep.noise_range(dp_sweep.config_for(cfg, "fedit", 1.0))
    assert 0 < lo[0] <= lo[1] and 0 < hi[0] <= hi[1]
    assert hi[0] > lo[0] and hi[1] > lo[1]


def test_noise_range_is_what_the_clients_train_with(tiny_bert_dir: str) -> None:
    from fedft.config import apply_overrides, build_config

    base = dp_sweep.config_for(_cfg(tiny_bert_dir), "fedit", 8.0)
    fixed = build_config(apply_overrides(base.to_dict(), ["privacy.noise_multiplier=0.7"]))
    assert dp_sweep.noise_range(fixed) == (0.7, 0.7)
    stricter = build_config(apply_overrides(base.to_dict(), ["privacy.client_epsilon.0=1.0"]))
    assert dp_sweep.noise_range(stricter)[1] > dp_sweep.noise_range(base)[1]


def test_sweep_runs_each_budget_and_spends_at_most_it(tiny_bert_dir: str, tmp_path) -> None:
    rows = dp_sweep.sweep(
        _cfg(tiny_bert_dir), tmp_path, algorithms=["fedsb"], epsilons=[2.0], progress=False
    )
    assert [(r["algorithm"], r["epsilon_target"]) for r in rows] == [
        ("fedsb", None),
        ("fedsb", 2.0),
    ]
    off, dp = rows
    assert off["epsilon_spent"] is None and off["sigma_min"] is None
    assert 0 < dp["epsilon_spent"] <= 2.0 and dp["sigma_min"] > 0
    assert json.loads((tmp_path / "dp_sweep.json").read_text()) == rows
    table = (tmp_path / "dp_sweep.md").read_text()
    assert "| fedsb | off |" in table and "| fedsb | 2 |" in table
    assert (tmp_path / "dp_sweep.png").stat().st_size > 0
    assert (tmp_path / "fedsb-eps2" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "x", ""])
def test_bad_epsilons_are_refused_before_any_run(bad: str, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as err:
        dp_sweep.main(["simulations/dp_sweep.toml", "--epsilons", bad, "--out", str(tmp_path)])
    assert err.value.code == 2
    assert "--epsilons" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_sweep_refuses_a_bad_budget(bad: float, tmp_path) -> None:
    cfg = load_config("simulations/dp_sweep.toml", [])
    with pytest.raises(ValueError, match="finite number > 0"):
        dp_sweep.sweep(cfg, tmp_path, epsilons=[3.0, bad])
    assert not any(tmp_path.iterdir())
