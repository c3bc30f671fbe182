"""Resume is exact for every stateful part, whatever point of a round the server died at.

``run_federation`` runs on an in-process grid (tests/local_grid.py: the real client code, no
Ray) three times per case: uninterrupted; killed at a chosen point of round 2; resumed from
what the killed run left on disk, with fresh client contexts (a restarted server is a new
Flower run). The resumed run must end where the uninterrupted one did: the same global
adapters, folded base, extras and aggregator state (HetLoRA's rank, FFA's frozen A under the
norm-bound wrapper, CentralDP's accountant and round counter) within 1e-6, the same clients
sampled each round, the same metrics (bytes down aside: restarted clients are sent FFA's
frozen A again), the same final adapter files, and every client's ε no lower.

Sample-level DP (HetLoRA + DP-SGD on every client, each with its own ledger file as a deployed
client has): DP-SGD's batches and noise come from OS randomness (pinned here), and dropout
from the round's seed, so an uninterrupted and a resumed run train the same; every client's
ε after a resume is no lower (a client that trained round 2 before the kill trains it again
and accounts both).

Kill points: ``mid-round`` (after one client of round 2 trained and replied),
``checkpoint-write`` (between the two renames that swap round 2's checkpoint in),
``after-checkpoint`` (round 2's checkpoint written, its metrics line not yet).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from local_grid import Killed, LocalGrid
from safetensors.torch import load_file
from test_faults_apps import tiny_config

import fedft.checkpoint as ckpt
from fedft.checkpoint import load_checkpoint
from fedft.privacy import dpsgd
from fedft.privacy.central import CentralDP
from fedft.privacy.client_ledger import read_ledger
from fedft.privacy.sampling import poisson_cohort
from fedft.reporting import metrics as metrics_mod
from server import rounds as rounds_mod
from server.federation import run_federation

TOL = 1e-6

CASES: dict[str, dict[str, Any]] = {
    # stateful aggregator: the global kept at the largest rank, clients of ranks 4, 2, 2
    "hetlora": {
        "aggregation.algorithm": "'hetlora'",
        "adapter.ranks": "[4, 2, 2]",
    },
    # stateful aggregator + sample-level DP: every client's accountant, ledger and ε
    "hetlora+sample-dp": {
        "aggregation.algorithm": "'hetlora'",
        "adapter.ranks": "[4, 2, 2]",
        "privacy.mode": "'sample'",
        "privacy.noise_multiplier": "0.8",
        "privacy.epsilon": "100.0",
    },
    # CentralDP: the server's accountant, round counter and seeded noise
    "fedit+user-dp": {
        "privacy.mode": "'user'",
        "privacy.noise_multiplier": "0.5",
        "privacy.epsilon": "100.0",
        "privacy.max_grad_norm": "1.0",
    },
    # FFA's frozen, shared A under the norm-bound wrapper (its clipping reference)
    "ffa+norm-bound": {
        "aggregation.algorithm": "'ffa'",
        "aggregation.robust": "'norm_bound'",
        "aggregation.norm_bound": "5.0",
    },
}


def _cfg(model_dir: str, case: str):
    return tiny_config(
        model_dir,
        **{
            "federation.num_clients": 3,
            "federation.clients_per_round": 2,  # the sampling stream matters
            "federation.rounds": 3,
            **CASES[case],
        },
    )


def _run(cfg, out: Path, *, resume: bool = False, kill=None) -> None:
    """One run; each client keeps its privacy ledger in a file beside ``out`` (as a deployed
    client does on its own disk), so the ledgers outlive a killed run as they would."""
    ledgers = out.parent / f"{out.name}-ledgers"

    def node_config(i: int) -> dict[str, Any]:
        return {"ledger": str(ledgers / f"client-{i}.json")}

    grid = LocalGrid(cfg, kill=kill, node_config=node_config)
    run_federation(grid, cfg, out, progress=False, resume=resume)


def _close(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two nested states differ by more than TOL (empty: equal)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(b).__name__}"]
        if a.shape != b.shape:
            return [f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"]
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        return [f"{path}: max diff {diff:.3g}"] if diff > TOL else []
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _close(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}/{i}")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= TOL * max(1.0, abs(a)) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


#: metrics a resume may raise: ε under sample-level DP (a client that trained round 2 before
#: the kill trains it again, and accounts both)
SPENT = ("epsilon", "epsilon_clients")


def _rows(out: Path, *, skip: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows = metrics_mod.read_metrics(out)
    drop = ("wall_s", "bytes_down", *skip)
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _killer(point: str, monkeypatch: pytest.MonkeyPatch):
    """Arm the kill at ``point`` of round 2; returns the grid's ``kill`` hook (or None)."""
    if point == "mid-round":

        def kill(rnd: int, replies: int) -> None:
            if rnd == 2 and replies == 1:
                raise Killed("mid-round")

        return kill
    if point == "checkpoint-write":
        real = os.replace
        calls: list[str] = []

        def replace(src: Any, dst: Any) -> None:
            if Path(dst).name in ("checkpoint", ".checkpoint.old"):
                state = json.loads((Path(src) / "state.json").read_text())
                if Path(dst).name == "checkpoint" and state["round"] == 2:
                    calls.append(str(dst))
                    raise Killed("between the renames of round 2's checkpoint")
            real(src, dst)

        monkeypatch.setattr(ckpt.os, "replace", replace)
        return None
    if point == "after-checkpoint":
        real_write = metrics_mod.MetricsWriter.write

        def write(self: Any, **row: Any) -> None:
            if row.get("round") == 2:
                raise Killed("after round 2's checkpoint, before its metrics line")
            real_write(self, **row)

        monkeypatch.setattr(metrics_mod.MetricsWriter, "write", write)
        return None
    raise AssertionError(point)


def _pin_noise(m: pytest.MonkeyPatch) -> None:
    """DP noise is seeded from the OS (nobody may know it), so no two runs share it; to
    compare a resumed run with an uninterrupted one, seed it from what a resume must restore:
    DP-SGD from a constant, user-level DP from CentralDP's own round counter (a counter lost
    on resume would draw round 1's noise again). The user-level cohort's coins are also
    drawn from the OS; here they are seeded from the round number the resumed run must reach."""
    m.setattr(dpsgd, "_fresh_seed", lambda: 1234)
    m.setattr(CentralDP, "_seed", lambda self: 1000 + self._round)
    real_sample = rounds_mod.sample

    def pinned_sample(fed: Any, rnd: int) -> list[int]:
        aggregator = fed.coord.aggregator
        if not isinstance(aggregator, CentralDP):
            return real_sample(fed, rnd)
        able = fed.ledger.able(range(fed.cfg.federation.num_clients))
        coins = random.Random(5000 + rnd)
        return poisson_cohort(able, sample_rate=aggregator.sample_rate, rng=coins)

    m.setattr(rounds_mod, "sample", pinned_sample)


@pytest.fixture(scope="module")
def references(tiny_bert_dir, tmp_path_factory):
    """One uninterrupted run per case (shared by the kill points)."""
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            out = tmp_path_factory.mktemp(f"ref-{case}")
            with pytest.MonkeyPatch.context() as m:
                _pin_noise(m)
                _run(_cfg(tiny_bert_dir, case), out)
            assert load_checkpoint(out / "checkpoint")["round"] == 3, "reference stopped early"
            done[case] = out
        return done[case]

    return get


POINTS = ["mid-round", "checkpoint-write", "after-checkpoint"]
#: CI runs each case and each kill point once; `make test-slow` the rest of the matrix
FAST = {("hetlora+sample-dp", "mid-round"), ("fedit+user-dp", "checkpoint-write")}
FAST |= {("ffa+norm-bound", "after-checkpoint")}


@pytest.mark.parametrize(
    ("case", "point"),
    [
        pytest.param(c, p, marks=() if (c, p) in FAST else pytest.mark.slow, id=f"{c}-{p}")
        for c in CASES
        for p in POINTS
    ],
)
def test_killed_server_resumes_exactly(
    tiny_bert_dir, references, tmp_path, monkeypatch, case, point
):
    cfg = _cfg(tiny_bert_dir, case)
    ref_out = references(case)
    out = tmp_path / "run"
    _pin_noise(monkeypatch)
    with monkeypatch.context() as m:
        kill = _killer(point, m)
        with pytest.raises(Killed):
            _run(cfg, out, kill=kill)
    survived = load_checkpoint(out / "checkpoint")
    assert survived["round"] == (2 if point == "after-checkpoint" else 1)
    _run(cfg, out, resume=True)

    ref, got = load_checkpoint(ref_out / "checkpoint"), load_checkpoint(out / "checkpoint")
    assert got["round"] == ref["round"] == 3
    problems = _close(ref["coordinator"], got["coordinator"], "coordinator")
    assert not problems, problems
    sample_dp = cfg.privacy.mode == "sample"
    ref_rows, got_rows = _rows(ref_out), _rows(out)
    assert [r["round"] for r in got_rows] == [0, 1, 2, 3]
    # the same cohorts (sampling stream), the same metrics
    skip = SPENT if sample_dp else ()
    problems = _close(_rows(ref_out, skip=skip), _rows(out, skip=skip), "metrics")
    assert not problems, problems
    for name in ("adapter_model.safetensors",):
        a = load_file(str(ref_out / "adapter" / name))
        b = load_file(str(out / "adapter" / name))
        problems = _close(a, b, name)
        assert not problems, problems
    if sample_dp:  # every client's ε, no lower: in every round, in the checkpoint, on disk
        assert ref_rows[-1]["epsilon_clients"], "no client reported its ε"
        for r_ref, r_got in zip(ref_rows[1:], got_rows[1:], strict=True):
            assert set(r_got["epsilon_clients"]) == set(r_ref["epsilon_clients"])
            for client, eps in r_ref["epsilon_clients"].items():
                assert r_got["epsilon_clients"][client] >= eps - 1e-9, (r_got["round"], client)
            assert r_got["epsilon"] >= r_ref["epsilon"] - 1e-9
        for client, eps in ref["spent"].items():
            assert got["spent"][client] >= eps - 1e-9
        for i in ref_rows[-1]["epsilon_clients"]:
            ref_ledger = read_ledger(ref_out.parent / f"{ref_out.name}-ledgers/client-{i}.json")
            got_ledger = read_ledger(out.parent / f"{out.name}-ledgers/client-{i}.json")
            assert got_ledger.steps >= ref_ledger.steps > 0
    if case == "fedit+user-dp":  # CentralDP's accountant counted all three rounds
        acc = got["coordinator"]["aggregator"]["accountant"]
        assert acc == ref["coordinator"]["aggregator"]["accountant"]
        assert got["coordinator"]["aggregator"]["round"] == 3
        assert got_rows[-1]["epsilon"] == pytest.approx(ref_rows[-1]["epsilon"], abs=1e-9)
