"""One hostile client against the server's round, played through real Flower rounds.

Each simulation runs the real ServerApp and the real ClientApp with one client turned
hostile by ``tests/test_faults_apps.py`` (the same handlers, then the attack on what it
sends). Without the server-side checks these attacks replaced the model (a forged SecAgg
sum, a claimed example count of 1e7) or failed the whole run (a malformed privacy record
raised KeyError). Now the bad reply or the forged sum is refused alone and
the run carries on with the honest clients. Fast tests pin the pure checks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from local_grid import Killed, LocalGrid
from test_faults_apps import FaultMod, fault_client_app, metrics_rows, run_sim, tiny_config

from fedft.aggregation.robust import flatten_trainables
from fedft.checkpoint import load_checkpoint
from fedft.config import ConfigError, load_config
from fedft.replies import (
    PrivacyReply,
    bind_client_indices,
    check_epsilon,
    parse_privacy_record,
)
from fedft.reporting.metrics import MetricsWriter
from fedft.secagg.bounds import sum_problems
from fedft.types import ClientUpdate, LoraFactors
from server.federation import run_federation
from server.rounds import excluded_from_state

THREE = {
    "federation.num_clients": 3,
    "federation.clients_per_round": 3,
    "federation.round_timeout_s": 60.0,
}


def _global_norm(out: Path) -> float:
    ck = load_checkpoint(out / "checkpoint")["coordinator"]
    g = ClientUpdate(
        client_id="g",
        adapters={
            m: LoraFactors(a=e["a"], b=e["b"], scaling=float(e["scaling"]))
            for m, e in ck["global_adapters"].items()
        },
        num_examples=1,
        extras=ck["extras"],
    )
    return float(flatten_trainables(g, "ab").abs().max())


# --- through Flower -----------------------------------------------------------------------


def test_plain_round_rejects_a_weight_grab_and_a_malformed_record(
    tiny_bert_dir: str, tmp_path: Path
) -> None:
    """Attack: client 0 claims 1e7 examples (all of FedAvg's weight); client 1 sends a
    malformed privacy record (no refused flag). Both are rejected alone."""
    cfg = tiny_config(tiny_bert_dir, **THREE, **{"federation.rounds": 2})
    plan = {"1:0": "examples:10000000", "1:1": "bad-privacy"}
    run_sim(cfg, tmp_path / "run", fault_client_app(cfg, plan=plan))
    rows = {r["round"]: r for r in metrics_rows(tmp_path / "run")}
    assert rows[1]["clients"] == 1 and rows[1]["rejected"] == 2
    assert rows[2]["clients"] == 3 and rows[2]["rejected"] == 0
    assert not any(r.get("failed") for r in rows.values())


def test_forged_secure_sum_is_refused(tiny_bert_dir: str, tmp_path: Path) -> None:
    """Attack: under secure aggregation, client 0 adds 1e6 to every masked value and 1e9 to
    its masked weight (its vector then outweighs everyone and moves the model by ~1e6).
    The total weight is out of [3, 3 * max_examples]: the round is refused."""
    cfg = tiny_config(
        tiny_bert_dir, **THREE, **{"federation.rounds": 2, "aggregation.secure": "true"}
    )
    out = tmp_path / "run"
    run_sim(cfg, out, fault_client_app(cfg, plan={"1:0": "offset:1000000:1000000000"}))
    rows = {r["round"]: r for r in metrics_rows(out)}
    assert rows[1].get("failed") is True
    assert rows[2]["clients"] == 3 and not rows[2].get("failed")
    assert _global_norm(out) < 100.0  # the model was never replaced


def test_forged_sum_under_user_dp_is_refused(tiny_bert_dir: str, tmp_path: Path) -> None:
    """Attack under secure aggregation + user-level DP (clients clip to C, weight 1):
    round 1 client 0 adds 1e3 to every masked value (the sum of clipped deltas then exceeds
    3 C); round 2 it subtracts 1 from its masked count (count 2 != 3 clients). Both
    sums are refused (under user-level DP the round then releases the noise alone, and is
    accounted); round 3 is clean."""
    cfg = tiny_config(
        tiny_bert_dir,
        **THREE,
        **{
            "federation.rounds": 3,
            "aggregation.secure": "true",
            "privacy.mode": "'user'",
            "privacy.noise_multiplier": 1.0,
            "privacy.epsilon": 1000.0,  # the budget must not stop the run first
            "privacy.max_grad_norm": 1.0,
        },
    )
    out = tmp_path / "run"
    plan = {"1:0": "offset:1000:0", "2:0": "offset:0:-1"}
    run_sim(cfg, out, fault_client_app(cfg, plan=plan))
    rows = {r["round"]: r for r in metrics_rows(out)}
    assert rows[1].get("failed") is True and rows[2].get("failed") is True
    assert not rows[3].get("failed")
    assert rows[1]["epsilon"] < rows[2]["epsilon"] < rows[3]["epsilon"]  # every round released
    assert _global_norm(out) < 100.0


def test_bad_dealer_is_convicted_dropped_and_excluded(tiny_bert_dir: str, tmp_path: Path) -> None:
    """Attack (issue 14, item 3): under secure aggregation, client 0 deals shares of its
    secrets that are off its polynomial, to every holder. Before Feldman commitments its
    self-mask seed could not be rebuilt and the round aborted, naming no one, every round.
    Now both holders complain at the share check, the server convicts client 0 from the
    evidence, the round completes with the two honest clients, and round 2 leaves it out."""
    cfg = tiny_config(
        tiny_bert_dir, **THREE, **{"federation.rounds": 2, "aggregation.secure": "true"}
    )
    out = tmp_path / "run"
    run_sim(cfg, out, fault_client_app(cfg, plan={"1:0": "bad-dealer", "2:0": "bad-dealer"}))
    rows = {r["round"]: r for r in metrics_rows(out)}
    assert not rows[1].get("failed") and rows[1]["clients"] == 2
    assert rows[1]["secagg_suspects"] == [0]
    assert rows[2]["sampled"] == 2 and rows[2]["clients"] == 2 and not rows[2].get("failed")
    assert _global_norm(out) < 100.0


def test_lying_holder_is_convicted_and_excluded(tiny_bert_dir: str, tmp_path: Path) -> None:
    """Attack: client 1 adds one to every share it reveals at the unmasking step. Its
    shares fail the dealers' commitments: it is named, the round completes from the honest
    shares, and round 2 runs without it."""
    cfg = tiny_config(
        tiny_bert_dir, **THREE, **{"federation.rounds": 2, "aggregation.secure": "true"}
    )
    out = tmp_path / "run"
    run_sim(cfg, out, fault_client_app(cfg, plan={"1:1": "lie-unmask", "2:1": "lie-unmask"}))
    rows = {r["round"]: r for r in metrics_rows(out)}
    assert not rows[1].get("failed") and rows[1]["clients"] == 3
    assert rows[1]["secagg_suspects"] == [1]
    assert rows[2]["sampled"] == 2 and rows[2]["clients"] == 2 and not rows[2].get("failed")


@pytest.mark.parametrize("cheats", [[0], [0, 1]], ids=["round-completes", "round-fails"])
def test_exclusions_survive_a_resume(
    tiny_bert_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cheats: list[int]
) -> None:
    """Attack: clients ``cheats`` deal bad shares every round and wait for the server to
    restart. Round 1 convicts them (with two of three cheating it fails: too few honest
    clients remain); the server is killed right after round 1's checkpoint and resumed
    (in process, fresh client contexts, as a restarted server is a new Flower run).
    Before the exclusions were checkpointed the resumed run sampled the convicted again
    in rounds 2 and 3 (convicting them again each time, or, with a less clumsy cheat,
    letting them back in), and a failed round left no checkpoint at all; now they stay
    out."""
    cfg = tiny_config(
        tiny_bert_dir, **THREE, **{"federation.rounds": 3, "aggregation.secure": "true"}
    )
    faults = FaultMod(
        cfg,
        plan={f"{r}:{k}": "bad-dealer" for r in (1, 2, 3) for k in cheats},
        capture_dir=None,
        drop_rate=0.0,
        drop_seed=0,
    )

    real_write = MetricsWriter.write

    def killed_after_round_1(self: MetricsWriter, **row: object) -> None:
        if row.get("round") == 1:
            raise Killed("server killed after round 1's checkpoint")
        real_write(self, **row)

    out = tmp_path / "run"
    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(MetricsWriter, "write", killed_after_round_1)
        run_federation(LocalGrid(cfg, mod=faults), cfg, out, progress=False)
    assert load_checkpoint(out / "checkpoint")["excluded"] == cheats
    run_federation(LocalGrid(cfg, mod=faults), cfg, out, progress=False, resume=True)
    rows = {r["round"]: r for r in metrics_rows(out)}
    assert rows[1]["secagg_suspects"] == cheats
    assert bool(rows[1].get("failed")) is (len(cheats) == 2)
    honest = 3 - len(cheats)
    for rnd in (2, 3):
        assert rows[rnd]["sampled"] == honest, rows[rnd]
        assert "secagg_suspects" not in rows[rnd]
    if honest == 2:
        assert rows[3]["clients"] == 2 and not rows[3].get("failed")


# --- the pure checks ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [[3], [-1], [0, 0], [True], [1.0], ["1"], "0", {"0": 1}, list(range(4)), [None]],
)
def test_damaged_exclusions_in_a_checkpoint_are_refused(value: object) -> None:
    """The checkpoint's exclusions are read as data: indices of this run's clients only."""
    with pytest.raises(ValueError, match="'excluded'"):
        excluded_from_state(value, num_clients=3)


def test_exclusions_from_a_checkpoint() -> None:
    assert excluded_from_state([2, 0], num_clients=3) == {0, 2}
    assert excluded_from_state([], num_clients=3) == set()
    assert excluded_from_state(None, num_clients=3) == set()  # written before they were saved


def test_sum_bounds_weighted() -> None:
    vec = np.array([1.0, 2.0, 30.0])  # weight 30 over 3 clients
    assert sum_problems(vec, included=3, weighted=True, max_examples=10) == []
    assert sum_problems(vec, included=3, weighted=True, max_examples=9)  # 30 > 27
    assert sum_problems(np.array([1.0, 2.0, 1.0]), included=3, weighted=True, max_examples=10)
    assert sum_problems(np.array([1.0, np.nan]), included=1, weighted=True, max_examples=10)


def test_sum_bounds_uniform_weights() -> None:
    ref = np.zeros(4)
    delta = np.array([0.6, 0.0, 0.8, 0.0])  # norm 1 each
    ok = np.concatenate([3 * delta, [3.0]])
    assert (
        sum_problems(ok, included=3, weighted=False, max_examples=1, reference=ref, clip_norm=1.0)
        == []
    )
    big = np.concatenate([3 * delta + 0.5, [3.0]])
    assert sum_problems(
        big, included=3, weighted=False, max_examples=1, reference=ref, clip_norm=1.0
    )
    miscount = np.concatenate([3 * delta, [2.0]])
    assert "count" in sum_problems(miscount, included=3, weighted=False, max_examples=1)[0]


def test_privacy_record_and_epsilon_checks() -> None:
    assert parse_privacy_record({"refused": False}) == PrivacyReply(refused=False, message="")
    assert parse_privacy_record({"refused": True, "message": "m" * 500}) == PrivacyReply(
        refused=True, message="m" * 200
    )
    for bad in (
        {},
        {"message": "no flag"},
        {"refused": "yes"},
        {"refused": False, "accountant": "{}"},  # a ledger never leaves a client
    ):
        assert isinstance(parse_privacy_record(bad), str), bad
    assert check_epsilon(2.5) is None
    for bad_eps in (-1.0, float("nan"), float("inf"), 1e9, "3", True):
        assert check_epsilon(bad_eps) is not None


def test_client_index_binding() -> None:
    # without identities: a duplicated claim goes to nobody (no first-come takeover)
    free = bind_client_indices([(10, 0), (11, 1), (12, 0), (13, 7)], num_clients=2)
    assert free.nodes == {1: 11} and {n for n, _ in free.ignored} == {10, 12, 13}
    # bound by the operator: declarations cannot move a node off its index
    bound = bind_client_indices(
        [(10, 0), (11, 1), (12, 0), (99, 0)], num_clients=3, bound={10: 0, 11: 1, 12: 2}
    )
    assert bound.nodes == {0: 10, 1: 11, 2: 12}
    assert {n for n, _ in bound.ignored} == {12, 99}


@pytest.mark.parametrize(
    "sets",
    [
        ["aggregation.secure=true", "aggregation.robust='norm_bound'"],
        ["aggregation.secure=true", "aggregation.max_update_norm=5.0"],
        ["aggregation.max_examples=-1"],
    ],
)
def test_unverifiable_combinations_are_config_errors(sets: list[str]) -> None:
    with pytest.raises(ConfigError):
        load_config(None, sets)


# --- the same forgeries through the SecAgg protocol in process (no Ray) ------------------


def _forged_round(*, weighted: bool, clip: float, value: float, weight: float):  # type: ignore[no-untyped-def]
    """Three clients run the real protocol; client 1 adds ``value`` to every masked value
    entry and ``weight`` to its masked weight (in the ring) before sending."""
    from test_secure_flower import _updates

    from client.secure_round import secure_vector
    from fedft.secagg import MaskedInput, SecAggClient, SecAggParams, SecAggServer

    start, extras, ups = _updates(3)
    template = ClientUpdate(client_id="t", adapters=start, num_examples=1, extras=extras)
    vectors = [
        secure_vector(u, start=template, parts="ab", clip_delta=clip, weighted=weighted)
        for u in ups
    ]
    params = SecAggParams(num_clients=3, max_dropouts=1, vector_length=len(vectors[0]), round_id=1)
    clients = {i: SecAggClient(index=i, params=params) for i in (1, 2, 3)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    qualified = server.collect_checks([c.check_shares(routed[i]) for i, c in clients.items()])
    masked = []
    for i, c in clients.items():
        m = c.masked_input(qualified, vectors[i - 1])
        if i == 1:
            arr = np.frombuffer(m.masked, dtype="<u8").copy()
            scale = 2.0**params.frac_bits
            arr[:-1] += np.uint64(round(value * scale) % (1 << 64))
            arr[-1:] += np.uint64(round(weight * scale) % (1 << 64))
            m = MaskedInput(index=1, masked=arr.tobytes())
        masked.append(m)
    request = server.collect_masked(masked)
    total = server.collect_unmasking([c.unmask(request) for c in clients.values()])
    return total, template, start, extras


@pytest.mark.parametrize(
    ("weight", "refused"), [(0.0, False), (1e9, True), (-float(4 + 7 + 10 - 1), True)]
)
def test_forged_weight_in_the_protocol_is_refused(weight: float, refused: bool) -> None:
    from fedft.aggregation import get_aggregator
    from server.secure_round import check_sum

    # honest weights n_k = 4, 7, 10 (tests/test_secure_flower.py::_updates); max 10 each
    total, template, _, _ = _forged_round(weighted=True, clip=0.0, value=0.0, weight=weight)
    problems = check_sum(
        total, template=template, parts="ab", aggregator=get_aggregator("fedit"), max_examples=10
    )
    assert bool(problems) is refused, problems


@pytest.mark.parametrize(
    ("value", "weight", "refused"), [(0.0, 0.0, False), (1e3, 0.0, True), (0.0, -1.0, True)]
)
def test_forged_sum_under_user_dp_in_the_protocol_is_refused(
    value: float, weight: float, refused: bool
) -> None:
    from fedft.aggregation import get_aggregator
    from fedft.privacy import CentralDP
    from server.secure_round import check_sum

    total, template, start, extras = _forged_round(
        weighted=False, clip=0.5, value=value, weight=weight
    )
    dp = CentralDP(
        get_aggregator("fedit"),
        clip_norm=0.5,
        noise_multiplier=0.0,
        expected_clients=3,
        num_clients=3,
        seed=0,
        delta=1e-5,
    )
    dp.set_reference(start, extras=extras)
    problems = check_sum(total, template=template, parts="ab", aggregator=dp, max_examples=10)
    assert bool(problems) is refused, problems


def test_discovery_waits_for_the_bound_nodes_not_for_any_n(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extra registered node (bound to index 3 of a 3-client run) connects first: the
    server must not start discovery with it and two of the three bound nodes."""
    from flwr.app import ConfigRecord, RecordDict

    import server.federation as strategy

    monkeypatch.setattr(strategy.time, "sleep", lambda s: None)

    class Msg:  # Flower's Message needs a running app; discovery reads only the address
        def __init__(self, *, content: object, dst_node_id: int, message_type: str) -> None:
            self.metadata = type("M", (), {"dst_node_id": dst_node_id})()

    monkeypatch.setattr(strategy, "Message", Msg)
    seen = [[99, 10, 11], [99, 10, 11], [99, 10, 11, 12]]

    class Reply:
        def __init__(self, src: int, idx: int) -> None:
            self.metadata = type("M", (), {"src_node_id": src})()
            self.content = RecordDict({"info": ConfigRecord({"client_index": idx})})
            self.error = None

        def has_error(self) -> bool:
            return False

    class Grid:
        calls = 0

        def get_node_ids(self) -> list[int]:
            Grid.calls += 1
            return seen[min(Grid.calls - 1, len(seen) - 1)]

        def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
            claims = {99: 0, 10: 0, 11: 1, 12: 2}  # the extra node declares index 0
            return [Reply(m.metadata.dst_node_id, claims[m.metadata.dst_node_id]) for m in messages]

    nodes = strategy.discover_clients(
        Grid(),  # type: ignore[arg-type]
        num_clients=3,
        timeout_s=60,
        bound={10: 0, 11: 1, 12: 2, 99: 3},
    )
    assert nodes == {0: 10, 1: 11, 2: 12} and Grid.calls == 3
