"""Faults in real Flower rounds: killed, late, replayed, duplicated and garbage replies.

One simulation (10 clients, every client sampled each round, tiny BERT) with faults
injected on the client side (tests/test_faults_apps.py):

- round 1: clients 1 and 4 crash, client 7 answers after round_timeout_s -> 7 survivors;
  the new global equals FedIT over the 7 captured survivor updates (<= 1e-6);
- round 2: 6 clients crash, min_replies = 5 -> the round fails (``failed: true``) and the
  global every client receives in round 3 is bit-identical to the one of round 2;
- round 3: client 2 replays its reply of an earlier round, client 5 sends truncated
  tensor bytes -> both dropped; the checkpoint equals FedIT over the 8 clean updates.

A poisoned client (slow: four simulations, one per ``aggregation.robust``) pulls plain
FedIT far off while median, trimmed mean and norm bound stay inside the honest clients'
ball (numbers in docs/results.md).

The shell's own bookkeeping (a node answering twice, a reply for another round, a node
that was not asked) is checked against a fake grid without Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_faults_apps import fault_client_app, load_update, metrics_rows, run_sim, tiny_config

from fedft.aggregation import get_aggregator
from fedft.checkpoint import load_checkpoint
from fedft.types import ClientUpdate, LoraFactors

TIMEOUT_S = 20.0


def _max_diff(a: dict[str, LoraFactors], b: dict[str, LoraFactors]) -> float:
    assert set(a) == set(b)
    return max(
        max(float((a[m].a - b[m].a).abs().max()), float((a[m].b - b[m].b).abs().max())) for m in a
    )


def _extras_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((float((a[k] - b[k]).abs().max()) for k in a), default=0.0)


def _updates(cap: Path, rnd: int) -> list[ClientUpdate]:
    files = sorted(cap.glob(f"update-{rnd}-*.safetensors"))
    return [load_update(f, f.stem.split("-")[-1]) for f in files]


def _starts(cap: Path, rnd: int) -> dict[int, ClientUpdate]:
    return {
        int(f.stem.split("-")[-1]): load_update(f, "start")
        for f in cap.glob(f"start-{rnd}-*.safetensors")
    }


def test_killed_late_replayed_and_garbage_clients(tiny_bert_dir: str, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_bert_dir,
        **{
            "federation.num_clients": 10,
            "federation.clients_per_round": 10,
            "federation.rounds": 3,
            "federation.min_replies": 5,
            "federation.round_timeout_s": TIMEOUT_S,
        },
    )
    plan = {"1:1": "raise", "1:4": "raise", "1:7": f"sleep:{TIMEOUT_S + 4}"}
    plan |= {f"2:{i}": "raise" for i in (0, 2, 3, 5, 6, 8)}
    plan |= {"3:2": "replay", "3:5": "garbage"}
    cap = tmp_path / "cap"
    cap.mkdir()
    out = tmp_path / "run"
    summary = run_sim(cfg, out, fault_client_app(cfg, plan=plan, capture_dir=str(cap)))
    rows = metrics_rows(out)
    by_round = {r["round"]: r for r in rows}
    assert sorted(by_round) == [0, 1, 2, 3]

    # round 1: 3 killed (2 crash, 1 late) -> 7 survivors, their weighted mean exactly
    assert by_round[1]["clients"] == 7 and not by_round[1].get("failed")
    survivors = _updates(cap, 1)  # client 7 trained too, but its reply came too late
    assert sorted(int(u.client_id) for u in survivors) == [0, 2, 3, 5, 6, 8, 9]
    ref1 = get_aggregator("fedit").aggregate(survivors)
    starts2, starts3 = _starts(cap, 2), _starts(cap, 3)
    got1 = starts2[1]  # what the server sent after round 1 = the new global
    d1 = _max_diff(dict(ref1.adapters), dict(got1.adapters))
    d1x = _extras_diff(dict(ref1.extras), dict(got1.extras))
    assert d1 <= 1e-6 and d1x <= 1e-6, (d1, d1x)

    # round 2: 6 killed with min_replies = 5 -> failed, model bit-identical
    assert by_round[2]["failed"] is True and by_round[2]["clients"] == 4
    assert summary["failed_rounds"] == 1
    for idx, s in starts3.items():
        for m, f in s.adapters.items():
            assert torch.equal(f.a, got1.adapters[m].a) and torch.equal(f.b, got1.adapters[m].b)
        for k, v in s.extras.items():
            assert torch.equal(v, got1.extras[k]), (idx, k)
    assert by_round[2]["accuracy"] == by_round[1]["accuracy"]

    # round 3: the replayed and the garbage reply are dropped; the rest equals FedIT
    assert by_round[3]["clients"] == 8 and by_round[3]["rejected"] == 2
    clean = [u for u in _updates(cap, 3) if u.client_id not in ("2", "5")]
    assert len(clean) == 8
    ref3 = get_aggregator("fedit").aggregate(clean)
    state = load_checkpoint(out / "checkpoint")
    assert state["round"] == 3
    coord = state["coordinator"]
    final = {
        m: LoraFactors(a=e["a"], b=e["b"], scaling=float(e["scaling"]))
        for m, e in coord["global_adapters"].items()
    }
    d3 = _max_diff(dict(ref3.adapters), final)
    d3x = _extras_diff(dict(ref3.extras), coord["extras"])
    assert d3 <= 1e-6 and d3x <= 1e-6, (d3, d3x)
    # the replayed reply was not identical to a clean one: the check above was not vacuous
    replayed = next(u for u in _updates(cap, 1) if u.client_id == "2")
    wrong = get_aggregator("fedit").aggregate([*clean, replayed])
    assert _max_diff(dict(wrong.adapters), final) > 1e-5


# --- the shell's bookkeeping, with a fake grid (no Ray) --------------------------------


class _Meta:
    def __init__(self, src: int) -> None:
        self.src_node_id = src


class _Reply:
    def __init__(self, src: int, content: Any) -> None:
        self.metadata = _Meta(src)
        self.content = content
        self.error = None

    def has_error(self) -> bool:
        return False


class _FakeGrid:
    def __init__(self, replies: list[_Reply]) -> None:
        self.replies = replies

    def send_and_receive(self, messages: Any, timeout: Any = None) -> list[_Reply]:
        return self.replies


def _tiny_update(cid: str, seed: int, start: dict[str, LoraFactors]) -> ClientUpdate:
    g = torch.Generator().manual_seed(seed)
    adapters = {
        m: LoraFactors(
            a=f.a + 0.1 * torch.randn(f.a.shape, generator=g),
            b=f.b + 0.1 * torch.randn(f.b.shape, generator=g),
            scaling=f.scaling,
        )
        for m, f in start.items()
    }
    return ClientUpdate(client_id=cid, adapters=adapters, num_examples=3 + seed)


def test_collect_counts_duplicates_once_and_drops_replays_and_strangers() -> None:
    from flwr.app import ConfigRecord

    from fedft.training.coordinator import ClientStart
    from fedft.transport import serde
    from fedft.transport.serde import ROUND_RECORD
    from server.collect import collect_plain, validate_replies

    g = torch.Generator().manual_seed(0)
    start = {
        "q": LoraFactors(a=torch.randn(2, 6, generator=g), b=torch.zeros(5, 2), scaling=2.0),
        "v": LoraFactors(a=torch.randn(2, 6, generator=g), b=torch.zeros(5, 2), scaling=2.0),
    }
    starts = {i: ClientStart(adapters=start, base_delta={}, extras={}, rank=2) for i in range(4)}
    nodes = {i: 100 + i for i in range(4)}
    ups = {i: _tiny_update(str(i), i, start) for i in range(4)}

    def reply(i: int, rnd: int, update: ClientUpdate | None = None) -> _Reply:
        content = serde.update_to_recorddict(update or ups[i], parts="ab")
        content[ROUND_RECORD] = ConfigRecord({"round": rnd})
        return _Reply(nodes[i], content)

    replayed = _tiny_update("3", 33, start)  # client 3's update of round 4
    untagged = serde.update_to_recorddict(ups[2], parts="ab")  # no round tag at all
    replies = [
        reply(0, 5),
        reply(0, 5, _tiny_update("0", 99, start)),  # a second reply from node 0
        reply(1, 5),
        reply(3, 4, replayed),  # replayed from round 4
        _Reply(nodes[2], untagged),
        reply(3, 5),
        _Reply(999, reply(1, 5).content),  # a node nobody asked
    ]
    got = collect_plain(_FakeGrid(replies), [], None, starts, nodes, "ab", 5)  # type: ignore[arg-type]
    validate_replies(got, starts, parts="ab", extras={}, max_norm=None, max_examples=100, rnd=5)
    assert [u.client_id for u in got.updates] == ["0", "1", "3"]
    assert {i for i, _ in got.rejected} == {3, 2}
    fed = get_aggregator("fedit")
    agg = fed.aggregate(got.updates)
    clean = fed.aggregate([ups[0], ups[1], ups[3]])
    assert _max_diff(dict(agg.adapters), dict(clean.adapters)) == 0.0
    # the first reply of node 0 counted, not the second
    first = got.updates[0]
    assert torch.equal(first.adapters["q"].a, ups[0].adapters["q"].a)


# --- a poisoned client through the real round loop ---------------------------------------


def _flat(u: Any) -> torch.Tensor:
    from fedft.aggregation.robust import flatten_trainables

    return flatten_trainables(u, "ab")


def _global_after(out: Path) -> ClientUpdate:
    ck = load_checkpoint(out / "checkpoint")["coordinator"]
    return ClientUpdate(
        client_id="g",
        adapters={
            m: LoraFactors(a=e["a"], b=e["b"], scaling=float(e["scaling"]))
            for m, e in ck["global_adapters"].items()
        },
        num_examples=1,
        extras=ck["extras"],
    )


POISON = 1000.0


@pytest.mark.slow  # four simulations: ~2-3 min on 2 cores
def test_poisoned_client_pulls_fedit_off_but_not_robust(tiny_bert_dir: str, tmp_path: Path) -> None:
    """Client 0 sends start + 1000 x its real delta; 4 honest clients; one round each."""
    dist: dict[str, float] = {}
    bound = 0.0
    for robust in ("off", "median", "trimmed_mean", "norm_bound"):
        sets: dict[str, Any] = {
            "federation.num_clients": 5,
            "federation.clients_per_round": 5,
            "federation.rounds": 1,
            "federation.lr": 0.01,
            "aggregation.robust": f"'{robust}'",
            "aggregation.trim_fraction": 0.2,
        }
        if robust == "norm_bound":  # 2x the largest honest delta norm seen in the first run
            sets["aggregation.norm_bound"] = bound
        cfg = tiny_config(tiny_bert_dir, **sets)
        cap, out = tmp_path / robust / "cap", tmp_path / robust / "run"
        cap.mkdir(parents=True)
        run_sim(
            cfg, out, fault_client_app(cfg, plan={"1:0": f"poison:{POISON}"}, capture_dir=str(cap))
        )
        honest = _updates(cap, 1)
        assert sorted(u.client_id for u in honest) == ["1", "2", "3", "4"]
        start = _flat(load_update(cap / "start-1-0.safetensors", "s"))
        mean = _flat(get_aggregator("fedit").aggregate(honest))
        radius = max(float((_flat(u) - mean).norm()) for u in honest)  # honest spread
        if robust == "off":
            bound = 2 * max(float((_flat(u) - start).norm()) for u in honest)
        dist[robust] = float((_flat(_global_after(out)) - mean).norm()) / radius
    print(f"||global - honest mean|| / honest radius, poison x{POISON:g}: {dist}")
    assert dist["off"] > 50  # FedIT is pulled hundreds of honest radii away
    for robust in ("median", "trimmed_mean", "norm_bound"):
        assert dist[robust] < 1.0, (robust, dist)  # inside the honest clients' ball
