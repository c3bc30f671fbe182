"""``[tracking] report_to``: every round's row and the config, read back from the stores."""

from __future__ import annotations

import json

import pytest

from fedft.config import ConfigError, load_config
from fedft.reporting.metrics import MetricsWriter
from fedft.reporting.tracking import build_trackers, scalars

ROWS = [
    {
        "round": 0,
        "loss": 0.69,
        "accuracy": 0.5,
        "bytes_up": 0,
        "bytes_down": 0,
        "clients": 0,
        "wall_s": 0.0,
        "epsilon": None,
    },
    {
        "round": 1,
        "loss": 0.61,
        "accuracy": 0.625,
        "bytes_up": 1000,
        "bytes_down": 2000,
        "clients": 3,
        "wall_s": 1.5,
        "epsilon": 0.8,
        "epsilon_level": "sample",
        "epsilon_clients": {"0": 0.8, "2": 0.7},
        "agg_error": 0.01,
    },
    {
        "round": 2,
        "loss": 0.55,
        "accuracy": 0.75,
        "bytes_up": 1100,
        "bytes_down": 2100,
        "clients": 2,
        "wall_s": 1.25,
        "epsilon": 1.1,
        "epsilon_level": "sample",
        "epsilon_clients": {"0": 1.1, "2": 0.9},
        "failed": False,
    },
]


def _write(tmp_path, report_to):
    cfg = load_config(None, [f"tracking.report_to={json.dumps(report_to)}", "name='tracked'"])
    trackers = build_trackers(
        cfg.tracking.report_to, tmp_path, run_name=cfg.name, config=cfg.to_dict()
    )
    writer = MetricsWriter(tmp_path, on_row=trackers.log_round)
    for row in ROWS:
        writer.write(**row)
    trackers.close({"rounds": 2, "after": {"accuracy": 0.75}})
    return cfg


def test_scalars_flatten_client_epsilons_and_skip_text():
    got = scalars(ROWS[1])
    assert got["epsilon_client/2"] == 0.7 and got["bytes_down"] == 2000.0
    assert "epsilon_level" not in got and "round" not in got
    assert "epsilon" not in scalars(ROWS[0])  # no DP: nothing, not NaN


def test_tensorboard_event_files_hold_every_round_and_the_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _write(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"accuracy", "loss", "bytes_up", "bytes_down", "epsilon", "clients"} <= tags
    for key in ("accuracy", "loss", "bytes_up", "bytes_down"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert got == [(r["round"], pytest.approx(r[key])) for r in ROWS]
    assert [(e.step, e.value) for e in acc.Scalars("epsilon")] == [
        (1, pytest.approx(0.8)),
        (2, pytest.approx(1.1)),
    ]
    assert [e.value for e in acc.Scalars("epsilon_client/2")] == [
        pytest.approx(0.7),
        pytest.approx(0.9),
    ]
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert json.loads(text.removeprefix("```json\n").removesuffix("\n```")) == json.loads(
        json.dumps(cfg.to_dict())
    )


def test_mlflow_store_holds_every_round_and_the_config(tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = _write(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tracked")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert exp.artifact_location.startswith((tmp_path / "mlflow").as_uri())
    for key in ("accuracy", "loss", "bytes_up", "bytes_down"):
        hist = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert hist == [(r["round"], pytest.approx(r[key])) for r in ROWS]
    eps = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epsilon"))
    assert eps == [(1, pytest.approx(0.8)), (2, pytest.approx(1.1))]
    assert run.data.params["federation.rounds"] == str(cfg.federation.rounds)
    assert run.data.params["tracking.report_to"] == '["mlflow"]'
    local = client.download_artifacts(run.info.run_id, "config.json", str(tmp_path / "dl"))
    assert json.loads(open(local).read()) == json.loads(json.dumps(cfg.to_dict()))


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="tracking.report_to"):
        load_config(None, ['tracking.report_to=["wandb"]'])
