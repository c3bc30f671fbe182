"""Secure aggregation: exact sums, dropouts, aborts, mask quality, tampering."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedft.aggregation import get_aggregator
from fedft.secagg import (
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


def test_wrong_shares_are_skipped_with_surplus_and_abort_without() -> None:
    params = _params(max_dropouts=4, d=128)  # t = 6
    vectors = _vectors(N, 128, seed=3)
    # 9 responses, 1 dishonest: its shares fail the commitments; the sum is exact.
    result = run_round(params, vectors, drop_before_masked=(10,), tamper_unmask=(2,))
    expected = np.sum([vectors[i] for i in result.included], axis=0)
    assert np.abs(result.total - expected).max() <= params.error_bound
    assert result.suspects == (2,)
    # Exactly t responses, one of them wrong: t - 1 verified shares -> clean abort, liar named.
    with pytest.raises(SecAggAbort, match="match the dealer's commitments") as info:
        run_round(
            params,
            vectors,
            drop_before_masked=(10,),
            drop_before_unmask=(7, 8, 9),
            tamper_unmask=(2,),
        )
    assert info.value.suspects == (2,)


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
    clients = {i: SecAggClient(index=i, params=params) for i in vectors}
    server = SecAggServer(params)
    directory = server.collect_keys([c.advertise_keys() for c in clients.values()])
    routed = server.collect_shares([c.share_keys(directory) for c in clients.values()])
    qualified = _qualify(server, clients, routed, clients)
    request = server.collect_masked(
        [c.masked_input(qualified, vectors[i]) for i, c in clients.items()]
    )
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
    with pytest.raises(ValueError, match="receiving key"):
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


def test_shamir_field_bounds_and_secret_size() -> None:
    secret = bytes(range(32))
    shares = shamir.split(secret, threshold=2, indices=[1, 2, 3])
    assert shamir.reconstruct({1: shares[1], 3: shares[3]}) == secret  # big-endian bytes
    with pytest.raises(shamir.ShareError, match="no shares"):
        shamir.reconstruct({})
    with pytest.raises(shamir.ShareError, match="index 1 is outside the field"):
        shamir.reconstruct({1: shamir.PRIME, 2: shares[2]})
    # y = 0 is a field element: a constant polynomial f = 0 has share 0 everywhere
    assert shamir.reconstruct({1: 0, 2: 0}) == bytes(32)
    # a value of 2^256 or more is not a 32-byte secret (a wrong share, or too few)
    with pytest.raises(shamir.ShareError, match="not a 32-byte secret"):
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
    for weight in (3.0, 30.0, 30.0 + 1e-10):
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
    assert sum_problems(_sum(list(at_bound), 2.4), **base, clip_norm=2.0) == []
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
