"""Secure aggregation: exact sums, dropouts, aborts, mask quality, tampering."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import re
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedft.aggregation import get_aggregator
from fedft.secagg import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskRequest,
    RoutedShares,
    SecAggAbort,
    SecAggClient,
    SecAggParams,
    SecAggProtocolError,
    SecAggResult,
    SecAggServer,
    ShareCheck,
    UnmaskRequest,
    UnmaskShares,
    feldman,
    masking,
    shamir,
)
from fedft.secagg.bounds import sum_problems
from fedft.secagg.encoding import decode_aggregate, encode_update, vector_length
from fedft.secagg.masking import DOMAIN, dequantize, expand_mask, quantize
from fedft.types import ClientUpdate, LoraFactors

N = 10
D = 10_000


def _params(*, n: int = N, max_dropouts: int = 4, d: int = D, round_id: int = 3) -> SecAggParams:
    return SecAggParams(
        num_clients=n, max_dropouts=max_dropouts, vector_length=d, round_id=round_id
    )


def _vectors(n: int, d: int, seed: int = 0, scale: float = 3.0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: scale * rng.standard_normal(d) for i in range(1, n + 1)}


def run_round(
    params: SecAggParams,
    vectors: dict[int, np.ndarray],
    *,
    drop_before_shares: tuple[int, ...] = (),
    drop_before_masked: tuple[int, ...] = (),
    drop_before_unmask: tuple[int, ...] = (),
    tamper_unmask: tuple[int, ...] = (),
    server: SecAggServer | None = None,
) -> SecAggResult:
    """Run all five steps; clients in drop_* vanish before that step (drop_before_masked:
    after the share check, so they are in U2' and their keys must be rebuilt)."""
    clients = {i: SecAggClient(index=i, params=params) for i in vectors}
    server = server or SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    alive = [i for i in clients if i not in drop_before_shares]
    routed = server.collect_shares([clients[i].share_keys(directory) for i in alive])
    qualified = _qualify(server, clients, routed, alive)
    alive = [i for i in alive if i not in drop_before_masked]
    request = server.collect_masked([clients[i].masked_input(qualified, vectors[i]) for i in alive])
    alive = [i for i in alive if i not in drop_before_unmask]
    responses = [clients[i].unmask(request) for i in alive]
    responses = [_tamper(r) if r.index in tamper_unmask else r for r in responses]
    return server.collect_unmasking(responses)


def _qualify(
    server: SecAggServer,
    clients: dict[int, SecAggClient],
    routed: dict[int, RoutedShares],
    ids: Iterable[int],
) -> MaskRequest:
    """The share-check step: every client in ``ids`` checks its shares, the server
    resolves the complaints and returns U2'."""
    return server.collect_checks([clients[i].check_shares(routed[i]) for i in ids])


def _tamper(r: UnmaskShares) -> UnmaskShares:
    """Add one to every share value a client sends (still in the field)."""

    def bump(shares: dict[int, bytes]) -> dict[int, bytes]:
        return {
            u: shamir.encode_share((shamir.decode_share(s) + 1) % shamir.PRIME)
            for u, s in shares.items()
        }

    return UnmaskShares(
        index=r.index, seed_shares=bump(dict(r.seed_shares)), key_shares=bump(dict(r.key_shares))
    )


def test_unmasked_sum_equals_plain_sum_within_quantisation_bound() -> None:
    params = _params()
    vectors = _vectors(N, D)
    result = run_round(params, vectors)
    plain = np.sum(list(vectors.values()), axis=0)
    err = np.abs(result.total - plain).max()
    assert result.included == tuple(range(1, N + 1))
    assert err <= params.error_bound
    assert params.error_bound == N * 2.0 ** (-params.frac_bits - 1)
    # The ring sum of the encodings is exact: re-encoding each vector and summing matches.
    enc = [quantize(v, frac_bits=params.frac_bits, clip=params.clip)[0] for v in vectors.values()]
    ring = np.zeros(D, dtype=np.uint64)
    for e in enc:
        ring = ring + e
    np.testing.assert_array_equal(dequantize(ring, frac_bits=params.frac_bits), result.total)


@pytest.mark.parametrize("k", [1, 4])
def test_dropouts_before_masked_input_give_exact_sum_over_survivors(k: int) -> None:
    params = _params(max_dropouts=4)
    vectors = _vectors(N, D, seed=k)
    dropped = tuple(range(2, 2 + k))
    result = run_round(params, vectors, drop_before_masked=dropped)
    assert result.dropped == dropped
    assert set(result.included) == set(vectors) - set(dropped)
    survivors_sum = np.sum([vectors[i] for i in result.included], axis=0)
    assert np.abs(result.total - survivors_sum).max() <= params.error_bound


def test_dropouts_at_every_step_within_budget() -> None:
    params = _params(max_dropouts=4)  # t = 6
    vectors = _vectors(N, D, seed=7)
    result = run_round(
        params,
        vectors,
        drop_before_shares=(10,),
        drop_before_masked=(3,),
        drop_before_unmask=(5, 6),  # their masked inputs arrived: still in the sum
    )
    assert set(result.included) == set(range(1, 10)) - {3}
    expected = np.sum([vectors[i] for i in result.included], axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound


def test_too_many_dropouts_abort_cleanly() -> None:
    params = _params(max_dropouts=4)
    vectors = _vectors(N, 64)
    params = dataclasses.replace(params, vector_length=64)
    with pytest.raises(SecAggAbort, match="threshold t=6"):
        run_round(params, vectors, drop_before_masked=(1, 2, 3, 4, 5))
    with pytest.raises(SecAggAbort, match="unmasking"):
        run_round(params, vectors, drop_before_masked=(1, 2), drop_before_unmask=(3, 4, 5))
    with pytest.raises(SecAggAbort):
        run_round(params, vectors, drop_before_shares=(1, 2, 3, 4, 5))


def test_client_refuses_short_survivor_list_and_second_unmask_request() -> None:
    params = _params(n=5, max_dropouts=2, d=16)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 6)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    qualified = _qualify(server, clients, routed, clients)
    for c in clients.values():
        c.masked_input(qualified, np.ones(16))
    with pytest.raises(SecAggAbort):  # t = 3: a server claiming 2 survivors is refused
        clients[1].unmask(UnmaskRequest(survivors=(1, 2)))
    clients[2].unmask(UnmaskRequest(survivors=(1, 2, 3, 4)))
    with pytest.raises(SecAggProtocolError, match="out of order"):
        # a second request would hand out the key share of 5 AND (earlier) its seed share
        clients[2].unmask(UnmaskRequest(survivors=(1, 2, 3, 4, 5)))


def test_unmask_reveals_seed_shares_of_survivors_and_key_shares_of_dropped_only() -> None:
    """Never both secrets of one client: b_u shares only for u in U3, s_u shares only for
    u in U2 minus U3, and nothing for a client that never shared keys (U1 minus U2).

    A client that also sent key shares of survivors would let the server rebuild a
    survivor's pairwise masks and, with its seed, read that survivor's input in clear; the
    sum stays right, so only this test sees it.
    """
    params = _params(n=8, max_dropouts=3, d=16)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 9)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    u2 = [1, 2, 3, 4, 5, 6, 7]  # client 8 vanishes before sharing keys
    routed = server.collect_shares([clients[i].share_keys(directory) for i in u2])
    qualified = _qualify(server, clients, routed, u2)
    u3 = [1, 2, 3, 4, 5]  # 6 and 7 vanish before sending masked input
    request = server.collect_masked([clients[i].masked_input(qualified, np.ones(16)) for i in u3])
    assert set(request.survivors) == set(u3)
    for i in u3:
        reply = clients[i].unmask(request)
        assert set(reply.seed_shares) == set(u3)
        assert set(reply.key_shares) == {6, 7}
        assert not set(reply.seed_shares) & set(reply.key_shares)
        assert 8 not in set(reply.seed_shares) | set(reply.key_shares)


def test_masked_vector_is_uncorrelated_with_the_input() -> None:
    params = _params(n=5, max_dropouts=2, d=D)
    rs = []
    for trial in range(5):
        clients = {i: SecAggClient(index=i, params=params) for i in range(1, 6)}
        server = SecAggServer(params)
        directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
        routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
        qualified = _qualify(server, clients, routed, clients)
        x = np.random.default_rng(trial).uniform(-100, 100, D)  # strong signal
        y = clients[1].masked_input(qualified, x)
        seen = np.frombuffer(y.masked, dtype="<u8").view(np.int64).astype(np.float64)
        rs.append(np.corrcoef(seen, x)[0, 1])
        # The server's view is uniform over the ring: mean near 0 for signed reading.
        assert abs(seen.mean()) / 2.0**63 < 0.05
        # Control: the unmasked encoding is perfectly correlated with x.
        plain = dequantize(quantize(x, frac_bits=24, clip=2.0**20)[0], frac_bits=24)
        assert np.corrcoef(plain, x)[0, 1] > 0.999
    # With D = 10k independent coordinates, |r| of independent data is ~N(0, 0.01).
    assert max(abs(r) for r in rs) < 0.05


def test_masks_are_chacha20_keystream_not_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    seed, context = bytes(range(32)), b"ctx"
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DOMAIN + context).derive(seed)
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(800))
    mask = expand_mask(seed, length=100, context=context)
    np.testing.assert_array_equal(mask, np.frombuffer(stream, dtype="<u8"))
    assert not np.array_equal(mask, expand_mask(seed, length=100, context=b"other"))

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("numpy RNG used for masks")

    for name in ("default_rng", "RandomState", "seed", "randint", "bytes", "random"):
        monkeypatch.setattr(np.random, name, forbidden)
    vectors = {i: np.full(256, float(i)) for i in range(1, 6)}
    result = run_round(_params(n=5, max_dropouts=2, d=256), vectors)
    np.testing.assert_allclose(result.total, np.full(256, 15.0), atol=1e-6)


def test_tampered_ciphertext_is_detected() -> None:
    params = _params(n=5, max_dropouts=2, d=16)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 6)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    blob = bytearray(routed[1].ciphertexts[2])
    blob[-1] ^= 1
    forged = RoutedShares(
        ciphertexts={**routed[1].ciphertexts, 2: bytes(blob)}, commitments=routed[1].commitments
    )
    assert set(clients[1].check_shares(forged).complaints) == {2}  # fails authentication
    # A share re-addressed from another sender fails too (AEAD binds sender and receiver).
    swapped = RoutedShares(
        ciphertexts={**routed[3].ciphertexts, 2: routed[3].ciphertexts[4]},
        commitments=routed[3].commitments,
    )
    assert set(clients[3].check_shares(swapped).complaints) == {2}
    # untouched shares raise no complaint
    assert clients[2].check_shares(routed[2]).complaints == {}


def test_wrong_shares_are_skipped_with_surplus_and_abort_without(
    caplog: pytest.LogCaptureFixture,
) -> None:
    params = _params(max_dropouts=4, d=128)  # t = 6
    vectors = _vectors(N, 128, seed=3)
    # 9 responses, 1 dishonest: its shares fail the commitments; the sum is exact.
    result = run_round(params, vectors, drop_before_masked=(10,), tamper_unmask=(2,))
    expected = np.sum([vectors[i] for i in result.included], axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert result.suspects == (2,)
    # Exactly t responses, one of them wrong: t - 1 verified shares -> clean abort, liar named.
    caplog.clear()  # only what the aborted round logs
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        with pytest.raises(SecAggAbort, match="match the dealer's commitments") as info:
            run_round(
                params,
                vectors,
                drop_before_masked=(10,),
                drop_before_unmask=(7, 8, 9),
                tamper_unmask=(2,),
            )
    assert info.value.suspects == (2,)
    assert (
        f"secagg round {params.round_id}: client 2 revealed a share of 1 that fails the "
        "commitments" in caplog.messages
    )


def test_server_ignores_malformed_and_duplicate_messages() -> None:
    params = _params(n=5, max_dropouts=2, d=32)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 6)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    qualified = _qualify(server, clients, routed, clients)
    vectors = {i: np.full(32, 0.5 * i) for i in clients}
    msgs = [clients[i].masked_input(qualified, vectors[i]) for i in clients]
    replay = MaskedInput(index=1, masked=msgs[1].masked)  # second message claiming index 1
    short = MaskedInput(index=6, masked=b"\0" * 8)  # not in the cohort, wrong size
    request = server.collect_masked([*msgs, replay, short])
    assert request.survivors == (1, 2, 3, 4, 5)
    result = server.collect_unmasking([clients[i].unmask(request) for i in clients])
    np.testing.assert_allclose(result.total, np.full(32, 7.5), atol=params.error_bound)


def test_shamir_threshold() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=4, indices=range(1, 8))
    for subset in ([1, 2, 3, 4], [7, 5, 3, 1], [2, 4, 6, 7]):
        assert shamir.reconstruct({i: shares[i] for i in subset}) == secret
    # Three shares are consistent with every secret: interpolation does not give ours.
    with pytest.raises(shamir.ShareError):
        shamir.reconstruct({i: shares[i] for i in (1, 2, 3)})


def test_params_are_validated() -> None:
    with pytest.raises(ValueError, match="max_dropouts"):
        SecAggParams(num_clients=10, max_dropouts=5, vector_length=4, round_id=0)
    with pytest.raises(ValueError, match="overflows"):
        SecAggParams(num_clients=4096, max_dropouts=1, vector_length=4, round_id=0, clip=2.0**28)
    with pytest.raises(ValueError, match=r"2\^53"):
        SecAggParams(num_clients=10, max_dropouts=1, vector_length=4, round_id=0, clip=2.0**30)


@pytest.mark.parametrize("name", ["fedit", "ffa"])
def test_secure_weighted_mean_matches_inner_aggregator(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    inner = get_aggregator(name)
    shapes = {"q": (6, 5), "v": (4, 5)}
    start = inner.init_global(shapes, rank=2, scaling=2.0, generator=gen)
    head = torch.zeros(3, 4)
    updates = []
    for k in range(1, 6):
        adapters = {
            m: LoraFactors(
                a=f.a if name == "ffa" else f.a + 0.1 * torch.randn(f.a.shape, generator=gen),
                b=f.b + 0.1 * torch.randn(f.b.shape, generator=gen),
                scaling=f.scaling,
            )
            for m, f in start.items()
        }
        extras = {"head": head + torch.randn(3, 4, generator=gen)}
        updates.append(ClientUpdate(f"c{k}", adapters, num_examples=10 * k, extras=extras))
    parts = inner.trainable
    template = ClientUpdate("global", start, 1, extras={"head": head})
    params = _params(n=5, max_dropouts=2, d=vector_length(template, parts=parts))
    vectors = {k: encode_update(u, parts=parts) for k, u in enumerate(updates, start=1)}
    result = run_round(params, vectors, drop_before_masked=(4,))
    secure = decode_aggregate(result, template=template, parts=parts, inner=inner)
    survivors = [u for k, u in enumerate(updates, start=1) if k != 4]
    plain = get_aggregator(name).aggregate(survivors)
    assert secure.metrics["total_weight"] == sum(u.num_examples for u in survivors)
    for m in shapes:
        torch.testing.assert_close(secure.adapters[m].a, plain.adapters[m].a, atol=1e-5, rtol=0)
        torch.testing.assert_close(secure.adapters[m].b, plain.adapters[m].b, atol=1e-5, rtol=0)
    torch.testing.assert_close(secure.extras["head"], plain.extras["head"], atol=1e-5, rtol=0)


# --- one hostile client against the unmasking (issue 14, item 3) -------------------------


def test_lying_share_holder_is_named_and_the_round_completes() -> None:
    """Attack: n = 20, t = 11, every client answers the unmasking; client 1 sends a wrong
    value for every share it reveals. Each of its shares fails the dealer's Feldman
    commitments: client 1 is convicted and the sum, rebuilt from the other shares, exact."""
    params = _params(n=20, max_dropouts=9, d=64)
    vectors = _vectors(20, 64, seed=5)
    result = run_round(params, vectors, tamper_unmask=(1,))
    expected = np.sum([vectors[i] for i in result.included], axis=0)
    assert result.included == tuple(range(1, 21))
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert result.suspects == (1,)


def _bad_deal(victims: set[int]):  # type: ignore[no-untyped-def]
    real = shamir.deal

    def deal(secret: bytes, *, threshold: int, indices: list[int]):  # type: ignore[no-untyped-def]
        shares, commitments = real(secret, threshold=threshold, indices=indices)
        return {
            i: (v + 0x5EED_0000_0001 * i) % shamir.PRIME if i in victims else v
            for i, v in shares.items()
        }, commitments

    return deal


def _routed_with_bad_dealer(
    params: SecAggParams,
    clients: dict[int, SecAggClient],
    monkeypatch: pytest.MonkeyPatch,
    victims: set[int],
) -> tuple[SecAggServer, dict[int, RoutedShares]]:
    """Keys collected and shares routed, client 3 dealing ``victims`` shares off its
    committed polynomial: (the server, each holder's routed shares)."""
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    shares = []
    for i, c in clients.items():
        with monkeypatch.context() as m:
            if i == 3:
                m.setattr(shamir, "deal", _bad_deal(victims))
            shares.append(c.share_keys(directory))
    return server, server.collect_shares(shares)


@pytest.mark.parametrize("victims", [{5, 6}, set(range(4, 21))])
def test_bad_dealer_is_convicted_before_masking(
    monkeypatch: pytest.MonkeyPatch, victims: set[int]
) -> None:
    """Attack: client 3 deals shares off its committed polynomial, to two holders or to
    every other holder but 1 and 2 (then too few right shares of its seed exist: before
    Feldman commitments the round aborted naming no one). The victims complain at the
    share check, the server convicts client 3 from the revealed keys, and the round
    completes without it."""
    params = _params(n=20, max_dropouts=9, d=64)
    vectors = _vectors(20, 64, seed=6)
    clients = {i: SecAggClient(index=i, params=params) for i in vectors}
    server, routed = _routed_with_bad_dealer(params, clients, monkeypatch, victims)
    checks = [c.check_shares(routed[i]) for i, c in clients.items()]
    assert {m.index for m in checks if m.complaints} == victims
    assert all(set(m.complaints) == {3} for m in checks if m.complaints)
    qualified = server.collect_checks(checks)
    assert qualified.qualified == tuple(i for i in range(1, 21) if i != 3)
    request = server.collect_masked(
        [clients[i].masked_input(qualified, vectors[i]) for i in qualified.qualified]
    )
    result = server.collect_unmasking([clients[i].unmask(request) for i in request.survivors])
    expected = np.sum([vectors[i] for i in result.included], axis=0)
    assert 3 not in result.included and len(result.included) == 19
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert result.suspects == (3,)


def test_false_complaint_convicts_the_complainer() -> None:
    """Attack: client 2 complains about honest dealers 1 and 4 (revealing its real
    receiving keys), and client 5 about dealer 1 with a key it never advertised. The
    shares decrypt and verify: both complainers are convicted, the dealers stay."""
    params = _params(n=8, max_dropouts=3, d=16)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 9)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    checks = {i: c.check_shares(routed[i]) for i, c in clients.items()}
    real = clients[2].export_state().recv_private
    checks[2] = ShareCheck(index=2, complaints={1: real[1], 4: real[4]})
    checks[5] = ShareCheck(index=5, complaints={1: bytes(range(32))})
    qualified = server.collect_checks(list(checks.values()))
    assert qualified.qualified == (1, 3, 4, 6, 7, 8)
    assert server.convicted == {2, 5}


def test_feldman_commitments_bind_the_shares() -> None:
    import secrets as pysecrets

    from fedft.secagg import feldman

    secret = pysecrets.token_bytes(32)
    shares, blobs = shamir.deal(secret, threshold=4, indices=list(range(1, 8)))
    commitments = feldman.decode(blobs, threshold=4)
    assert all(feldman.verify(commitments, i, y) for i, y in shares.items())
    assert not feldman.verify(commitments, 3, (shares[3] + 1) % shamir.PRIME)
    assert not feldman.verify(commitments, 3, shares[4])  # another holder's share
    # -C_j (outside the order-q subgroup) checks the same on squares: no verifier disagrees
    negated = [feldman.P - c if j == 1 else c for j, c in enumerate(commitments)]
    assert feldman.verify(negated, 5, shares[5]) == feldman.verify(commitments, 5, shares[5])
    items = [(commitments, i, y) for i, y in shares.items()]
    assert feldman.batch_verify(items)
    bad = [*items[:-1], (commitments, 7, (shares[7] + 5) % shamir.PRIME)]
    assert not feldman.batch_verify(bad)
    forged = {i: (y + 9) % shamir.PRIME if i in (2, 6) else y for i, y in shares.items()}
    got, wrong = shamir.reconstruct_checked(
        forged, threshold=4, commitments=commitments, verify=lambda s: s == secret
    )
    assert got == secret and wrong == {2, 6}
    with pytest.raises(shamir.ShareError, match="only 3 of 4"):
        shamir.reconstruct_checked(
            {i: forged[i] for i in (1, 2, 3, 4)},
            threshold=4,
            commitments=commitments,
            verify=lambda s: s == secret,
        )
    with pytest.raises(shamir.DealerError):  # verified shares, but not the committed secret
        shamir.reconstruct_checked(
            shares, threshold=4, commitments=commitments, verify=lambda s: False
        )
    with pytest.raises(feldman.CommitmentError, match="expected 4"):
        feldman.decode(blobs[:3], threshold=4)
    with pytest.raises(feldman.CommitmentError, match="not an element"):
        feldman.decode([bytes(256), *blobs[1:]], threshold=4)


def _count_gpow(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the exponentiations of g (the cost of a Feldman check) from now on."""
    from fedft.secagg import feldman

    calls = [0]
    real = feldman._gpow

    def counted(exponent: int):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(exponent)

    monkeypatch.setattr(feldman, "_gpow", counted)
    return calls


@pytest.mark.parametrize(
    "wrong", [set(), {17}, {0, 63}, {5, 6, 7}, set(range(0, 64, 8)), set(range(64))]
)
def test_a_failed_batch_is_bisected_to_exactly_the_wrong_shares(
    monkeypatch: pytest.MonkeyPatch, wrong: set[int]
) -> None:
    """``feldman.failing`` names exactly the shares :func:`feldman.verify` refuses, with one
    exponentiation of g when all pass and at most 2 log2(m) more per wrong share (m = 64:
    13 for one wrong share instead of 64)."""
    import secrets as pysecrets

    from fedft.secagg import feldman

    shares, blobs = shamir.deal(pysecrets.token_bytes(32), threshold=5, indices=range(1, 65))
    commitments = feldman.decode(blobs, threshold=5)
    items = [
        (commitments, i, (y + 3) % shamir.PRIME if i - 1 in wrong else y)
        for i, y in sorted(shares.items())
    ]
    items[9] = (commitments, 10, shamir.PRIME + 1) if 9 in wrong else items[9]  # out of range
    calls = _count_gpow(monkeypatch)
    assert feldman.failing(items) == wrong
    assert calls[0] <= 1 + 2 * 6 * len(wrong)  # each wrong share: <= 2 checks per level
    assert {k for k, it in enumerate(items) if not feldman.verify(*it)} == wrong
    assert feldman.batch_verify(items) is not wrong


def test_a_lying_holder_costs_one_search_not_one_per_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """n = 20, client 1 lies about every share it reveals (20 seeds). Before, each of the
    20 secrets checked all 20 of its shares one by one (400 exponentiations of g); now the
    first secret's failed batch is bisected to client 1, who is convicted, and the others
    are rebuilt from the shares of the unconvicted without a Feldman check."""
    params = _params(n=20, max_dropouts=9, d=64)
    vectors = _vectors(20, 64, seed=5)
    clients, server, request = _through_masking(params, vectors, vectors)
    answers = [clients[i].unmask(request) for i in request.survivors]
    calls = _count_gpow(monkeypatch)
    result = server.collect_unmasking([_tamper(a) if a.index == 1 else a for a in answers])
    assert result.suspects == (1,) and result.included == tuple(range(1, 21))
    expected = np.sum([vectors[i] for i in result.included], axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert calls[0] <= 1 + 2 * 5  # one search among 20 shares


def test_a_bad_dealer_costs_each_holder_one_search_and_the_server_one_resolution(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """n = 20, client 3 deals every holder shares off its polynomial. Before, each of the
    19 holders checked its 38 shares one by one after its batch failed, and the server
    resolved all 19 complaints; now each holder bisects to dealer 3 (<= 1 + 2 * 6 checks) and
    the server resolves one complaint, skipping those against a dealer already convicted."""
    params = _params(n=20, max_dropouts=9, d=64)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 21)}
    server, routed = _routed_with_bad_dealer(params, clients, monkeypatch, set(range(1, 21)))
    calls = _count_gpow(monkeypatch)
    checks = []
    for i, c in clients.items():
        before = calls[0]
        checks.append(c.check_shares(routed[i]))
        assert calls[0] - before <= 1 + 2 * 6, i  # 38 shares: one batch, one bisection
    assert all(set(m.complaints) == {3} for m in checks if m.index != 3)
    before = calls[0]
    qualified = server.collect_checks(checks)
    assert qualified.qualified == tuple(i for i in range(1, 21) if i != 3)
    assert server.convicted == {3}
    assert calls[0] - before <= 1 + 1  # one complaint resolved (2 shares)


def test_the_group_is_a_safe_prime_subgroup() -> None:
    """p = 2q + 1 with p and q prime, g of order q; shares live in Z_q."""
    import sympy

    from fedft.secagg import feldman

    assert feldman.P.bit_length() == 2048 and feldman.P == 2 * feldman.Q + 1
    assert sympy.isprime(feldman.P) and sympy.isprime(feldman.Q)
    assert pow(feldman.G, feldman.Q, feldman.P) == 1 and feldman.G != 1
    assert shamir.PRIME == feldman.Q and (1 << 256) < shamir.PRIME
    # the fixed-base table gives the same powers as plain modular exponentiation
    for x in (0, 1, 15, 16, 2**300 + 12345, feldman.Q - 1, int.from_bytes(bytes(range(32)))):
        assert feldman.commit([x]) == (feldman.encode(pow(feldman.G, x, feldman.P)),)


def test_a_client_exported_and_restored_at_every_step_gives_the_same_sum() -> None:
    """export_state/from_state carry everything (keys, seed, U2, directory, held shares):
    a round whose clients are rebuilt from their state before every step is exact."""
    params = _params(n=6, max_dropouts=2, d=64)
    vectors = _vectors(6, 64, seed=3)
    clients = {i: SecAggClient(index=i, params=params) for i in vectors}

    def moved(i: int) -> SecAggClient:
        state = clients[i].export_state()
        assert state.index == i and state.params == params
        clients[i] = SecAggClient.from_state(state)
        return clients[i]

    server = SecAggServer(params)
    directory = server.collect_keys([moved(i).advertise_keys() for i in vectors])
    routed = server.collect_shares([moved(i).share_keys(directory) for i in vectors])
    qualified = server.collect_checks([moved(i).check_shares(routed[i]) for i in vectors])
    alive = [i for i in vectors if i != 6]  # 6 drops before sending its masked input
    request = server.collect_masked([moved(i).masked_input(qualified, vectors[i]) for i in alive])
    result = server.collect_unmasking([moved(i).unmask(request) for i in alive])
    plain = sum(vectors[i] for i in alive)
    assert np.max(np.abs(result.total - plain)) <= params.error_bound
    assert set(result.dropped) == {6}
    with pytest.raises(SecAggProtocolError, match="out of order"):
        moved(1).unmask(request)  # the restored client remembers it already answered


def test_restoring_a_bad_state_is_refused() -> None:
    state = SecAggClient(index=1, params=_params(n=3, max_dropouts=1, d=4)).export_state()
    with pytest.raises(ValueError, match="step 6 outside"):
        SecAggClient.from_state(dataclasses.replace(state, step=6))
    with pytest.raises(
        ValueError, match="^client state lacks a receiving key for some cohort index$"
    ):
        SecAggClient.from_state(dataclasses.replace(state, recv_private={}))
    with pytest.raises(ValueError, match="seed has 3 bytes"):
        SecAggClient.from_state(dataclasses.replace(state, seed=b"abc"))


def test_server_steps_out_of_order_are_refused_by_name() -> None:
    server = SecAggServer(_params(n=3, max_dropouts=1, d=4))
    with pytest.raises(SecAggProtocolError, match="server: collect_unmasking called out of"):
        server.collect_unmasking([])
    with pytest.raises(SecAggProtocolError, match="server: collect_masked called out of order"):
        server.collect_masked([])
    with pytest.raises(SecAggProtocolError, match="server: collect_checks called out of order"):
        server.collect_checks([])


def test_server_key_and_share_steps_out_of_order_are_refused_by_name() -> None:
    server = SecAggServer(_params(n=3, max_dropouts=1, d=4))
    with pytest.raises(
        SecAggProtocolError, match=r"^server: collect_shares called out of order \(step 0\)$"
    ):
        server.collect_shares([])
    clients = [SecAggClient(index=i, params=server.params) for i in (1, 2, 3)]
    server.collect_keys([c.advertise_keys() for c in clients])
    with pytest.raises(
        SecAggProtocolError, match=r"^server: collect_keys called out of order \(step 1\)$"
    ):
        server.collect_keys([])


def test_shamir_field_bounds_and_secret_size() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=2, indices=[1, 2, 3])
    assert shamir.reconstruct({1: shares[1], 3: shares[3]}) == secret  # big-endian bytes
    with pytest.raises(shamir.ShareError, match="^no shares to reconstruct from$"):
        shamir.reconstruct({})
    with pytest.raises(shamir.ShareError, match="index 1 is outside the field"):
        shamir.reconstruct({1: shamir.PRIME, 2: shares[2]})
    # y = 0 is a field element: a constant polynomial f = 0 has share 0 everywhere
    assert shamir.reconstruct({1: 0, 2: 0}) == bytes(32)
    # a value of 2^256 or more is not a 32-byte secret (a wrong share, or too few)
    with pytest.raises(
        shamir.ShareError,
        match=r"^reconstructed value is not a 32-byte secret \(wrong or missing shares\)$",
    ):
        shamir.reconstruct({1: 1 << 256})
    with pytest.raises(shamir.ShareError, match="need 2 shares, got 1"):
        shamir.reconstruct_checked(
            {1: shares[1]}, threshold=2, commitments=[1, 1], verify=lambda s: True
        )


def test_unweighted_encoding_sends_weight_one() -> None:
    u = ClientUpdate(
        "c", {"m": LoraFactors(a=torch.ones(1, 2), b=torch.ones(2, 1), scaling=1.0)}, 7
    )
    weighted = encode_update(u, parts="ab")
    uniform = encode_update(u, parts="ab", weighted=False)
    assert weighted[-1] == 7.0 and np.array_equal(weighted[:-1], 7.0 * uniform[:-1])
    assert uniform[-1] == 1.0 and np.array_equal(uniform[:-1], np.ones(4))


def test_decoding_refuses_a_non_linear_aggregator() -> None:
    template = ClientUpdate(
        "g", {"m": LoraFactors(a=torch.ones(1, 2), b=torch.ones(2, 1), scaling=1.0)}, 1
    )
    for name in ("flora", "lora_fair"):
        with pytest.raises(ValueError, match=f"needs a linear aggregator, got '{name}'"):
            decode_aggregate(
                SecAggResult(total=np.zeros(5), included=(1,), dropped=()),
                template=template,
                parts="ab",
                inner=get_aggregator(name),
            )


def test_decoding_checks_the_unmasked_sum_and_reports_clients_and_weight() -> None:
    template = ClientUpdate(
        "g", {"m": LoraFactors(a=torch.zeros(1, 2), b=torch.zeros(2, 1), scaling=1.0)}, 1
    )
    assert vector_length(template, parts="ab") == 5  # a (2) + b (2) + the weight
    total = np.array([2.0, 4.0, 6.0, 8.0, 2.0])  # [sum w x, sum w] with sum w = 2

    def decode(total: np.ndarray):  # type: ignore[no-untyped-def]
        result = SecAggResult(total=total, included=(1, 2, 3), dropped=(4,))
        return decode_aggregate(
            result, template=template, parts="ab", inner=get_aggregator("fedit")
        )

    res = decode(total)
    assert res.metrics["clients"] == 3.0 and res.metrics["total_weight"] == 2.0
    assert torch.equal(res.adapters["m"].a, torch.tensor([[1.0, 2.0]]))  # the weighted mean
    assert torch.equal(res.adapters["m"].b, torch.tensor([[3.0], [4.0]]))
    assert dict(res.base_delta) == {}
    assert decode(np.array([1.0, 1.0, 1.0, 1.0, 1.0])).metrics["total_weight"] == 1.0
    # 0.5 rounds to a count of 0: refused here, not deeper down as a client with 0 examples
    for weight in (0.0, 0.4, 0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match=f"unmasked total weight {weight} is not a positive"):
            decode(np.array([1.0, 1.0, 1.0, 1.0, weight]))
    with pytest.raises(ValueError, match=r"unmasked sum has shape \(4,\); the template needs"):
        decode(total[:4])


# -- what the server can still check about an unmasked sum (fedft/secagg/bounds.py) ------
def _sum(vec: list[float], weight: float) -> np.ndarray:
    return np.asarray([*vec, weight], dtype=np.float64)


def test_sum_bounds_with_example_weights_are_inclusive_and_name_the_setting() -> None:
    """sum n_k of 3 honest clients lies in [3, 3 * max_examples]; outside, one lied."""
    ok = {"included": 3, "weighted": True, "max_examples": 10}
    # inclusive at both ends, up to the slack (rounding + 1e-9) exactly
    for weight in (3.0, 30.0, 30.0 + 1e-10, 3.0 - 1e-9, 30.0 + 1e-9):
        assert sum_problems(_sum([1.0], weight), **ok) == [], weight
    for weight in (2.9, 30.1):
        assert sum_problems(_sum([1.0], weight), **ok) == [
            f"total weight {weight:.6g} outside [3, 30] (3 clients, at most "
            "aggregation.max_examples=10 examples each): a client tampered with its weight"
        ]
    # the fixed-point rounding widens the interval by exactly its bound
    assert sum_problems(_sum([1.0], 30.004), **ok, rounding=0.005) == []
    assert sum_problems(_sum([1.0], 30.006), **ok, rounding=0.005) != []
    assert sum_problems(_sum([1.0], 2.996), **ok, rounding=0.005) == []
    assert sum_problems(_sum([1.0], 2.994), **ok, rounding=0.005) != []


def test_sum_of_uniform_weights_is_the_client_count_and_the_clipped_norm_bound() -> None:
    """User-level DP: w_k = 1, so the weight is |U3| (±0.5), and the summed deltas from x0
    have norm <= |U3| * C (plus the rounding's sqrt(D) * bound)."""
    ref = np.asarray([1.0, -2.0])
    base = {"included": 2, "weighted": False, "max_examples": 10, "reference": ref}
    at_bound = 2 * ref + np.asarray([3.0, 4.0]) * 0.8  # sum of deltas: norm 4 = 2 clients x 2.0
    assert sum_problems(_sum(list(at_bound), 2.0), **base, clip_norm=2.0) == []
    for weight in (1.5, 2.4, 2.5):  # the count is off by at most 0.5 (inclusive)
        assert sum_problems(_sum(list(at_bound), weight), **base, clip_norm=2.0) == []
    # a norm exactly at the limit (C + sqrt(D) * slack, here 1.0 + 1e-9) passes
    one = {"included": 1, "weighted": False, "max_examples": 10, "reference": np.zeros(1)}
    assert sum_problems(_sum([1.0 + 1e-9], 1.0), **one, clip_norm=1.0) == []
    assert sum_problems(_sum([1.0 + 3e-9], 1.0), **one, clip_norm=1.0) != []
    over = 2 * ref + np.asarray([3.0, 4.0]) * 0.82  # norm 4.1
    assert sum_problems(_sum(list(over), 2.0), **base, clip_norm=2.0) == [
        "the sum of clipped updates has norm 4.1 > 2 clients x clip 2: a client sent more "
        "than its clipped update"
    ]
    # within the rounding slack sqrt(2) * (r + 1e-9) the norm passes, beyond it not
    assert sum_problems(_sum(list(over), 2.0), **base, clip_norm=2.0, rounding=0.071) == []
    assert sum_problems(_sum(list(over), 2.0), **base, clip_norm=2.0, rounding=0.070) != []
    # no clip (or no reference): only the count is checked
    assert sum_problems(_sum(list(over), 2.0), **base) == []
    no_ref = {**base, "reference": None}
    assert sum_problems(_sum(list(over), 2.0), **no_ref, clip_norm=2.0) == []
    for weight in (1.4, 2.6):
        assert sum_problems(_sum(list(at_bound), weight), **base, clip_norm=2.0) == [
            f"client count {weight:.6g} in the sum differs from the 2 clients whose vectors "
            "it holds: a client tampered with its weight"
        ]


def test_sum_with_no_clients_or_a_non_finite_weight_is_refused() -> None:
    assert sum_problems(_sum([0.0], 0.0), included=0, weighted=True, max_examples=5) == [
        "0 clients in the sum"
    ]
    for bad in (float("nan"), float("inf")):
        for weighted in (True, False):
            assert sum_problems(
                _sum([0.0], bad), included=1, weighted=weighted, max_examples=5
            ) == [f"total weight {bad} is not finite"]


@pytest.mark.parametrize("which", ["key", "seed"])
def test_a_dealer_bad_in_only_one_secret_is_convicted_and_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, which: str
) -> None:
    """Attack: client 3 deals off its committed polynomial for only one of its two secrets
    (mask key, then self-mask seed). The complaint resolution checks both secrets' shares:
    client 3 is convicted (not the complaining victims), and the operator reads it once."""
    import logging

    params = _params(n=8, max_dropouts=3, d=16)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 9)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bad, real = _bad_deal({5, 6}), shamir.deal
    calls: list[int] = []

    def one_bad(secret: bytes, *, threshold: int, indices: list[int]):  # type: ignore[no-untyped-def]
        calls.append(1)
        first = len(calls) == 1
        use_bad = first if which == "key" else not first
        return (bad if use_bad else real)(secret, threshold=threshold, indices=indices)

    shares = []
    for i, c in clients.items():
        with monkeypatch.context() as m:
            if i == 3:
                m.setattr(shamir, "deal", one_bad)
            shares.append(c.share_keys(directory))
    routed = server.collect_shares(shares)
    checks = [c.check_shares(routed[i]) for i, c in clients.items()]
    assert {m.index for m in checks if m.complaints} == {5, 6}
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        qualified = server.collect_checks(checks)
    assert server.convicted == {3} and 3 not in qualified.qualified
    convictions = [m for m in caplog.messages if m.startswith("secagg round ")]
    assert len(convictions) == 1 and convictions[0].startswith(
        f"secagg round {params.round_id}: client 3 "
    )


def test_a_lying_holder_is_convicted_while_a_dropped_clients_key_is_rebuilt(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack during dropout recovery: client 4 dropped before masking (its mask key must be
    rebuilt from shares) and client 1 reveals wrong shares. The key shares are checked
    against client 4's key commitments: client 1 is convicted, the sum over the survivors is
    exact, and the summary line says who was summed, dropped and convicted."""
    import logging

    params = _params(n=20, max_dropouts=9, d=64)
    vectors = _vectors(20, 64, seed=7)
    with caplog.at_level(logging.INFO, logger="fedft.secagg.protocol"):
        result = run_round(params, vectors, drop_before_masked=(4,), tamper_unmask=(1,))
    assert result.dropped == (4,) and result.suspects == (1,)
    expected = np.sum([vectors[i] for i in result.included], axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert (
        f"secagg round {params.round_id}: summed 19 clients (t={params.threshold}), "
        "1 dropped before masking, 1 convicted"
    ) in caplog.messages


# --- the v1 derivation, refusals that name what was wrong, and boundaries (issue 19) ------


def _kdf(secret: bytes, context: bytes) -> bytes:
    """HKDF-SHA256 with info = DOMAIN + context, written out independently of the library."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DOMAIN + context).derive(
        secret
    )


def _keystream(key: bytes, d: int) -> np.ndarray:
    """(d,) uint64: the ChaCha20 keystream under ``key`` (zero nonce), little-endian words."""
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * d))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def _x25519(private: bytes, public: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).exchange(
        X25519PublicKey.from_public_bytes(public)
    )


def _be(value: int, size: int = 4) -> bytes:
    return value.to_bytes(size, "big")


def _seal(
    dealer: SecAggClient,
    holder: AdvertiseKeys,
    params: SecAggParams,
    *,
    header: bytes,
    values: tuple[int, int],
) -> bytes:
    """A share message from ``dealer`` to ``holder`` built by hand (a cheating dealer's)."""
    sender = dealer.index
    key = _kdf(
        _x25519(dealer.export_state().enc_private, holder.recv_publics[sender]),
        b"share-enc" + _be(params.round_id, 8),
    )
    aad = DOMAIN + b"share" + _be(params.round_id, 8) + _be(sender) + _be(holder.index)
    plain = header + _be(values[0], shamir.SHARE_BYTES) + _be(values[1], shamir.SHARE_BYTES)
    nonce = bytes(12)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, aad)


def test_masks_commitments_and_share_messages_follow_the_v1_derivation() -> None:
    """The wire contract of protocol v1, rebuilt from its description with plain HKDF, X25519,
    ChaCha20 and SHA-256: a client of another fedft version (or another implementation) must
    derive these bytes exactly, else a mixed cohort's sum is silently wrong. Binding the round
    and both addresses is what stops a share message being replayed in another round or to
    another holder."""
    params = _params(n=3, max_dropouts=1, d=8, round_id=2**40 + 3)
    r8 = _be(params.round_id, 8)
    clients = {i: SecAggClient(index=i, params=params) for i in (1, 2, 3)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    keys = {k.index: k for k in directory.keys}
    sent = {i: c.share_keys(directory) for i, c in clients.items()}
    routed = server.collect_shares(list(sent.values()))
    qualified = _qualify(server, clients, routed, clients)
    state = {i: c.export_state() for i, c in clients.items()}
    for i in clients:  # b_u's commitment: SHA-256(DOMAIN || "seed-commit" || b_u)
        assert (
            sent[i].seed_commitment
            == hashlib.sha256(DOMAIN + b"seed-commit" + state[i].seed).digest()
        )
    # share message 1 -> 2: key HKDF(X25519(r_{2<-1}, c_1), "share-enc" || round),
    # AAD DOMAIN || "share" || round || sender || receiver, plaintext sender || receiver || shares
    key = _kdf(_x25519(state[2].recv_private[1], keys[1].enc_public), b"share-enc" + r8)
    blob = sent[1].ciphertexts[2]
    aad = DOMAIN + b"share" + r8 + _be(1) + _be(2)
    plain = ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], aad)
    assert plain[:8] == _be(1) + _be(2)
    n = shamir.SHARE_BYTES
    assert state[2].held[1] == (int.from_bytes(plain[8 : 8 + n]), int.from_bytes(plain[8 + n :]))
    for other in (
        DOMAIN + b"share" + _be(params.round_id + 1, 8) + _be(1) + _be(2),
        DOMAIN + b"share" + r8 + _be(2) + _be(1),
    ):
        with pytest.raises(InvalidTag):  # another round, or the addresses swapped
            ChaCha20Poly1305(key).decrypt(blob[:12], blob[12:], other)
    # y_u = x_u + PRG(b_u, "self-mask" || round || u) + sum_v +-PRG(s_uv, "pair-mask" || round
    # || min || max), + when u < v
    x = np.array([0.5, -1.25, 3.0, 0.0, -7.5, 2.0**-20, 1e3, -1e-3])
    for u, c in clients.items():
        got = np.frombuffer(c.masked_input(qualified, x).masked, dtype="<u8")
        want = quantize(x, frac_bits=params.frac_bits, clip=params.clip)[0]
        want = want + _keystream(_kdf(state[u].seed, b"self-mask" + r8 + _be(u)), 8)
        for v in clients.keys() - {u}:
            secret = _x25519(state[u].mask_private, keys[v].mask_public)
            pair = _keystream(_kdf(secret, b"pair-mask" + r8 + _be(min(u, v)) + _be(max(u, v))), 8)
            want = want + pair if u < v else want - pair
        np.testing.assert_array_equal(got, want)


def test_client_steps_called_out_of_order_are_refused_by_name() -> None:
    c = SecAggClient(index=2, params=_params(n=3, max_dropouts=1, d=4))
    early = {
        "share_keys": lambda: c.share_keys(KeyDirectory(keys=())),
        "check_shares": lambda: c.check_shares(RoutedShares(ciphertexts={})),
        "masked_input": lambda: c.masked_input(MaskRequest(qualified=(2,)), np.zeros(4)),
        "unmask": lambda: c.unmask(UnmaskRequest(survivors=(2,))),
    }
    for name, call in early.items():
        with pytest.raises(
            SecAggProtocolError, match=rf"^client 2: {name} called out of order \(step 0\)$"
        ):
            call()
    c.advertise_keys()
    with pytest.raises(
        SecAggProtocolError, match=r"^client 2: advertise_keys called out of order \(step 1\)$"
    ):
        c.advertise_keys()


def test_a_forged_key_directory_is_refused_with_what_is_wrong() -> None:
    """Attack: the server hands client 1 a directory it doctored. Each forgery is refused
    with a message naming it; a directory of exactly t clients is accepted."""
    params = _params(n=4, max_dropouts=1, d=4)  # t = 3
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 5)}
    keys = {i: c.advertise_keys() for i, c in clients.items()}
    state = clients[1].export_state()  # each attempt starts from client 1 at step 1
    other_mask = keys[2].mask_public
    no_key_for_1 = {v: k for v, k in keys[3].recv_publics.items() if v != 1}
    low_order = {**keys[3].recv_publics, 1: bytes(32)}  # agreement with it is all zero
    cases: list[tuple[list[AdvertiseKeys], type[Exception], str]] = [
        (
            [keys[2], keys[3], keys[4]],
            SecAggProtocolError,
            "client 1: directory misstates my own keys",
        ),
        (
            [dataclasses.replace(keys[1], mask_public=other_mask), keys[2], keys[3]],
            SecAggProtocolError,
            "client 1: directory misstates my own keys",
        ),
        (
            [keys[1], keys[2], keys[3], keys[2]],
            SecAggProtocolError,
            "directory lists an index twice",
        ),
        (
            [keys[1], keys[2], dataclasses.replace(keys[3], index=9)],
            SecAggProtocolError,
            "directory has index 9 outside the cohort",
        ),
        (
            [keys[1], keys[2], dataclasses.replace(keys[3], recv_publics=no_key_for_1)],
            SecAggProtocolError,
            "client 3 has no key to receive my shares",
        ),
        (
            [keys[1], keys[2], dataclasses.replace(keys[3], recv_publics=low_order)],
            SecAggProtocolError,
            "unusable X25519 public key: .+",
        ),
        ([keys[1], keys[2]], SecAggAbort, "only 2 clients advertised keys; t=3"),
    ]
    for entries, error, message in cases:
        with pytest.raises(error, match=f"^{message}$"):
            SecAggClient.from_state(state).share_keys(KeyDirectory(keys=tuple(entries)))
    sent = SecAggClient.from_state(state).share_keys(KeyDirectory(keys=(keys[1], keys[2], keys[3])))
    assert set(sent.ciphertexts) == {2, 3}


def test_routed_shares_from_unknown_senders_are_refused() -> None:
    params = _params(n=3, max_dropouts=1, d=4)
    clients = {i: SecAggClient(index=i, params=params) for i in (1, 2, 3)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])[1]
    state = clients[1].export_state()
    cases = [
        (
            RoutedShares(ciphertexts=routed.ciphertexts, commitments={2: routed.commitments[2]}),
            "client 1: commitments and shares disagree",
        ),
    ]
    for sender in (1, 9):  # itself, and an index no one advertised
        forged = RoutedShares(
            ciphertexts={**routed.ciphertexts, sender: routed.ciphertexts[2]},
            commitments={**routed.commitments, sender: routed.commitments[2]},
        )
        cases.append((forged, f"client 1: share from unknown {sender}"))
    for forged, message in cases:
        with pytest.raises(SecAggProtocolError, match=f"^{message}$"):
            SecAggClient.from_state(state).check_shares(forged)
    assert SecAggClient.from_state(state).check_shares(routed).complaints == {}


def test_complaints_and_convictions_say_what_was_wrong_with_a_share_message(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack: dealer 4 seals, under the right keys, a message addressed inside to another
    holder (to 1) and one holding a value outside the field (to 2); dealer 5 sends a
    truncated message (to 1) and a bit-flipped one (to 3). Each holder complains saying why,
    the server convicts both dealers saying why, and the round completes with exactly t."""
    params = _params(n=5, max_dropouts=2, d=8)  # t = 3
    vectors = _vectors(5, 8, seed=9)
    clients = {i: SecAggClient(index=i, params=params) for i in vectors}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    keys = {k.index: k for k in directory.keys}
    sent = {i: c.share_keys(directory) for i, c in clients.items()}
    misaddressed = _seal(clients[4], keys[1], params, header=_be(4) + _be(3), values=(1, 2))
    not_a_field_value = _seal(
        clients[4], keys[2], params, header=_be(4) + _be(2), values=(shamir.PRIME, 1)
    )
    sent[4] = dataclasses.replace(
        sent[4], ciphertexts={**sent[4].ciphertexts, 1: misaddressed, 2: not_a_field_value}
    )
    flipped = bytearray(sent[5].ciphertexts[3])
    flipped[20] ^= 4
    sent[5] = dataclasses.replace(
        sent[5],
        ciphertexts={**sent[5].ciphertexts, 1: sent[5].ciphertexts[1][:-1], 3: bytes(flipped)},
    )
    routed = server.collect_shares(list(sent.values()))
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        checks = {i: c.check_shares(routed[i]) for i, c in clients.items()}
        qualified = server.collect_checks(list(checks.values()))
    complaints = {i: set(m.complaints) for i, m in checks.items() if m.complaints}
    assert complaints == {1: {4, 5}, 2: {4}, 3: {5}}
    r = params.round_id
    for line in (
        "secagg client 1: complaint against 4: share message from 4 to 1 misaddressed",
        "secagg client 1: complaint against 5: share message from 5 to 1 has bad length",
        "secagg client 2: complaint against 4: share message from 4: share value outside the field",
        "secagg client 3: complaint against 5: share message from 5 to 3 failed authentication",
        f"secagg round {r}: client 4 dealt an unreadable share message to 1 (share message "
        "from 4 to 1 misaddressed)",
        f"secagg round {r}: client 5 dealt an unreadable share message to 1 (share message "
        "from 5 to 1 has bad length)",
    ):
        assert line in caplog.messages
    assert qualified.qualified == (1, 2, 3) and server.convicted == {4, 5}
    request = server.collect_masked(
        [clients[i].masked_input(qualified, vectors[i]) for i in (1, 2, 3)]
    )
    result = server.collect_unmasking([clients[i].unmask(request) for i in (1, 2, 3)])
    expected = vectors[1] + vectors[2] + vectors[3]
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert result.suspects == (4, 5) and result.dropped == ()


def test_a_forged_mask_or_unmask_request_is_refused_with_what_is_wrong(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack: the server asks client 1 to mask with a set it doctored (a duplicate, without
    client 1, with dealer 4 whose shares client 1 could not verify, too few), then to reveal
    shares for a doctored survivor list. Each is refused naming the problem; exactly t is
    accepted, and entries clipped or non-finite are counted in a warning."""
    params = SecAggParams(num_clients=4, max_dropouts=1, vector_length=4, round_id=5, clip=4.0)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 5)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])[1]
    blob = bytearray(routed.ciphertexts[4])
    blob[-1] ^= 1  # dealer 4's message to client 1 fails authentication
    forged = RoutedShares(
        ciphertexts={**routed.ciphertexts, 4: bytes(blob)}, commitments=routed.commitments
    )
    assert set(clients[1].check_shares(forged).complaints) == {4}
    at_mask = clients[1].export_state()
    x = np.ones(4)
    mask_cases: list[tuple[tuple[int, ...], np.ndarray, type[Exception], str]] = [
        ((1, 2, 2, 3), x, SecAggProtocolError, "client 1: malformed qualified set"),
        ((2, 3, 4), x, SecAggProtocolError, "client 1: malformed qualified set"),
        (
            (1, 2, 3, 4),
            x,
            SecAggProtocolError,
            re.escape("client 1: qualified set names dealers without verified shares: [4]"),
        ),
        ((1, 2), x, SecAggAbort, "only 2 clients qualified; t=3"),
        ((1, 2, 3), np.ones(3), ValueError, re.escape("client 1: vector shape (3,) != (4,)")),
    ]
    for qualified, vector, error, message in mask_cases:
        with pytest.raises(error, match=f"^{message}$"):
            SecAggClient.from_state(at_mask).masked_input(MaskRequest(qualified=qualified), vector)
    client = SecAggClient.from_state(at_mask)
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        client.masked_input(MaskRequest(qualified=(1, 2, 3)), np.array([5.0, np.nan, -4.0, 1.0]))
    assert "secagg client 1: 2 entries clipped to +-4 or non-finite" in caplog.messages
    at_unmask = client.export_state()
    unmask_cases: list[tuple[tuple[int, ...], type[Exception], str]] = [
        ((1, 1, 2), SecAggProtocolError, "client 1: malformed survivor list"),
        ((2, 3), SecAggProtocolError, "client 1: malformed survivor list"),
        ((1, 2, 4), SecAggProtocolError, "client 1: survivors not all in U2'"),
        ((1, 2), SecAggAbort, "only 2 masked inputs arrived; t=3"),
    ]
    for survivors, error, message in unmask_cases:
        with pytest.raises(error, match=f"^{message}$"):
            SecAggClient.from_state(at_unmask).unmask(UnmaskRequest(survivors=survivors))
    reply = SecAggClient.from_state(at_unmask).unmask(UnmaskRequest(survivors=(1, 2, 3)))
    assert set(reply.seed_shares) == {1, 2, 3} and reply.key_shares == {}


def test_the_server_names_what_it_ignores_and_why_it_aborts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At every step a duplicate or foreign message is dropped with a warning naming the step
    and the client, a wrong-sized vector does not stop the others being read, and too few
    messages abort with the count, the step and the threshold."""
    params = _params(n=5, max_dropouts=2, d=4)  # t = 3
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 6)}
    server = SecAggServer(params)
    adverts = [c.advertise_keys() for c in clients.values()]

    def aborts(step: str, count: int) -> str:
        what = f"{count} clients {step}, threshold t=3 (n=5, max_dropouts=2)"
        return f"^{re.escape('secure aggregation aborted: ' + what)}$"

    with pytest.raises(SecAggAbort, match=aborts("advertised keys", 2)):
        SecAggServer(params).collect_keys(adverts[:2])
    directory = server.collect_keys(adverts)
    sent = [c.share_keys(directory) for c in clients.values()]
    with pytest.raises(SecAggAbort, match=aborts("shared keys", 2)):
        copy.deepcopy(server).collect_shares(sent[:2])
    routed = server.collect_shares(sent)
    checks = [clients[i].check_shares(routed[i]) for i in clients]
    with pytest.raises(SecAggAbort, match=aborts("qualified after the share check", 2)):
        copy.deepcopy(server).collect_checks(checks[:2])
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        qualified = server.collect_checks([checks[1], *checks])  # the repeat does not stop it
    assert "secagg server: ignoring share check from client 2" in caplog.messages
    masked = {i: c.masked_input(qualified, np.full(4, float(i))) for i, c in clients.items()}
    with pytest.raises(SecAggAbort, match=aborts("sent masked input", 2)):
        copy.deepcopy(server).collect_masked([masked[1], masked[2]])
    short = MaskedInput(index=5, masked=bytes(8))  # client 5 sends 8 bytes instead of 32
    foreign = MaskedInput(index=6, masked=masked[1].masked)
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        request = server.collect_masked(
            [short, masked[1], masked[2], masked[3], masked[4], foreign, masked[1]]
        )
    assert request.survivors == (1, 2, 3, 4)
    for line in (
        "client 5 sent 8 bytes",
        "ignoring masked input from client 6",
        "ignoring masked input from client 1",
    ):
        assert f"secagg server: {line}" in caplog.messages
    answers = {i: clients[i].unmask(request) for i in request.survivors}
    with pytest.raises(SecAggAbort, match=aborts("answered the unmasking step", 2)):
        copy.deepcopy(server).collect_unmasking([answers[1], answers[2]])
    fake = UnmaskShares(index=5, seed_shares={}, key_shares={})  # 5 is not a survivor
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        result = server.collect_unmasking([*answers.values(), answers[3], fake])
    for i in (3, 5):
        assert f"secagg server: ignoring unmasking shares from client {i}" in caplog.messages
    np.testing.assert_allclose(result.total, np.full(4, 10.0), atol=params.error_bound)
    assert result.dropped == (5,) and result.suspects == ()


def test_every_complaint_is_resolved_even_after_a_bogus_or_a_settled_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Attack mix at the share check (n = 11, t = 6; client 11 vanishes before dealing):
    dealer 3 deals bad shares to clients 2 and 5, dealer 6 only to client 5. Client 2 also
    complains about itself, client 7 about client 11, who never dealt. Both bogus
    complainers are convicted, and so are both bad dealers: client 2's complaint about 3
    still counts after its bogus one, and client 5's about 6 after its complaint about 3,
    who was convicted already. The log says why for each."""
    params = _params(n=11, max_dropouts=5, d=4)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 12)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    bad = {3: {2, 5}, 6: {5}}
    sent = []
    for i in range(1, 11):
        with monkeypatch.context() as m:
            if i in bad:
                m.setattr(shamir, "deal", _bad_deal(bad[i]))
            sent.append(clients[i].share_keys(directory))
    routed = server.collect_shares(sent)
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        checks = {i: clients[i].check_shares(routed[i]) for i in range(1, 11)}
        assert {i: set(m.complaints) for i, m in checks.items() if m.complaints} == {
            2: {3},
            5: {3, 6},
        }
        checks[2] = ShareCheck(index=2, complaints={2: bytes(32), **checks[2].complaints})
        checks[7] = ShareCheck(index=7, complaints={11: bytes(32)})
        # without client 10's answer too few qualify: the abort still names the convicted
        with pytest.raises(SecAggAbort, match="5 clients qualified after the share check") as info:
            copy.deepcopy(server).collect_checks([m for i, m in checks.items() if i != 10])
        assert info.value.suspects == (2, 3, 6, 7)
        qualified = server.collect_checks(list(checks.values()))
    assert server.convicted == {2, 3, 6, 7}
    assert qualified.qualified == (1, 4, 5, 8, 9, 10)
    assert "secagg client 5: shares of {3, 6} fail their commitments" in caplog.messages
    r = params.round_id
    for line in (
        "client 2 complained about 2, not a dealer of its",
        "client 3 dealt 2 shares that fail its commitments",
        "client 6 dealt 5 shares that fail its commitments",
        "client 7 complained about 11, not a dealer of its",
    ):
        assert f"secagg round {r}: {line}" in caplog.messages


def _through_masking(
    params: SecAggParams, vectors: dict[int, np.ndarray], masking_clients: Iterable[int]
) -> tuple[dict[int, SecAggClient], SecAggServer, UnmaskRequest]:
    """Every client deals and qualifies; ``masking_clients`` send their masked vectors."""
    clients = {i: SecAggClient(index=i, params=params) for i in vectors}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    qualified = _qualify(server, clients, routed, clients)
    request = server.collect_masked(
        [clients[i].masked_input(qualified, vectors[i]) for i in masking_clients]
    )
    return clients, server, request


def _bump(blob: bytes) -> bytes:
    return shamir.encode_share((shamir.decode_share(blob) + 1) % shamir.PRIME)


def test_a_holder_lying_only_about_a_dropped_clients_key_is_convicted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Attack: client 5 drops before masking; client 1 reveals honest seed shares but a
    wrong share of client 5's mask key. The key shares are checked against client 5's KEY
    commitments: client 1 is convicted, and the sum over 1..4 is exact."""
    params = _params(n=5, max_dropouts=2, d=8)
    vectors = _vectors(5, 8, seed=12)
    clients, server, request = _through_masking(params, vectors, (1, 2, 3, 4))
    answers = [clients[i].unmask(request) for i in request.survivors]
    answers[0] = dataclasses.replace(answers[0], key_shares={5: _bump(answers[0].key_shares[5])})
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        result = server.collect_unmasking(answers)
    assert result.dropped == (5,) and result.suspects == (1,)
    expected = np.sum([vectors[i] for i in (1, 2, 3, 4)], axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert (
        f"secagg round {params.round_id}: client 1 revealed a share of 5 that fails the commitments"
        in caplog.messages
    )


def test_unmasking_skips_missing_shares_and_convicts_a_malformed_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Client 1 answers the unmasking with no shares at all (the others still suffice), and
    client 2 sends a 3-byte share of client 4's seed: client 2 is convicted, the sum exact."""
    params = _params(n=5, max_dropouts=2, d=8)
    vectors = _vectors(5, 8, seed=13)
    clients, server, request = _through_masking(params, vectors, vectors)
    answers = [clients[i].unmask(request) for i in request.survivors]
    answers[0] = UnmaskShares(index=1, seed_shares={}, key_shares={})
    answers[1] = dataclasses.replace(answers[1], seed_shares={**answers[1].seed_shares, 4: b"abc"})
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        result = server.collect_unmasking(answers)
    assert result.suspects == (2,) and result.included == (1, 2, 3, 4, 5)
    expected = np.sum(list(vectors.values()), axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert (
        f"secagg round {params.round_id}: client 2 sent a malformed share of 4" in caplog.messages
    )


@pytest.mark.parametrize("which", ["seed", "key"])
def test_a_dealer_that_shared_another_secret_than_it_committed_to_is_named(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, which: str
) -> None:
    """Attack: client 3's shares verify against its Feldman commitments, but rebuild a seed
    other than the one its SHA-256 commitment names (it stays), or a mask key other than the
    one it advertised (it drops before masking, so its key is rebuilt). The round cannot be
    unmasked: it aborts naming client 3, and only client 3."""
    params = _params(n=5, max_dropouts=2, d=4)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 6)}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    real, dealt = shamir.deal, []

    def other_key(secret: bytes, **kw):  # type: ignore[no-untyped-def]
        dealt.append(secret)  # the first secret dealt is the mask key: deal another one
        return real(bytes(31) + b"\x07" if len(dealt) == 1 else secret, **kw)

    sent = []
    for i, c in clients.items():
        with monkeypatch.context() as m:
            if i == 3 and which == "key":
                m.setattr(shamir, "deal", other_key)
            sent.append(c.share_keys(directory))
    if which == "seed":
        sent[2] = dataclasses.replace(sent[2], seed_commitment=bytes(32))
    routed = server.collect_shares(sent)
    qualified = _qualify(server, clients, routed, clients)
    maskers = [1, 2, 4, 5] if which == "key" else [1, 2, 3, 4, 5]
    request = server.collect_masked(
        [clients[i].masked_input(qualified, np.ones(4)) for i in maskers]
    )
    message = (
        "secure aggregation aborted: secret of client 3: the shares match the dealer's "
        "commitments but rebuild a secret that is not the one it committed to (its public "
        "key or seed commitment)"
    )
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        with pytest.raises(SecAggAbort, match=f"^{re.escape(message)}$") as info:
            server.collect_unmasking([clients[i].unmask(request) for i in maskers])
    assert info.value.suspects == (3,)
    convictions = [m for m in caplog.messages if m.startswith("secagg round ")]
    assert convictions == [
        f"secagg round {params.round_id}: client 3 shared another secret than it committed to "
        f"({message.split('client 3: ')[1]})"
    ]


def test_a_convicted_holder_costs_one_search_even_with_exactly_t_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """n = 5, t = 3: clients 1..4 answer the unmasking, client 1 lying about every share.
    The first secret's search convicts it; the other four are rebuilt from the exactly t
    shares of the unconvicted without another search."""
    params = _params(n=5, max_dropouts=2, d=8)
    vectors = _vectors(5, 8, seed=14)
    clients, server, request = _through_masking(params, vectors, vectors)
    answers = [clients[i].unmask(request) for i in (1, 2, 3, 4)]
    calls = _count_gpow(monkeypatch)
    result = server.collect_unmasking([_tamper(answers[0]), *answers[1:]])
    assert result.suspects == (1,) and result.included == (1, 2, 3, 4, 5)
    expected = np.sum(list(vectors.values()), axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert calls[0] <= 1 + 2 * 2  # one search among 4 shares


def test_checked_reconstruction_at_its_boundaries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exactly t verified shares rebuild the secret; the largest 32-byte value is a secret and
    2^256 (consistently committed) is not; a share must lie in [0, q): 0 passes, q does not."""
    secret = bytes(range(32))
    shares, blobs = shamir.deal(secret, threshold=3, indices=[1, 2, 3, 4])
    commitments = feldman.decode(blobs, threshold=3)
    forged = {**shares, 2: (shares[2] + 1) % shamir.PRIME}
    got = shamir.reconstruct_checked(
        forged, threshold=3, commitments=commitments, verify=lambda s: s == secret
    )
    assert got == (secret, {2})
    for value in (2**256 - 1, 2**256):  # a constant polynomial: every share is the value
        constant = feldman.decode(feldman.commit([value]), threshold=1)
        args = {"threshold": 1, "commitments": constant, "verify": lambda s: True}
        if value < 2**256:
            assert shamir.reconstruct_checked({1: value, 2: value}, **args) == (b"\xff" * 32, set())
        else:
            with pytest.raises(shamir.DealerError):
                shamir.reconstruct_checked({1: value, 2: value}, **args)
    zero = feldman.decode(feldman.commit([0]), threshold=1)  # f = 0: every share is 0
    assert feldman.verify(zero, 3, 0)
    assert not feldman.verify(zero, 3, feldman.Q)  # q = 0 mod q, but not a canonical share
    # the batched check agrees at the same edges, and a share 0 off the polynomial fails
    five = feldman.decode(feldman.commit([5]), threshold=1)  # f = 5
    items = [(zero, 3, 0), (zero, 3, feldman.Q), (five, 3, 0), (five, 3, 5)]
    assert feldman.failing(items) == {1, 2}
    assert feldman.batch_verify([items[0], items[3]])
    assert not feldman.batch_verify([items[0], items[1]])
    # a share out of range is refused without entering the batch: one check, no search
    calls = _count_gpow(monkeypatch)
    assert feldman.failing([items[3], (five, 4, feldman.Q), (five, 5, 5)]) == {1}
    assert calls[0] == 1


def test_quantize_clips_zeroes_non_finite_and_counts_what_it_changed() -> None:
    x = np.array([np.nan, np.inf, -np.inf, 5.0, -9.0, 4.0, -4.0, 0.5])
    ring, changed = quantize(x, frac_bits=8, clip=4.0)
    assert ring.view(np.int64).tolist() == [0, 0, 0, 1024, -1024, 1024, -1024, 128]
    assert changed == 5  # nan, +-inf, 5 and -9; +-4 lie on the clip
    # any float dtype is computed in float64: float16 (which overflows at 2^16) and float32
    # give the ring elements of the same values in float64
    for dtype in (np.float16, np.float32):
        y = np.array([1.5, -2.25, 3.0], dtype=dtype)
        np.testing.assert_array_equal(
            quantize(y, frac_bits=24, clip=8.0)[0],
            quantize(y.astype(np.float64), frac_bits=24, clip=8.0)[0],
        )


def test_mask_lengths_run_from_zero_to_the_limit_inclusive(monkeypatch: pytest.MonkeyPatch) -> None:
    assert expand_mask(bytes(32), length=0, context=b"c").shape == (0,)
    monkeypatch.setattr(masking, "MAX_VECTOR_LENGTH", 4)
    assert expand_mask(bytes(32), length=4, context=b"c").shape == (4,)
    for bad in (-1, 5):
        with pytest.raises(ValueError, match=rf"^mask length {bad} outside \[0, 4\]$"):
            expand_mask(bytes(32), length=bad, context=b"c")


def test_parameters_are_validated_at_their_boundaries() -> None:
    """The smallest cohort (2 clients, no dropout), one entry, the largest vector, round ids
    0 and 2^63 - 1, no fractional bits and a ring sum just inside 2^63 are accepted; one
    step past each is refused with a message naming the value and the range."""
    ok = {"num_clients": 4, "max_dropouts": 1, "vector_length": 4, "round_id": 0}
    for change in (
        {"num_clients": 2, "max_dropouts": 0},
        {"vector_length": 1},
        {"vector_length": masking.MAX_VECTOR_LENGTH},
        {"round_id": 2**63 - 1},
        {"frac_bits": 0, "clip": 1.0},
    ):
        SecAggParams(**{**ok, **change})  # type: ignore[arg-type]
    refused = [
        ({"num_clients": 1, "max_dropouts": 0}, "num_clients=1: SecAgg needs at least 2"),
        (
            {"max_dropouts": -1},
            "max_dropouts=-1 must be in [0, n/2) for n=4 (threshold t = n - max_dropouts "
            "must exceed n/2)",
        ),
        ({"max_dropouts": 2}, "max_dropouts=2 must be in [0, n/2) for n=4"),
        ({"vector_length": 0}, f"vector_length=0 not in [1, {masking.MAX_VECTOR_LENGTH}]"),
        (
            {"vector_length": masking.MAX_VECTOR_LENGTH + 1},
            f"vector_length={masking.MAX_VECTOR_LENGTH + 1} not in [1, ",
        ),
        ({"round_id": -1}, "round_id=-1 must be in [0, 2^63)"),
        ({"round_id": 2**63}, f"round_id={2**63} must be in [0, 2^63)"),
        ({"frac_bits": -1}, "need frac_bits >= 0 and clip > 0, got -1, "),
    ]
    for change, message in refused:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            SecAggParams(**{**ok, **change})  # type: ignore[arg-type]
    check = masking.check_ring_capacity
    check(num_clients=2, frac_bits=0, clip=2.0**53 - 1)  # the largest exact scaled value
    check(num_clients=2047, frac_bits=52, clip=1.0)  # 2047 * 2^52 < 2^63
    with pytest.raises(ValueError, match=r"^need frac_bits >= 0 and clip > 0, got 3, 0.0$"):
        check(num_clients=2, frac_bits=3, clip=0.0)
    with pytest.raises(
        ValueError, match=r"^clip \* 2\^frac_bits = 9.01e\+15 must stay below 2\^53$"
    ):
        check(num_clients=2, frac_bits=53, clip=1.0)
    with pytest.raises(
        ValueError,
        match=r"^2048 clients \* clip 1.0 \* 2\^52 overflows the signed range of Z_2\^64; "
        "lower clip or frac_bits$",
    ):
        check(num_clients=2048, frac_bits=52, clip=1.0)
    params = SecAggParams(**ok)  # type: ignore[arg-type]
    for index in (0, 5):
        with pytest.raises(ValueError, match=rf"^client index {index} outside \[1, 4\]$"):
            SecAggClient(index=index, params=params)


def test_shares_and_commitments_are_validated_with_messages() -> None:
    """Shamir and Feldman inputs at their edges: threshold 1 and n, share values 0 and
    q - 1, index q - 1, the commitment 1 = g^0 are accepted; one step past is refused."""
    secret = bytes(range(32))
    for threshold in (1, 3):
        shares, _ = shamir.deal(secret, threshold=threshold, indices=[1, 2, 3])
        assert shamir.reconstruct({i: shares[i] for i in (1, 2, 3)[:threshold]}) == secret
    top = shamir.PRIME - 1
    far, _ = shamir.deal(secret, threshold=2, indices=[1, top])
    assert shamir.reconstruct(far) == secret
    refused: list[tuple[Callable[[], object], str]] = [
        (
            lambda: shamir.deal(secret[:31], threshold=2, indices=[1, 2]),
            "secret must be 32 bytes, got 31",
        ),
        (lambda: shamir.deal(secret, threshold=0, indices=[1, 2]), "threshold 0 must be in [1, 2]"),
        (lambda: shamir.deal(secret, threshold=3, indices=[1, 2]), "threshold 3 must be in [1, 2]"),
        (
            lambda: shamir.deal(secret, threshold=2, indices=[2, 1, 2]),
            "share indices must be distinct, got [1, 2, 2]",
        ),
        (
            lambda: shamir.deal(secret, threshold=1, indices=[0, 1]),
            "share index 0 must be a positive field element",
        ),
        (
            lambda: shamir.deal(secret, threshold=1, indices=[1, shamir.PRIME]),
            f"share index {shamir.PRIME} must be a positive field element",
        ),
        (lambda: shamir.encode_share(shamir.PRIME), "share value outside the field"),
        (lambda: shamir.encode_share(-1), "share value outside the field"),
        (lambda: shamir.decode_share(bytes(3)), f"a share is {shamir.SHARE_BYTES} bytes, got 3"),
        (
            lambda: shamir.decode_share(shamir.PRIME.to_bytes(shamir.SHARE_BYTES, "big")),
            "share value outside the field",
        ),
    ]
    for call, message in refused:
        with pytest.raises(shamir.ShareError, match=f"^{re.escape(message)}$"):
            call()
    for value in (0, top):
        assert shamir.decode_share(shamir.encode_share(value)) == value
    one = feldman.encode(1)  # g^0: a commitment to a zero coefficient
    assert feldman.decode([one, feldman.encode(feldman.P - 1)], threshold=2) == [1, feldman.P - 1]
    for blobs, message in (
        ([one], "expected 2 commitments, got 1"),
        (
            [one, one[1:]],
            f"commitment 1 has {feldman.ELEMENT_BYTES - 1} bytes, not {feldman.ELEMENT_BYTES}",
        ),
        ([feldman.encode(feldman.P), one], "commitment 0 is not an element of Z_p^*"),
    ):
        with pytest.raises(feldman.CommitmentError, match=f"^{re.escape(message)}$"):
            feldman.decode(blobs, threshold=2)


def test_the_server_leaves_out_malformed_keys_and_shares_saying_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """n = 11, t = 6. At the key step client 2 advertises a low-order key, client 3 no
    receiving key for client 4, a stranger claims index 12 and client 1 repeats itself; at
    the share step client 4 sends t - 1 key commitments, client 5 no ciphertext for client
    1 and client 6 a 31-byte seed commitment. Each is left out with a warning naming it; the
    directory is sorted; each holder gets the ciphertexts and commitments of exactly the
    other dealers; the round completes over the 6 left."""
    params = _params(n=11, max_dropouts=5, d=4)
    clients = {i: SecAggClient(index=i, params=params) for i in range(1, 12)}
    adverts = {i: c.advertise_keys() for i, c in clients.items()}
    adverts[2] = dataclasses.replace(adverts[2], enc_public=bytes(32))
    no_key_for_4 = {v: k for v, k in adverts[3].recv_publics.items() if v != 4}
    adverts[3] = dataclasses.replace(adverts[3], recv_publics=no_key_for_4)
    stranger = dataclasses.replace(adverts[1], index=12)
    server = SecAggServer(params)
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        directory = server.collect_keys([*reversed(adverts.values()), stranger, adverts[1]])
    assert [k.index for k in directory.keys] == [1, 4, 5, 6, 7, 8, 9, 10, 11]
    for line in (
        "client 2 advertised unusable keys",
        "client 3 advertised unusable keys",
        "ignoring keys from client 12",
        "ignoring keys from client 1",
    ):
        assert f"secagg server: {line}" in caplog.messages
    members = [k.index for k in directory.keys]
    sent = {i: clients[i].share_keys(directory) for i in members}
    sent[4] = dataclasses.replace(sent[4], key_commitments=sent[4].key_commitments[:-1])
    sent[5] = dataclasses.replace(
        sent[5], ciphertexts={v: c for v, c in sent[5].ciphertexts.items() if v != 1}
    )
    sent[6] = dataclasses.replace(sent[6], seed_commitment=sent[6].seed_commitment[:31])
    with caplog.at_level(logging.WARNING, logger="fedft.secagg.protocol"):
        routed = server.collect_shares([*sent.values(), sent[7]])
    for line in (
        "client 4 sent bad commitments: expected 6 commitments, got 5",
        "client 5 sent incomplete shares",
        "client 6 sent incomplete shares",
        "ignoring shares from client 7",
    ):
        assert f"secagg server: {line}" in caplog.messages
    u2 = (1, 7, 8, 9, 10, 11)
    assert tuple(routed) == u2
    for v in u2:
        others = set(u2) - {v}
        assert set(routed[v].ciphertexts) == others and set(routed[v].commitments) == others
        assert routed[v].ciphertexts[1 if v != 1 else 7] == sent[1 if v != 1 else 7].ciphertexts[v]
        commitments = routed[v].commitments[1 if v != 1 else 7]
        dealer = sent[1 if v != 1 else 7]
        assert commitments == (dealer.key_commitments, dealer.seed_commitments)
    vectors = _vectors(11, 4, seed=15)
    qualified = _qualify(server, clients, routed, u2)
    assert qualified.qualified == u2
    request = server.collect_masked([clients[i].masked_input(qualified, vectors[i]) for i in u2])
    result = server.collect_unmasking([clients[i].unmask(request) for i in u2])
    expected = np.sum([vectors[i] for i in u2], axis=0)
    assert result.included == u2 and np.abs(result.total - expected).max() <= params.error_bound
