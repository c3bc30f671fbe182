"""An in-process Flower simulation (real Simulation Engine) of 3 clients x 2 rounds."""

from __future__ import annotations

import json

import pytest

from fedft.config import load_config


def _cfg(model_dir, **sets):
    overrides = [
        f"model.name='{model_dir}'",
        "data.max_train_examples=240",
        "data.test_size=64",
        "data.public_size=16",
        "federation.num_clients=3",
        "federation.clients_per_round=3",
        "federation.rounds=2",
        "federation.local_steps=3",
        "federation.batch_size=8",
        "federation.device='cpu'",
        "adapter.rank=4",
        *[f"{k}={v}" for k, v in sets.items()],
    ]
    return load_config(None, overrides)


@pytest.mark.parametrize("algorithm", ["fedit", "flora"])
def test_three_clients_two_rounds(tiny_bert_dir, tmp_path, algorithm):
    from simulations.simulate import simulate

    sets = {"aggregation.algorithm": f"'{algorithm}'"}
    if algorithm == "flora":
        sets["adapter.ranks"] = "[2, 4, 8]"
    cfg = _cfg(tiny_bert_dir, **sets)
    out = tmp_path / "run"
    summary = simulate(cfg, out, progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        for key in ("loss", "accuracy", "bytes_up", "bytes_down", "epsilon", "clients", "wall_s"):
            assert key in r
        assert r["clients"] == 3
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["epsilon"] is None
    assert summary["rounds"] == 2
    assert (out / "report.html").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "checkpoint" / "state.json").is_file()
    if algorithm == "flora":
        # FLoRA's download carries the folded stack: round 2 sends more than round 1
        assert rows[2]["bytes_down"] > rows[1]["bytes_down"]
