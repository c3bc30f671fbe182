"""Each privacy guarantee played against the party it names (docs/threat-model.md).

Every test here performs an attack or the computation behind one: a server that sends a
made-up accountant history or a run without DP to a node with its own budget, an observer
who recomputes the user-level cohort from the published seed, a client reply inspected for
data-dependent statistics, a GDP-calibrated σ re-measured by PRV, and so on. Each failed on
the code before the fix and passes now.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, RecordDict
from test_faults_apps import tiny_config

from fedft import builders
from fedft.config import ConfigError, load_config
from fedft.privacy import CentralDP, calibrate_noise, check_budget, epsilon_of, plan_user_level
from fedft.privacy.accountant import PrivacyAccountant
from fedft.transport import serde

ROOT = Path(__file__).resolve().parents[1]


# --- the client's round, driven the way the server drives it ----------------------------


def _start(cfg: Any, idx: int, rnd: int, **extra_conf: Any) -> RecordDict:
    """The start message the server sends client ``idx`` in round ``rnd``."""
    from fedft.training.coordinator import Coordinator
    from fedft.training.local import resolve_device
    from fedft.training.runtime import get_data, get_runtime

    fed = get_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(
        **builders.runtime_kwargs(cfg, num_labels=fed.num_labels), device=resolve_device("cpu")
    )
    aggregator = builders.build_aggregator(cfg)
    coord = Coordinator(
        aggregator=aggregator,
        shapes=runtime.shapes,
        rank_of=cfg.adapter.rank_of,
        alpha=cfg.adapter.alpha,
        extras=dict(runtime.initial_extras),
        seed=cfg.seed,
        max_rank=builders.max_rank(cfg),
    )
    start = coord.start_for(idx)
    conf = {"round": rnd, "client_index": idx, "rank": start.rank, "seed": rnd, **extra_conf}
    return serde.start_to_recorddict(
        adapters=start.adapters,
        parts=serde.start_parts(aggregator.trainable, holds_frozen=False),
        base_delta=start.base_delta,
        extras=start.extras,
        config=conf,
    )


def _context(**node_config: Any) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, **node_config},
        state=RecordDict(),
        run_config={},
    )


def _refused(reply: RecordDict) -> bool:
    privacy = reply.get(serde.PRIVACY_RECORD)
    return isinstance(privacy, ConfigRecord) and bool(privacy["refused"])


def _dp_config(model_dir: str, **sets: Any) -> Any:
    # two rounds of two steps at q = 4/100: sigma is calibrated so four steps spend eps = 3
    return tiny_config(
        model_dir,
        **{
            "privacy.mode": "'sample'",
            "privacy.epsilon": 3.0,
            "federation.num_clients": 2,
            "federation.clients_per_round": 2,
            "federation.rounds": 2,
            **sets,
        },
    )


def _exhaust(cfg: Any, context: Context) -> None:
    """Train every planned round; the next one is refused (the budget is spent)."""
    from client.app import train_reply

    for rnd in range(1, cfg.federation.rounds + 1):
        assert not _refused(train_reply(cfg, _start(cfg, 0, rnd), context)), rnd
    assert _refused(train_reply(cfg, _start(cfg, 0, 3), context))


def test_server_cannot_reset_a_clients_spending(tiny_bert_dir: str, tmp_path: Path) -> None:
    """Threat model S4: a made-up history from the server does not lower the client's ε."""
    from client.app import train_reply

    cfg = _dp_config(tiny_bert_dir)
    context = _context(ledger=str(tmp_path / "ledger.json"))
    _exhaust(cfg, context)
    # the attack: a 101-step history at sigma = 1e4 (eps ~ 0), longer than the client's own
    fake = PrivacyAccountant("prv", level="sample")
    fake.step(noise_multiplier=1e4, sample_rate=0.04, steps=101)
    forged = json.dumps(fake.state_dict())
    reply = train_reply(cfg, _start(cfg, 0, 4, accountant=forged), context)
    assert _refused(reply), "the client trained past its budget on the server's history"
    # nor does a restart (fresh node state) forget it: the ledger is on the client's disk
    restarted = _context(ledger=str(tmp_path / "ledger.json"))
    assert _refused(train_reply(cfg, _start(cfg, 0, 5), restarted))
    from fedft.privacy.client_ledger import read_ledger

    assert read_ledger(tmp_path / "ledger.json").steps == 4


def test_node_with_its_own_budget_trains_only_under_its_terms(
    tiny_bert_dir: str, tmp_path: Path
) -> None:
    """Threat model S5: the server's config cannot switch DP off for a budgeted node."""
    from client.app import train_reply

    node = {"epsilon": 3.0, "delta": 1e-5, "accountant": "prv", "ledger": str(tmp_path / "l")}
    for sets in (
        {"privacy.mode": "'off'"},
        {"privacy.mode": "'user'"},
        {"privacy.delta": 1e-3},
        {"privacy.accountant": "'rdp'"},
    ):
        cfg = _dp_config(tiny_bert_dir, **sets)
        reply = train_reply(cfg, _start(cfg, 0, 1), _context(**node))
        assert _refused(reply), sets
        assert serde.ADAPTERS not in reply  # nothing trained, nothing sent
    cfg = _dp_config(tiny_bert_dir)  # its own terms: it trains, under DP
    reply = train_reply(cfg, _start(cfg, 0, 1), _context(**node))
    assert not _refused(reply)
    assert 0 < float(reply[serde.METRICS]["epsilon"]) <= 3.0  # type: ignore[index]


def test_ledger_only_grows() -> None:
    """Threat model S4: a write that would forget steps is refused."""
    from fedft.privacy.client_ledger import ClientLedger, LedgerError

    a = ClientLedger().grow(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    b = a.grow(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    c = b.grow(noise_multiplier=2.0, sample_rate=0.1, steps=1)
    assert b.extends(a) and c.extends(b) and c.extends(a) and not a.extends(b)
    other = ClientLedger().grow(noise_multiplier=1e4, sample_rate=0.04, steps=101)
    assert not other.extends(a)
    assert ClientLedger.from_json(c.to_json()) == c
    with pytest.raises(LedgerError):
        ClientLedger.from_json('{"version": 1, "history": [[1.0, 2.0, 3]]}')  # q > 1


def test_ledger_file_refuses_to_shrink(tmp_path: Path) -> None:
    from fedft.privacy.client_ledger import ClientLedger, LedgerError, read_ledger, write_ledger

    path = tmp_path / "ledger.json"
    a = ClientLedger().grow(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    write_ledger(path, a)
    with pytest.raises(LedgerError, match="does not extend"):
        write_ledger(path, ClientLedger())
    with pytest.raises(LedgerError, match="does not extend"):
        write_ledger(path, ClientLedger().grow(noise_multiplier=1e4, sample_rate=0.1, steps=9))
    assert read_ledger(path) == a
    path.write_text("{not json")
    with pytest.raises(LedgerError, match="never delete"):
        read_ledger(path)


@pytest.mark.parametrize("mode", ["sample", "user"])
def test_nothing_data_dependent_leaves_a_dp_client(
    tiny_bert_dir: str, tmp_path: Path, mode: str
) -> None:
    """Threat model S6 / A3: a DP client's reply carries the mechanism's output only."""
    from client.app import train_reply

    sets: dict[str, Any] = {"privacy.mode": f"'{mode}'"}
    if mode == "user":
        sets |= {"federation.num_clients": 4, "federation.clients_per_round": 2}
    cfg = _dp_config(tiny_bert_dir, **sets)
    reply = train_reply(cfg, _start(cfg, 0, 1), _context(ledger=str(tmp_path / "l")))
    assert not _refused(reply)
    metrics = dict(reply[serde.METRICS])  # type: ignore[arg-type]
    assert set(metrics) <= ({"epsilon"} if mode == "sample" else set()), metrics
    privacy = reply.get(serde.PRIVACY_RECORD)
    assert privacy is None or set(privacy) == {"refused"}  # type: ignore[arg-type]
    n = int(reply[serde.META]["num_examples"])  # type: ignore[index]
    # sample level: n_k is public (zero-out neighbours); user level: it is the client's data
    assert n == (1 if mode == "user" else 100)


def test_no_dp_run_still_reports_its_statistics(tiny_bert_dir: str, tmp_path: Path) -> None:
    from client.app import train_reply

    cfg = _dp_config(tiny_bert_dir, **{"privacy.mode": "'off'"})
    reply = train_reply(cfg, _start(cfg, 0, 1), _context())
    assert "train_loss" in reply[serde.METRICS]  # type: ignore[operator]


# --- user-level sampling ------------------------------------------------------------------


def test_user_cohort_is_secret_poisson_and_matches_its_accountant() -> None:
    """Threat model U2: the ε reported is the ε of the sampling actually done."""
    from types import SimpleNamespace

    from fedft.privacy.ledger import PrivacyLedger
    from server.rounds import sample

    n_clients, m, rounds, target = 10, 5, 5, 3.0
    cfg = load_config(
        None,
        [
            f"federation.num_clients={n_clients}",
            f"federation.clients_per_round={m}",
            f"federation.rounds={rounds}",
            "privacy.mode='user'",
            f"privacy.epsilon={target}",
        ],
    )
    sigma = plan_user_level(
        epsilon=target, delta=1e-5, clients_per_round=m, num_clients=n_clients, rounds=rounds
    ).noise_multiplier
    # the attack on a published, seeded fixed-size cohort: anyone recomputes it, and a client
    # known to be in k rounds has the eps of k releases without sampling (q = 1)
    public = [
        sorted(random.Random(cfg.seed * 7919 + r).sample(range(n_clients), m))
        for r in range(1, rounds + 1)
    ]
    k = max(sum(i in c for c in public) for i in range(n_clients))
    assert epsilon_of([(sigma, 1.0, k)], delta=1e-5, mechanism="prv") > 4.0  # ~4.56, not 3
    # the sampler the server runs now
    dp = builders.build_aggregator(cfg)
    assert isinstance(dp, CentralDP)
    q = dp.sample_rate
    assert q == m / n_clients
    fed = SimpleNamespace(
        cfg=cfg, ledger=PrivacyLedger(), coord=SimpleNamespace(aggregator=dp), excluded=set()
    )
    # 20,000 draws: the pair frequency has sd 0.0031, so the bound below is 4.6 sd from q^2
    # and from a fixed-size cohort (4,000 draws: 2.2 sd, a false failure in ~3 % of runs)
    draws = [sample(fed, 1) for _ in range(20_000)]  # type: ignore[arg-type]
    assert draws[:20] != [draws[0]] * 20  # the same round and seed: not reproducible
    inclusion = np.array([[i in c for i in range(n_clients)] for c in draws], dtype=float)
    assert np.abs(inclusion.mean(0) - q).max() < 0.03  # each client joins with probability q
    pair = float((inclusion[:, 0] * inclusion[:, 1]).mean())
    # independent coins: P(both) = q^2 = 0.25; a fixed-size cohort gives m(m-1)/(N(N-1)) = 0.22
    assert abs(pair - q * q) < 0.014
    sizes = inclusion.sum(1)
    assert abs(sizes.var() - n_clients * q * (1 - q)) < 0.35  # Binomial(N, q), not always m
    # and the accountant counts exactly that mechanism: one sampled Gaussian at q per round
    for _ in range(rounds):
        dp.accountant.step(noise_multiplier=dp.noise_multiplier, sample_rate=q, steps=1)
    eps = dp.epsilon(1e-5)
    assert eps == pytest.approx(epsilon_of([(sigma, q, rounds)], delta=1e-5, mechanism="prv"))
    assert eps <= target


def test_empty_user_cohort_still_releases_noise_and_is_accounted() -> None:
    from test_privacy import make_inner

    inner, ref = make_inner("fedit")
    dp = CentralDP(
        inner, clip_norm=1.0, noise_multiplier=1.0, expected_clients=2, num_clients=4, seed=0
    )
    dp.set_reference(ref)
    result = dp.aggregate([])
    assert dp.accountant.steps == 1
    moved = sum(float((result.adapters[m].b - ref[m].b).abs().sum()) for m in ref)
    assert moved > 0  # the noise was released


def test_user_level_metrics_do_not_publish_the_cohort() -> None:
    from fedft.privacy.release import published_round

    row = {
        "round": 1,
        "clients": 3,
        "sampled": 3,
        "bytes_up": 10,
        "agg_clients": 3.0,
        "agg_error": 0.25,  # computed from the un-noised individual updates
    }
    out = published_round(row, mode="user")
    assert out["clients"] is None and out["sampled"] is None and out["bytes_up"] is None
    assert "agg_clients" not in out and "agg_error" not in out
    assert published_round(row, mode="sample") == row


# --- accounting rules ---------------------------------------------------------------------


def test_gdp_is_refused_for_calibration_and_refusal() -> None:
    """Threat model S2: no budget decision rests on an analysis that can underestimate ε."""
    from opacus.accountants.utils import get_noise_multiplier

    # the computation: sigma calibrated by GDP for eps = 3 spends more than 3 by PRV
    sigma = get_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=0.04, steps=100, accountant="gdp"
    )
    assert epsilon_of([(sigma, 0.04, 100)], delta=1e-5, mechanism="prv") > 4.0
    with pytest.raises(ValueError, match="underestimate"):
        calibrate_noise(epsilon=3.0, delta=1e-5, sample_rate=0.04, steps=100, accountant="gdp")
    with pytest.raises(ValueError, match="underestimate"):
        check_budget(
            PrivacyAccountant("gdp"),
            noise_multiplier=1.0,
            sample_rate=0.04,
            steps=1,
            epsilon_budget=3.0,
            delta=1e-5,
        )
    with pytest.raises(ConfigError, match="privacy.accountant = 'gdp'"):
        load_config(None, ["privacy.mode='sample'", "privacy.accountant='gdp'"])


def test_split_with_user_level_dp_is_refused() -> None:
    """Threat model L7: no user-level ε is reported for a run whose cut is unprotected."""
    with pytest.raises(ConfigError, match="cross the cut"):
        load_config(
            None,
            [
                "adapter.method='split'",
                "privacy.mode='user'",
                "federation.num_clients=10",
                "federation.clients_per_round=5",
            ],
        )


def test_delta_must_be_below_one_over_the_clients_examples() -> None:
    """Threat model S8."""
    from fedft.privacy.client import prepare_round
    from fedft.privacy.client_ledger import ClientLedger

    kwargs: dict[str, Any] = dict(
        epsilon=3.0,
        mechanism="prv",
        noise_multiplier=1.0,
        planned_steps=10,
        batch_size=8,
        local_steps=2,
        ledger=ClientLedger(),
    )
    ok = prepare_round(delta=1e-5, num_examples=1000, **kwargs)
    assert ok.decision.allowed
    bad = prepare_round(delta=1e-2, num_examples=100, **kwargs)  # delta * n = 1
    assert not bad.decision.allowed and "below 1/n" in bad.decision.message


def test_central_dp_round_advances_under_secure_aggregation() -> None:
    """Threat model U1: a secure round is the same privatised round as a plain one."""
    from test_privacy import make_inner

    from fedft.aggregation.robust import flatten_trainables
    from fedft.secagg import SecAggResult
    from fedft.types import ClientUpdate
    from server.secure_round import aggregate_from_sum

    inner, ref = make_inner("fedit")
    dp = CentralDP(
        inner, clip_norm=1.0, noise_multiplier=0.5, expected_clients=2, num_clients=4, seed=None
    )
    dp.set_reference(ref)
    template = ClientUpdate(client_id="t", adapters=ref, num_examples=1)
    x0 = flatten_trainables(template, "ab").numpy()
    total = SecAggResult(total=np.concatenate([2 * x0, [2.0]]), included=(1, 2), dropped=())
    aggregate_from_sum(total, template=template, parts="ab", aggregator=dp)
    assert dp.accountant.steps == 1
    assert dp._round == 1
    assert dp.state_dict()["round"] == 1


# --- data ---------------------------------------------------------------------------------


def test_fedsb_public_split_holds_no_client_record() -> None:
    """Threat model D1: the server's public data shares no record with any client."""
    from fedft.data import build_federated_data

    fed = build_federated_data(
        dataset="chatterbot",
        task="causal_lm",
        partition="natural",
        alpha=0.5,
        num_clients=5,
        test_size=50,
        public_size=64,
        max_train_examples=0,
        seed=0,
    )
    client = {(t, str(y)) for c in fed.clients for t, y in zip(c.text, c.target, strict=True)}
    public = [(t, str(y)) for t, y in zip(fed.public.text, fed.public.target, strict=True)]
    assert public, "the public split is empty"
    copies = [p for p in public if p in client]
    assert not copies, f"{len(copies)} of {len(public)} public records are client records"


def test_split_drops_public_copies_keeps_the_rest() -> None:
    from fedft.data.datasets import Records, split_records

    text = [f"t{i}" for i in range(40)] + ["dup"] * 20
    records = Records(text=text, target=[0] * 60, group=["g"] * 60)
    train, test, public = split_records(
        records, test_size=5, public_size=10, max_train_examples=0, seed=0
    )
    assert not set(public.text) & (set(train.text) | set(test.text))
    assert len(train) == 45 and len(test) == 5 and 0 < len(public) <= 10


def test_node_budget_is_checked_at_its_boundaries_and_named() -> None:
    """`fedft client --epsilon/--delta/--accountant`: an impossible own budget is refused."""
    from fedft.privacy.client import NodePolicy

    for eps, delta in ((0.0, 1e-5), (-1.0, 1e-5), (3.0, 0.0), (3.0, 1.0), (3.0, 1.5)):
        with pytest.raises(
            ValueError,
            match=rf"^node budget epsilon = {eps!r} \(> 0\) at delta = {delta!r} \(in \(0, 1\)\)$",
        ):
            NodePolicy(epsilon=eps, delta=delta, accountant="prv")
    # a budget below 1 and a delta just inside (0, 1) are budgets
    assert NodePolicy(epsilon=0.5, delta=1e-9, accountant="rdp").epsilon == 0.5
    assert NodePolicy(epsilon=3.0, delta=0.999, accountant="prv").delta == 0.999
    with pytest.raises(
        ValueError, match=r"^accountant 'gdp' cannot be used for a node's own budget: "
    ):
        NodePolicy(epsilon=3.0, delta=1e-5, accountant="gdp")  # type: ignore[arg-type]


def test_user_level_metrics_without_an_aggregation_error_are_published() -> None:
    """A round with no `agg_error` / `agg_clients` (nobody replied) still publishes its line."""
    from fedft.privacy.release import published_round

    row = {"round": 2, "clients": 0, "loss": None, "epsilon": 0.4}
    assert published_round(row, mode="user") == {
        "round": 2,
        "clients": None,
        "loss": None,
        "epsilon": 0.4,
    }
    assert published_round(row, mode="off") == row


def test_ledger_file_in_a_new_folder_its_size_limit_and_what_the_log_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`fedft client --ledger DIR/…/ledger.json` on a fresh node, and a file of exactly 1 MiB."""
    import logging

    from fedft.privacy.client_ledger import (
        MAX_LEDGER_BYTES,
        ClientLedger,
        LedgerError,
        read_ledger,
        write_ledger,
    )

    path = tmp_path / "node" / "privacy" / "ledger.json"  # neither folder exists yet
    ledger = ClientLedger().grow(noise_multiplier=1.2, sample_rate=0.05, steps=7)
    with caplog.at_level(logging.INFO, logger="fedft.privacy.client_ledger"):
        write_ledger(path, ledger)
    assert read_ledger(path) == ledger
    assert [r.getMessage() for r in caplog.records] == [f"privacy ledger {path}: 7 steps"]
    # the size limit is inclusive: a ledger padded to exactly MAX bytes is still read
    text = ledger.to_json()
    path.write_text(text + " " * (MAX_LEDGER_BYTES - len(text)))
    assert path.stat().st_size == MAX_LEDGER_BYTES and read_ledger(path) == ledger
    path.write_text(text + " " * (MAX_LEDGER_BYTES + 1 - len(text)))
    with pytest.raises(
        LedgerError,
        match=rf"^{path}: {MAX_LEDGER_BYTES + 1} bytes is not a privacy ledger "
        rf"\(max {MAX_LEDGER_BYTES}\)$",
    ):
        read_ledger(path)


def test_ledger_refusals_say_what_is_wrong_with_the_file() -> None:
    """A node refuses to train on a ledger it cannot read; the message says what it found."""
    from fedft.privacy.client_ledger import ClientLedger, LedgerError

    refusals = {
        "{not json": r"^the privacy ledger is not JSON: Expecting property name",
        "[]": r"^not a version-1 privacy ledger$",
        '{"version": 2, "history": []}': r"^not a version-1 privacy ledger$",
        '{"version": 1}': r"^the privacy ledger has no history list$",
        '{"version": 1, "history": {"a": 1}}': r"^the privacy ledger has no history list$",
        '{"version": 1, "history": [[1.0, 0.1]]}': (
            r"^bad ledger entry \[1\.0, 0\.1\]: want \[sigma, q, steps\]$"
        ),
        '{"version": 1, "history": [5]}': r"^bad ledger entry 5: want \[sigma, q, steps\]$",
        '{"version": 1, "history": [[1.0, 0.1, -2]]}': (
            r"^bad ledger entry \[1\.0, 0\.1, -2\]: steps = -2: must be an integer >= 0$"
        ),
    }
    for text, message in refusals.items():
        with pytest.raises(LedgerError, match=message):
            ClientLedger.from_json(text)


def test_a_clients_round_uses_its_configured_noise_and_its_own_history() -> None:
    """σ as configured (0: calibrated over the plan), ε from the client's ledger, δ < 1/n."""
    from fedft.privacy.client import delta_refusal, prepare_round
    from fedft.privacy.client_ledger import ClientLedger

    ledger = ClientLedger().grow(noise_multiplier=1.0, sample_rate=0.08, steps=20)
    kwargs: dict[str, Any] = dict(
        epsilon=8.0,
        delta=1e-5,
        mechanism="rdp",
        planned_steps=100,
        num_examples=100,
        batch_size=8,
        local_steps=5,
        ledger=ledger,
    )
    configured = prepare_round(noise_multiplier=2.0, **kwargs)
    assert configured.noise_multiplier == 2.0 and configured.sample_rate == 0.08
    d = configured.decision
    assert d.allowed is True and d.level == "sample"
    assert d.epsilon_now == pytest.approx(
        epsilon_of([(1.0, 0.08, 20)], delta=1e-5, mechanism="rdp")
    )
    assert d.epsilon_after == pytest.approx(
        epsilon_of([(1.0, 0.08, 20), (2.0, 0.08, 5)], delta=1e-5, mechanism="rdp")
    )
    assert configured.spent_if_run(5).history == ((1.0, 0.08, 20), (2.0, 0.08, 5))
    calibrated = prepare_round(noise_multiplier=0.0, **kwargs)
    assert calibrated.noise_multiplier == calibrate_noise(
        epsilon=8.0, delta=1e-5, sample_rate=0.08, steps=100, accountant="rdp"
    )
    # the ledger's history under each analysis: PRV and RDP give their own ε
    for mechanism in ("prv", "rdp"):
        acc = ledger.accountant(mechanism)  # type: ignore[arg-type]
        assert acc.mechanism == mechanism and acc.level == "sample"
        assert acc.epsilon(1e-5) == epsilon_of([(1.0, 0.08, 20)], delta=1e-5, mechanism=mechanism)
    # δ just below 1/n is allowed; at 1/n the refusal names the setting and the bound
    assert delta_refusal(delta=0.0049, num_examples=200) is None
    assert delta_refusal(delta=0.01, num_examples=200) == (
        "refused: privacy.delta = 0.01 is not below 1/n = 0.005 for this client's 200 "
        "examples; a delta that large allows publishing an example outright: lower "
        "privacy.delta below 0.005"
    )
    refused = prepare_round(noise_multiplier=2.0, **{**kwargs, "delta": 0.01})
    assert refused.decision.allowed is False
    assert refused.decision.message == delta_refusal(delta=0.01, num_examples=100)


def test_a_ledger_extends_another_only_by_more_steps_at_its_end() -> None:
    from fedft.privacy.client_ledger import ClientLedger

    older = ClientLedger(((1.0, 0.1, 5), (2.0, 0.1, 1)))
    assert ClientLedger(((1.0, 0.1, 5), (2.0, 0.1, 3))).extends(older)
    assert ClientLedger(((1.0, 0.1, 5), (2.0, 0.1, 1), (3.0, 0.2, 4))).extends(older)
    assert older.extends(older) and older.extends(ClientLedger())
    # an earlier run rewritten (more or fewer steps), or the last one shortened: not an extension
    assert not ClientLedger(((1.0, 0.1, 6), (2.0, 0.1, 1))).extends(older)
    assert not ClientLedger(((1.0, 0.1, 4), (2.0, 0.1, 2))).extends(older)
    assert not ClientLedger(((1.0, 0.1, 5),)).extends(older)
    assert not ClientLedger(((1.0, 0.2, 5), (2.0, 0.1, 1))).extends(older)
    # the file a node keeps: canonical JSON (sorted keys)
    assert older.to_json() == '{"history": [[1.0, 0.1, 5], [2.0, 0.1, 1]], "version": 1}'


def test_what_a_client_may_send_and_a_budgeted_node_refuses() -> None:
    """Threat model S3/S5/U3 at the level of the functions the client calls."""
    from fedft.privacy.client import NodePolicy, node_refusal
    from fedft.privacy.release import (
        SAMPLE_LEVEL_PUBLIC,
        released_metrics,
        released_num_examples,
    )

    measured = {"train_loss": 0.7, "clip_fraction": 0.25, "epsilon": 1.5, "steps": 4.0}
    assert released_metrics(measured, mode="off") == measured
    assert released_metrics(measured, mode="sample") == {"epsilon": 1.5}
    assert SAMPLE_LEVEL_PUBLIC == frozenset({"epsilon"})
    assert released_metrics(measured, mode="user") == {}
    assert [released_num_examples(37, mode=m) for m in ("off", "sample", "user")] == [37, 37, 1]

    assert node_refusal(None, mode="off", delta=0.1, accountant="gdp") is None  # no own budget
    policy = NodePolicy(epsilon=3.0, delta=1e-5, accountant="prv")
    assert node_refusal(policy, mode="sample", delta=1e-5, accountant="prv") is None
    assert node_refusal(policy, mode="user", delta=1e-5, accountant="prv") == (
        "refused: this node trains only under sample-level DP (its own budget eps = 3); the run "
        "asks for privacy.mode = 'user'"
    )
    want = (
        "refused: this node accounts at delta = 1e-05 with the 'prv' accountant; the run asks "
        "for delta = {} with {!r}"
    )
    assert node_refusal(policy, mode="sample", delta=1e-4, accountant="prv") == want.format(
        "0.0001", "prv"
    )
    assert node_refusal(policy, mode="sample", delta=1e-5, accountant="rdp") == want.format(
        "1e-05", "rdp"
    )


def test_user_cohort_coins_at_the_edges_of_the_sampling_rate() -> None:
    from fedft.privacy.sampling import poisson_cohort

    clients = [9, 3, 5, 1]
    assert poisson_cohort(clients, sample_rate=1.0) == [1, 3, 5, 9]  # q = 1: all, sorted
    for q in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=rf"^sample_rate = {q!r}: a probability in \(0, 1\]$"):
            poisson_cohort(clients, sample_rate=q)
    # the coins come from the rng given (tests only): one coin per client, in order
    coins = random.Random(1)
    draws = [coins.random() for _ in clients]  # 0.13, 0.85, 0.76, 0.26
    want = sorted(c for c, u in zip(clients, draws) if u < 0.5)
    assert want == [1, 9]
    assert poisson_cohort(clients, sample_rate=0.5, rng=random.Random(1)) == want
    # without one, the OS's coins: not reproducible from any seed
    many = [tuple(poisson_cohort(range(40), sample_rate=0.5)) for _ in range(5)]
    assert len(set(many)) == 5
