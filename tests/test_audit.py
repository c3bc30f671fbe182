"""``fedft simulate --audit``: the attacks of a run's configuration, in its summary and report.

Also the split cut's defences end to end: ``split.privatize = "dx"`` through ``fedft
simulate`` (``dx_epsilon`` reported per round under its own name) and ``split.cut_noise_std``
on the frames the split server receives.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from tiny_models import save_tiny_bert

from fedft.config import load_config


@pytest.fixture(scope="module")
def tiny_bert3_dir(tmp_path_factory: Any) -> str:
    """A 3-layer, hidden-32 BERT classifier, no dropout, with the MiniLM tokenizer."""
    # no dropout: the wire test compares two runs' frames exactly
    return save_tiny_bert(
        tmp_path_factory.mktemp("tiny-bert3"), layers=3, max_positions=64, dropout=False
    )


def _sets(model_dir: str, **sets: Any) -> list[str]:
    base = {
        "model.name": f"'{model_dir}'",
        "data.max_train_examples": 80,
        "data.max_length": 16,
        "data.test_size": 48,
        "data.public_size": 48,
        "federation.num_clients": 2,
        "federation.clients_per_round": 2,
        "federation.rounds": 1,
        "federation.local_steps": 2,
        "federation.batch_size": 8,
        "federation.lr": 0.01,
        "federation.device": "'cpu'",
        "audit.examples": 16,
        **sets,
    }
    return [f"{k}={v}" for k, v in base.items()]


def _simulate_audited(toml: Path, name: str, sets: list[str], out: Path) -> dict[str, Any]:
    """``fedft simulate TOML --audit`` with ``sets`` into ``out``; its summary.json."""
    from fedft.cli import main

    toml.write_text(f'name = "{name}"\n')
    argv = ["simulate", str(toml), "--audit", "--no-progress", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    return cast(dict[str, Any], json.loads((out / "summary.json").read_text()))


def _split(model_dir: str, **sets: Any) -> list[str]:
    return _sets(
        model_dir,
        **{
            "adapter.method": "'split'",
            "adapter.prompt_tokens": 2,
            "split.front_layers": 1,
            "split.back_layers": 1,
            **sets,
        },
    )


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_simulate_split_dx_audit_end_to_end(tiny_bert3_dir: str, tmp_path: Path) -> None:
    """A split run with dx + Gaussian cut noise: dx_epsilon per round, the audit beside ε."""
    from simulations.simulate import simulate

    cfg = load_config(
        None,
        _split(
            tiny_bert3_dir,
            **{
                "split.privatize": "'dx'",
                "split.dx_epsilon": 1.0,
                "split.cut_noise_std": 0.05,
                "audit.enabled": "true",
            },
        ),
    )
    out = tmp_path / "run"
    final = simulate(cfg, out, progress=False)
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1]
    # d_χ ε and the cut noise under their own names; DP-SGD's epsilon stays null
    assert rows[1]["dx_epsilon"] == 1.0 and rows[1]["cut_noise_std"] == 0.05
    assert rows[1]["epsilon"] is None and rows[1]["clients"] == 2
    assert final["dx_epsilon"] == 1.0 and final["epsilon"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["dx_epsilon"] == 1.0
    attacks = {r["defence"]: r for r in summary["audit"]["attacks"]}
    assert set(attacks) == {"none", "dx eps=1 + gaussian std=0.05 on the cut"}
    clean, noisy = attacks["none"], attacks["dx eps=1 + gaussian std=0.05 on the cut"]
    assert clean["attack"] == noisy["attack"] == "cut inversion" and clean["depth"] == 1
    assert summary["audit"]["examples"] == 16
    # the sanity case: without a defence the server reads the text back...
    assert clean["recovery"] >= 0.6 and clean["recovery"] > clean["blind_guess"] + 0.3
    # ... with the run's defence it reads no more than a server ignoring the payload
    assert noisy["recovery"] <= noisy["blind_guess"] + 0.05, noisy
    html = (out / "report.html").read_text()
    assert "Audit: what a curious server recovers" in html
    assert "dx eps=1 + gaussian std=0.05 on the cut" in html
    assert html.index("Final figures") < html.index("Audit:") < html.index("Per-round metrics")


def test_cli_audit_flag_lora_dp_run(tiny_bert3_dir: str, tmp_path: Path) -> None:
    """``fedft simulate --audit`` on a LoRA run under DP-SGD: label and token attacks."""
    out = tmp_path / "run"
    sets = _sets(
        tiny_bert3_dir,
        **{
            "privacy.mode": "'sample'",
            "privacy.noise_multiplier": 3.0,
            "audit.dlg_steps": 4,
            "audit.examples": 24,
        },
    )
    summary = _simulate_audited(tmp_path / "lora.toml", "lora-audit", sets, out)
    assert summary["config"]["audit"]["enabled"] is True
    assert summary["final"]["epsilon"] > 0
    got = {(r["attack"], r["defence"]): r for r in summary["audit"]["attacks"]}
    dp = "DP-SGD sigma=3 C=1"
    assert set(got) == {
        ("label (iDLG)", "none"),
        ("label (iDLG)", dp),
        ("label (iDLG), released update", dp),
        ("tokens (DLG)", "none"),
        ("tokens (DLG)", dp),
    }
    # the sanity case: one example's update gives its label away; σ = 3 hides most of it
    assert got[("label (iDLG)", "none")]["accuracy"] == 1.0
    assert got[("label (iDLG)", dp)]["accuracy"] < 0.9
    assert got[("label (iDLG)", dp)]["chance"] == 0.5
    # the DP row says it is one step of one example, not a bound on a round's update
    assert "not a bound" in got[("label (iDLG)", dp)]["note"]
    assert "note" not in got[("label (iDLG)", "none")]
    # and the update a client releases after a round of the run's local steps is attacked too
    released = got[("label (iDLG), released update", dp)]
    assert released["local_steps"] == 2 and released["trials"] == 24
    assert released["chance"] == 0.5 and 0.0 <= released["accuracy"] <= 1.0
    for defence in ("none", dp):
        row = got[("tokens (DLG)", defence)]
        assert 0.0 <= row["f1"] <= 1.0 and row["tokens"] >= 2 and row["steps"] == 4
    html = (out / "report.html").read_text()
    assert "label (iDLG)" in html and dp in html


def test_audit_off_by_default_and_secure_aggregation_row(tiny_bert3_dir: str) -> None:
    from fedft import builders
    from fedft.attacks.audit import audit_run
    from fedft.data import build_federated_data

    assert load_config(None, []).audit.enabled is False
    cfg = load_config(None, _sets(tiny_bert3_dir, **{"aggregation.secure": "true"}))
    fed = build_federated_data(**builders.data_kwargs(cfg))
    audit = audit_run(cfg, victims=fed.clients[0], public=fed.public, num_labels=2)
    assert {r["defence"] for r in audit["attacks"]} == {"secure aggregation"}
    assert all(r["result"] is None for r in audit["attacks"])


def test_cut_noise_on_the_wire_and_absent_at_zero(tiny_bert3_dir: str) -> None:
    """The frames the split server receives: unchanged at std 0, + N(0, std²) otherwise."""
    from test_attacks import recorded_split_round, split_client_zero

    from fedft.transport import split_wire as wire

    cfg = load_config(None, _split(tiny_bert3_dir))
    _, runtime, data, start = split_client_zero(cfg)

    def first_frame(std: float) -> tuple[torch.Tensor, dict[str, float]]:
        frames, update = recorded_split_round(
            cfg, runtime, start, data, wire_dtype="fp32", cut_noise_std=std
        )
        frame = next(f for f in frames if f.kind == "forward")
        return wire.decode_tensor(frame.tensor("hidden"), max_elements=10**6), update.metrics

    clean, m0 = first_frame(0.0)
    again, _ = first_frame(0.0)
    noisy, m1 = first_frame(0.5)
    assert torch.equal(clean, again)  # no noise at 0: the same batch gives the same frame
    assert "cut_noise_std" not in m0 and m1["cut_noise_std"] == 0.5
    diff = noisy - clean
    assert abs(float(diff.std()) - 0.5) < 0.05 and abs(float(diff.mean())) < 0.05


@pytest.mark.slow
def test_dx_sweep_recipe_rows_table_and_plot(tiny_bert3_dir: str, tmp_path: Path) -> None:
    """simulations.dx_sweep: off + one ε, each audited; recovery falls under the noise."""
    from simulations.dx_sweep import main

    toml = tmp_path / "split.toml"
    toml.write_text('name = "sweep"\n')
    argv = [
        str(toml),
        "--epsilons",
        "1",
        "--out",
        str(tmp_path / "sweep"),
        "--no-progress",
    ]
    for s in _split(tiny_bert3_dir):
        argv += ["--set", s]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "sweep" / "dx_sweep.json").read_text())
    assert [r["dx_epsilon"] for r in rows] == [None, 1.0]
    off, noisy = rows
    assert off["recovery"] == off["recovery_without_dx"] >= 0.6
    assert noisy["recovery"] <= noisy["blind_guess"] + 0.05 < off["recovery"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert (tmp_path / "sweep" / "dx_sweep.png").stat().st_size > 0
    assert "| 1 |" in (tmp_path / "sweep" / "dx_sweep.md").read_text()


def test_released_update_row_reads_every_label_without_noise_and_restores_the_model() -> None:
    """The audit's released-update attack: the client's own DP-SGD loop on one example for the
    run's local steps, the label read off the head bias of before - after.

    Sanity: clipped but not noised (σ = 0), every label is read. The attacked model is left
    as it was (each trial starts from what the server sent).
    """
    from fedft.attacks.audit import _released_rows
    from fedft.config import build_config
    from fedft.data.encode import Encoded
    from simulations.attacks import lora_label_model

    cfg = build_config({"federation": {"local_steps": 3, "batch_size": 4, "lr": 5e-3}})
    model, params, bias = lora_label_model(4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (12, 6), generator=gen)
    enc = Encoded(ids, torch.ones_like(ids), torch.arange(12) % 4)
    before = {k: p.detach().clone() for k, p in params.items()}
    (row,) = _released_rows(cfg, model, params, bias, enc, "clip only", 1.0, 0.0, 4)
    assert row["attack"] == "label (iDLG), released update"
    assert row["accuracy"] == 1.0 and row["trials"] == 12 and row["local_steps"] == 3
    assert row["chance"] == 0.25
    for k, p in params.items():
        assert torch.equal(p.detach(), before[k]), k


def test_audit_noise_is_the_sigma_client_0_trained_with(
    tiny_bert3_dir: str, tmp_path: Path
) -> None:
    """A calibrated run's audit attacks at the σ client 0 calibrated on *all* its examples.

    The audit attacks only ``audit.examples`` of them; calibrating σ on that count (q = 1)
    gave a far larger σ than the run used, so the audit reported a defence stronger than the
    one the server faced.
    """
    from fedft import builders
    from fedft.training.runtime import get_data

    out = tmp_path / "run"
    sets = _sets(
        tiny_bert3_dir,
        **{
            "privacy.mode": "'sample'",
            "privacy.epsilon": 3.0,
            "audit.dlg_steps": 0,
            "audit.examples": 4,
        },
    )
    toml = tmp_path / "calibrated.toml"
    summary = _simulate_audited(toml, "calibrated-audit", sets, out)
    cfg = load_config(toml, sets)
    n0 = len(get_data(**builders.data_kwargs(cfg)).clients[0])
    assert n0 > 4
    sigma = builders.client_sigma(cfg, 0, n0)
    assert sigma < builders.client_sigma(cfg, 0, 4)  # what the audit used before
    defences = {r["defence"] for r in summary["audit"]["attacks"] if r["defence"] != "none"}
    assert defences == {f"DP-SGD sigma={sigma:.3g} C=1"}, defences
