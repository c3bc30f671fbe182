"""Secure aggregation carried over Flower records and run in real Flower rounds.

Fast part (no Ray): every SecAgg message survives the ConfigRecord serde, a client's state
survives ``context.state`` between stages, malformed records raise SecAggSerdeError, and
the server's result from the unmasked sum equals the plain aggregators (FedIT, NormBound
with client-side clipping, user-level CentralDP at sigma = 0) within the quantisation bound.

Simulation (5 clients, secure = true, min_replies = 3 -> t = 3, up to 2 dropouts):
round 1 clean; round 2 one client dies before its masked input and one after it (both
within the threshold: the sum is still exact over the 4 whose inputs arrived); round 3
three clients die after their masked input (above the threshold: clean abort, round failed,
model unchanged, as round 4's starts show bit for bit).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import RecordDict
from safetensors.torch import load_file
from test_faults_apps import fault_client_app, load_update, metrics_rows, run_sim, tiny_config

from client.secure_round import secure_vector
from fedft.aggregation import get_aggregator
from fedft.aggregation.robust import NormBound, flatten_trainables
from fedft.checkpoint import load_checkpoint
from fedft.privacy import CentralDP
from fedft.secagg import RoutedShares, SecAggClient, SecAggParams, SecAggServer, ShareCheck
from fedft.transport import secagg_serde as ss
from fedft.types import ClientUpdate, LoraFactors
from server.secure_round import aggregate_from_sum

FRAC_BITS = 24


def _wrap(rec: object) -> RecordDict:
    return RecordDict({ss.RECORD: rec})  # type: ignore[dict-item]


def _run_protocol(vectors: list[np.ndarray], *, max_dropouts: int, round_id: int = 7):  # type: ignore[no-untyped-def]
    """Every message through its ConfigRecord serde; client state through context records."""
    n, d = len(vectors), len(vectors[0])
    params = SecAggParams(
        num_clients=n, max_dropouts=max_dropouts, vector_length=d, round_id=round_id
    )
    server = SecAggServer(params)
    states = {}
    ads = []
    for i in range(1, n + 1):
        rec = ss.params_to_record(params, index=i)
        p2, idx, clip_delta, weighted = ss.params_from_record(_wrap(rec))
        assert p2 == params and idx == i and clip_delta == 0.0 and weighted
        c = SecAggClient(index=i, params=p2)
        ads.append(
            ss.advertise_from_record(
                _wrap(ss.advertise_to_record(c.advertise_keys())), num_clients=n
            )
        )
        states[i] = ss.client_state_to_record(c, vector=vectors[i - 1])
    directory = server.collect_keys(ads)
    drec = _wrap(ss.directory_to_record(directory, round_id=round_id))
    assert ss.directory_from_record(drec, num_clients=n) == directory
    assert ss.stage_of(drec) == "share" and ss.round_of(drec) == round_id
    shares = []
    for i in range(1, n + 1):
        c, v = ss.client_state_from_record(states[i])
        m = c.share_keys(ss.directory_from_record(drec, num_clients=n))
        back = ss.share_keys_from_record(_wrap(ss.share_keys_to_record(m)), num_clients=n)
        assert back == m
        shares.append(back)
        states[i] = ss.client_state_to_record(c, vector=v)
    routed = server.collect_shares(shares)
    checks = []
    for i in range(1, n + 1):
        c, v = ss.client_state_from_record(states[i])
        rrec = _wrap(ss.routed_to_record(routed[i], round_id=round_id))
        assert ss.stage_of(rrec) == "verify"
        r = ss.routed_from_record(rrec, num_clients=n)
        assert r == routed[i]
        m = c.check_shares(r)
        checks.append(ss.check_from_record(_wrap(ss.check_to_record(m)), num_clients=n))
        states[i] = ss.client_state_to_record(c, vector=v)
    qualified = server.collect_checks(checks)
    qrec = _wrap(ss.mask_request_to_record(qualified, round_id=round_id))
    assert ss.stage_of(qrec) == "masked"
    masked = []
    for i in range(1, n + 1):
        c, v = ss.client_state_from_record(states[i])
        m = c.masked_input(ss.mask_request_from_record(qrec, num_clients=n), v)
        masked.append(
            ss.masked_from_record(_wrap(ss.masked_to_record(m)), num_clients=n, vector_length=d)
        )
        states[i] = ss.client_state_to_record(c, vector=v)
    request = server.collect_masked(masked)
    req = ss.request_from_record(
        _wrap(ss.request_to_record(request, round_id=round_id)), num_clients=n
    )
    answers = []
    for i in request.survivors:
        c, _ = ss.client_state_from_record(states[i])
        answers.append(
            ss.unmask_from_record(_wrap(ss.unmask_to_record(c.unmask(req))), num_clients=n)
        )
    return params, server.collect_unmasking(answers), masked


def _updates(
    n: int, seed: int = 0
) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor], list[ClientUpdate]]:
    g = torch.Generator().manual_seed(seed)
    start = {
        m: LoraFactors(
            a=torch.randn(2, 6, generator=g), b=0.1 * torch.randn(5, 2, generator=g), scaling=2.0
        )
        for m in ("q", "v")
    }
    extras = {"head": torch.randn(2, 5, generator=g)}
    ups = []
    for k in range(n):
        scale = 5.0 if k == 0 else 0.05  # client 0 makes a big step (norm bound clips it)
        ups.append(
            ClientUpdate(
                client_id=str(k),
                adapters={
                    m: LoraFactors(
                        a=f.a + scale * torch.randn(f.a.shape, generator=g),
                        b=f.b + scale * torch.randn(f.b.shape, generator=g),
                        scaling=2.0,
                    )
                    for m, f in start.items()
                },
                num_examples=4 + 3 * k,
                extras={"head": extras["head"] + scale * torch.randn(2, 5, generator=g)},
            )
        )
    return start, extras, ups


def _flat_result(res, template_extras) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return flatten_trainables(
        ClientUpdate(client_id="r", adapters=res.adapters, num_examples=1, extras=res.extras), "ab"
    )


@pytest.mark.parametrize("wrapper", ["fedit", "norm_bound", "central_dp"])
def test_secure_result_equals_plain_aggregator(wrapper: str) -> None:
    start, extras, ups = _updates(5)
    template = ClientUpdate(client_id="t", adapters=start, num_examples=1, extras=extras)
    inner = get_aggregator("fedit")
    if wrapper == "fedit":
        agg, clip, weighted = inner, 0.0, True
    elif wrapper == "norm_bound":
        agg = NormBound(inner, bound=0.5)
        agg.set_reference(start, extras=extras)
        clip, weighted = 0.5, True
    else:
        agg = CentralDP(
            inner,
            clip_norm=0.5,
            noise_multiplier=0.0,
            expected_clients=5,
            num_clients=5,
            seed=0,
            delta=1e-5,
        )
        agg.set_reference(start, extras=extras)
        clip, weighted = 0.5, False
    vectors = [
        secure_vector(u, start=template, parts="ab", clip_delta=clip, weighted=weighted)
        for u in ups
    ]
    params, total, _ = _run_protocol(vectors, max_dropouts=2)
    secure = aggregate_from_sum(total, template=template, parts="ab", aggregator=agg)
    # the plain wrapper on the individual updates (a fresh copy for DP: it keeps state)
    if wrapper == "central_dp":
        plain_agg = CentralDP(
            get_aggregator("fedit"),
            clip_norm=0.5,
            noise_multiplier=0.0,
            expected_clients=5,
            num_clients=5,
            seed=0,
            delta=1e-5,
        )
        plain_agg.set_reference(start, extras=extras)
        plain = plain_agg.aggregate(ups)
        assert "epsilon_user" in secure.metrics
    else:
        plain = agg.aggregate(ups)
    diff = float((_flat_result(secure, extras) - _flat_result(plain, extras)).abs().max())
    total_w = sum(u.num_examples for u in ups) if weighted else 5
    bound = params.error_bound / total_w + 1e-6  # quantisation, then float32 storage
    assert diff <= bound, (diff, bound)
    if wrapper != "fedit":  # the clip mattered: without it the result differs a lot
        unclipped = get_aggregator("fedit").aggregate(ups)
        assert (
            float((_flat_result(unclipped, extras) - _flat_result(plain, extras)).abs().max()) > 0.1
        )


def test_masked_record_is_uncorrelated_with_the_vector() -> None:
    rng = np.random.default_rng(0)
    vectors = [rng.normal(size=4000) for _ in range(4)]
    params, total, masked = _run_protocol(vectors, max_dropouts=1)
    y = np.frombuffer(masked[0].masked, dtype="<u8").astype(np.float64)
    corr = float(np.corrcoef(y, vectors[0])[0, 1])
    assert abs(corr) < 0.06, corr  # 4000 samples: |corr| of independent data ~ 0.016
    assert np.abs(total.total - sum(vectors)).max() <= params.error_bound


def test_malformed_records_raise_typed_errors() -> None:
    params = SecAggParams(num_clients=4, max_dropouts=1, vector_length=3, round_id=1)
    good = ss.params_to_record(params, index=2)
    bad_cases = []
    for key, value in [
        ("version", 1),  # the layout before Feldman commitments
        ("num_clients", 1),
        ("max_dropouts", 2),  # t = 2 is not > n / 2
        ("index", 5),
        ("clip", float("nan")),
        ("weighted", 1),
        ("vector_length", 0),
        ("stage", "nope"),
    ]:
        rec = ss.params_to_record(params, index=2)
        rec[key] = value
        bad_cases.append(rec)
    for rec in bad_cases:
        with pytest.raises(ss.SecAggSerdeError):
            ss.params_from_record(_wrap(rec))
            ss.stage_of(_wrap(rec))
    assert ss.params_from_record(_wrap(good))[1] == 2
    c = SecAggClient(index=1, params=params)
    ad = ss.advertise_to_record(c.advertise_keys())
    ad["enc_public"] = b"short"
    with pytest.raises(ss.SecAggSerdeError):
        ss.advertise_from_record(_wrap(ad), num_clients=4)
    m = ss.masked_to_record(
        __import__("fedft.secagg", fromlist=["MaskedInput"]).MaskedInput(1, b"\0" * 16)
    )
    with pytest.raises(ss.SecAggSerdeError):  # 16 bytes, D = 3 needs 24
        ss.masked_from_record(_wrap(m), num_clients=4, vector_length=3)
    r = ss.request_to_record(
        __import__("fedft.secagg", fromlist=["UnmaskRequest"]).UnmaskRequest((1, 1, 2)), round_id=1
    )
    with pytest.raises(ss.SecAggSerdeError):
        ss.request_from_record(_wrap(r), num_clients=4)
    ad = ss.advertise_to_record(SecAggClient(index=2, params=params).advertise_keys())
    ad["recv_public"] = [b"\0" * 32] * 2  # 3 ids, 2 keys
    with pytest.raises(ss.SecAggSerdeError):
        ss.advertise_from_record(_wrap(ad), num_clients=4)
    chk = ss.check_to_record(ShareCheck(index=1, complaints={2: b"k" * 31}))
    with pytest.raises(ss.SecAggSerdeError):  # a revealed key is 32 bytes
        ss.check_from_record(_wrap(chk), num_clients=4)
    routed = ss.routed_to_record(
        RoutedShares(ciphertexts={2: b"x"}, commitments={2: ((b"\1" * 256,), (b"\1" * 255,))}),
        round_id=1,
    )
    with pytest.raises(ss.SecAggSerdeError):  # a commitment is 256 bytes
        ss.routed_from_record(_wrap(routed), num_clients=4)


# --- through Flower ---------------------------------------------------------------------


def _vector(cap: Path, rnd: int, idx: int) -> np.ndarray:
    return load_file(str(cap / f"vector-{rnd}-{idx}.st"))["vector"].numpy()


def test_secure_rounds_through_flower(tiny_bert_dir: str, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_bert_dir,
        **{
            "federation.num_clients": 5,
            "federation.clients_per_round": 5,
            "federation.rounds": 4,
            "federation.min_replies": 3,
            "federation.round_timeout_s": 60.0,
            "aggregation.secure": "true",
        },
    )
    plan = {"2:1": "die:masked", "2:3": "die:unmask"}
    plan |= {f"3:{i}": "die:unmask" for i in (0, 2, 4)}
    cap = tmp_path / "cap"
    cap.mkdir()
    out = tmp_path / "run"
    summary = run_sim(cfg, out, fault_client_app(cfg, plan=plan, capture_dir=str(cap)))
    rows = {r["round"]: r for r in metrics_rows(out)}
    assert rows[1]["clients"] == 5 and rows[2]["clients"] == 4
    assert rows[3]["failed"] is True and summary["failed_rounds"] == 1
    assert rows[4]["clients"] == 5 and not rows[4].get("failed")

    def start(rnd: int) -> torch.Tensor:
        s = load_update(cap / f"start-{rnd}-0.safetensors", "s")
        return flatten_trainables(s, "ab")

    def plain_mean(rnd: int, included: list[int]) -> tuple[torch.Tensor, float]:
        vs = [_vector(cap, rnd, i) for i in included]
        tot = np.sum(vs, axis=0)
        return torch.from_numpy(tot[:-1] / tot[-1]), float(tot[-1])

    for rnd, included, nxt in ((1, [0, 1, 2, 3, 4], 2), (2, [0, 2, 3, 4], 3)):
        mean, weight = plain_mean(rnd, included)
        got = start(nxt)  # the global the server sent after round rnd
        bound = len(included) * 2.0 ** (-FRAC_BITS - 1) / weight + 1e-6
        diff = float((got - mean).abs().max())
        assert diff <= bound, (rnd, diff, bound)
    # the dropped-before-masking client 1 of round 2 is really not in the sum
    with_1, _ = plain_mean(2, [0, 1, 2, 3, 4])
    assert float((start(3) - with_1).abs().max()) > 1e-4
    # round 3 aborted: round 4 starts from exactly the global of round 2
    for idx in range(5):
        a = load_update(cap / f"start-3-{idx}.safetensors", "a")
        b = load_update(cap / f"start-4-{idx}.safetensors", "b")
        assert torch.equal(flatten_trainables(a, "ab"), flatten_trainables(b, "ab"))
    state = load_checkpoint(out / "checkpoint")
    assert state["round"] == 4
    mean4, w4 = plain_mean(4, list(range(5)))
    ck = state["coordinator"]
    final = ClientUpdate(
        client_id="f",
        adapters={
            m: LoraFactors(a=e["a"], b=e["b"], scaling=float(e["scaling"]))
            for m, e in ck["global_adapters"].items()
        },
        num_examples=1,
        extras=ck["extras"],
    )
    assert float((flatten_trainables(final, "ab") - mean4).abs().max()) <= 5 * 2.0**-25 / w4 + 1e-6
    # what the server saw of client 0 in round 1 is uncorrelated with its vector
    y = np.frombuffer((cap / "masked-1-0.bin").read_bytes(), dtype="<u8").astype(np.float64)
    x = _vector(cap, 1, 0)
    assert abs(float(np.corrcoef(y, x)[0, 1])) < 0.25
