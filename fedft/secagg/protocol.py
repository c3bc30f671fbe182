"""SecAgg (Bonawitz et al., CCS 2017) as pure message-passing objects.

The server learns only the sum of the clients' vectors, even when up to ``max_dropouts``
clients vanish mid-round. Four rounds, every message a frozen dataclass of bytes and ints
(no network here; a transport shell carries them):

0. AdvertiseKeys: client u sends two X25519 public keys, c_u (encrypting shares) and
   s_u (agreeing pairwise masks). The server broadcasts the directory U1 (|U1| >= t).
1. ShareKeys: u draws a self-mask seed b_u, Shamir-splits s_u's private key and b_u
   t-of-|U1|, encrypts each holder's pair of shares with ChaCha20-Poly1305 under
   HKDF(X25519(c_u, c_v)), and commits to b_u with SHA-256. The server routes the
   ciphertexts (U2 = senders, |U2| >= t).
2. MaskedInput: u sends y_u = x_u + PRG(b_u) + sum_{v in U2, v != u} +-PRG(s_uv) in
   Z_{2^64} (+ when u < v, - when u > v, so pairwise masks cancel in the sum). U3 = the
   senders, |U3| >= t.
3. Unmasking: each v in U3 returns, for u in U3, its share of b_u and, for u in U2 minus U3
   (dropped before masking), its share of s_u's private key; never both for one u, and
   only once. With >= t responses the server rebuilds b_u (u in U3) and s_u (dropped u),
   removes the self masks and the dropped clients' dangling pairwise masks, and decodes.

Threat model: honest-but-curious server and clients (the paper's semi-honest setting);
with t > n/2 no coalition of the server and fewer than t - (n - t) clients learns more
than the sum. There are no signatures (the paper's active-adversary variant needs a PKI);
deployments authenticate nodes in the transport (Flower node auth, mTLS). Tampered
ciphertexts fail AEAD authentication, and reconstructed secrets are checked against the
advertised public key (s_u) or the SHA-256 commitment (b_u), so a wrong share is found
and skipped when enough other shares exist, else the round aborts cleanly.

Ring, quantisation and the error bound: see :mod:`fedft.secagg.masking`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Protocol, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from fedft.secagg import shamir
from fedft.secagg.masking import (
    DOMAIN,
    MAX_VECTOR_LENGTH,
    check_ring_capacity,
    dequantize,
    derive_key,
    expand_mask,
    quantize,
)

logger = logging.getLogger(__name__)

_KEY_BYTES = 32
_NONCE_BYTES = 12
_PLAINTEXT_BYTES = 8 + 2 * shamir.SHARE_BYTES


class _HasIndex(Protocol):
    @property
    def index(self) -> int: ...


_M = TypeVar("_M", bound=_HasIndex)


class SecAggError(Exception):
    """Base class of secure-aggregation failures."""


class SecAggAbort(SecAggError):
    """The round cannot finish safely: too few clients survive, or shares do not verify."""


class SecAggProtocolError(SecAggError):
    """A message is malformed, out of order, forged, or asks for what must not be given."""


@dataclass(frozen=True, kw_only=True)
class SecAggParams:
    """What every party agrees on before a round.

    Attributes:
        num_clients: n, the cohort size; client indices are 1..n.
        max_dropouts: clients that may drop at any point; threshold t = n - max_dropouts.
            Must be < n/2 so that t > n/2.
        vector_length: D, entries of each client's vector.
        round_id: binds every derived key to this round (no replay across rounds).
        frac_bits: f, fixed-point fractional bits (scale 2^f).
        clip: c, each entry is clipped to [-c, c] before encoding.
    """

    num_clients: int
    max_dropouts: int
    vector_length: int
    round_id: int
    frac_bits: int = 24
    clip: float = float(2**20)

    def __post_init__(self) -> None:
        if self.num_clients < 2:
            raise ValueError(f"num_clients={self.num_clients}: SecAgg needs at least 2")
        if not 0 <= self.max_dropouts or 2 * self.max_dropouts >= self.num_clients:
            raise ValueError(
                f"max_dropouts={self.max_dropouts} must be in [0, n/2) for n="
                f"{self.num_clients} (threshold t = n - max_dropouts must exceed n/2)"
            )
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise ValueError(f"vector_length={self.vector_length} not in [1, {MAX_VECTOR_LENGTH}]")
        if not 0 <= self.round_id < 2**63:
            raise ValueError(f"round_id={self.round_id} must be in [0, 2^63)")
        check_ring_capacity(num_clients=self.num_clients, frac_bits=self.frac_bits, clip=self.clip)

    @property
    def threshold(self) -> int:
        """t: the fewest clients that must survive every step."""
        return self.num_clients - self.max_dropouts

    @property
    def error_bound(self) -> float:
        """Largest rounding error on any entry of the decoded sum: n * 2^(-f-1)."""
        return self.num_clients * 2.0 ** (-self.frac_bits - 1)


@dataclass(frozen=True)
class AdvertiseKeys:
    """Step 0, client -> server: the client's two X25519 public keys (32 bytes each)."""

    index: int
    enc_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class KeyDirectory:
    """Step 0, server -> clients: every advertised key pair (U1)."""

    keys: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class ShareKeys:
    """Step 1, client -> server: encrypted shares for each holder, and b_u's commitment."""

    index: int
    seed_commitment: bytes
    ciphertexts: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class RoutedShares:
    """Step 1, server -> client v: the ciphertexts addressed to v, by sender (U2 minus {v})."""

    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Step 2, client -> server: y_u as little-endian uint64 bytes (8 * D)."""

    index: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Step 3, server -> clients: U3, the clients whose masked input arrived."""

    survivors: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskShares:
    """Step 3, client -> server: shares of b_u (u in U3) and of s_u (u in U2 minus U3)."""

    index: int
    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class SecAggResult:
    """What the server learns.

    Attributes:
        total: float64 (D,), the decoded sum over ``included`` clients of their vectors.
        included: U3, the clients whose vectors are in the sum.
        dropped: U2 minus U3, clients that shared keys but never sent masked input.
        suspects: clients caught sending wrong unmask shares (wrong for two or more
            secrets), or dealing inconsistent shares (their secret had wrong shares from
            holders whose shares of every other secret were right); the sum was still
            rebuilt (Reed-Solomon decoding corrected their shares).
    """

    total: np.ndarray
    included: tuple[int, ...]
    dropped: tuple[int, ...]
    suspects: tuple[int, ...] = ()


def _round_bytes(round_id: int) -> bytes:
    return round_id.to_bytes(8, "big")


def _pair_context(round_id: int, u: int, v: int) -> bytes:
    lo, hi = min(u, v), max(u, v)
    return b"pair-mask" + _round_bytes(round_id) + lo.to_bytes(4, "big") + hi.to_bytes(4, "big")


def _self_context(round_id: int, u: int) -> bytes:
    return b"self-mask" + _round_bytes(round_id) + u.to_bytes(4, "big")


def _enc_aad(round_id: int, sender: int, receiver: int) -> bytes:
    return (
        DOMAIN
        + b"share"
        + _round_bytes(round_id)
        + sender.to_bytes(4, "big")
        + (receiver.to_bytes(4, "big"))
    )


def _commit(seed: bytes) -> bytes:
    return hashlib.sha256(DOMAIN + b"seed-commit" + seed).digest()


def _agree(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # wrong length or a low-order point (all-zero secret)
        raise SecAggProtocolError(f"unusable X25519 public key: {exc}") from exc


def _pair_mask(secret: bytes, *, params: SecAggParams, u: int, v: int) -> np.ndarray:
    """The mask client u adds for partner v: +PRG(s_uv) if u < v else -PRG(s_uv)."""
    mask = expand_mask(
        secret, length=params.vector_length, context=_pair_context(params.round_id, u, v)
    )
    return mask if u < v else np.negative(mask)  # uint64 negation wraps modulo 2^64


def _self_mask(seed: bytes, *, params: SecAggParams, u: int) -> np.ndarray:
    return expand_mask(seed, length=params.vector_length, context=_self_context(params.round_id, u))


@dataclass(frozen=True)
class SecAggClientState:
    """A :class:`SecAggClient` between two steps, as plain values (see ``export_state``).

    Holds the client's private keys and secret seed: it stays on the node that made it.
    """

    index: int
    params: SecAggParams
    step: int
    enc_private: bytes  #: raw X25519 private key (32 bytes)
    mask_private: bytes
    seed: bytes
    u2: tuple[int, ...]
    directory: Mapping[int, AdvertiseKeys]
    held: Mapping[int, tuple[int, int]]  #: sender -> (key share, seed share)


class SecAggClient:
    """One client's side of a SecAgg round; call the four steps in order, once each.

    Args:
        index: this client's index in [1, num_clients] (also its Shamir evaluation point).
        params: the round's shared parameters.
    """

    def __init__(self, *, index: int, params: SecAggParams) -> None:
        if not 1 <= index <= params.num_clients:
            raise ValueError(f"client index {index} outside [1, {params.num_clients}]")
        self.index = index
        self.params = params
        self._enc_key = X25519PrivateKey.generate()
        self._mask_key = X25519PrivateKey.generate()
        self._seed = secrets.token_bytes(shamir.SECRET_BYTES)
        self._directory: dict[int, AdvertiseKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (key share, seed share)
        self._u2: tuple[int, ...] = ()
        self._step = 0

    def export_state(self) -> SecAggClientState:
        """This client's whole state, to continue in another process (:meth:`from_state`)."""
        return SecAggClientState(
            index=self.index,
            params=self.params,
            step=self._step,
            enc_private=self._enc_key.private_bytes_raw(),
            mask_private=self._mask_key.private_bytes_raw(),
            seed=self._seed,
            u2=self._u2,
            directory=dict(self._directory),
            held=dict(self._held),
        )

    @classmethod
    def from_state(cls, state: SecAggClientState) -> SecAggClient:
        """The client :meth:`export_state` described, ready for its next step."""
        if not 0 <= state.step <= 4:
            raise ValueError(f"client state step {state.step} outside [0, 4]")
        if len(state.seed) != shamir.SECRET_BYTES:
            raise ValueError(
                f"client state seed has {len(state.seed)} bytes, not {shamir.SECRET_BYTES}"
            )
        client = cls(index=state.index, params=state.params)
        client._enc_key = X25519PrivateKey.from_private_bytes(state.enc_private)
        client._mask_key = X25519PrivateKey.from_private_bytes(state.mask_private)
        client._seed = state.seed
        client._step = state.step
        client._u2 = tuple(state.u2)
        client._directory = dict(state.directory)
        client._held = dict(state.held)
        return client

    def _advance(self, expected: int, name: str) -> None:
        if self._step != expected:
            raise SecAggProtocolError(
                f"client {self.index}: {name} called out of order (step {self._step})"
            )
        self._step += 1

    def advertise_keys(self) -> AdvertiseKeys:
        """Step 0: publish the two public keys."""
        self._advance(0, "advertise_keys")
        return AdvertiseKeys(
            index=self.index,
            enc_public=self._enc_key.public_key().public_bytes_raw(),
            mask_public=self._mask_key.public_key().public_bytes_raw(),
        )

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Step 1: Shamir-share the mask key and self-mask seed to every client in U1."""
        self._advance(1, "share_keys")
        keys = {k.index: k for k in directory.keys}
        mine = keys.get(self.index)
        if mine is None or mine != AdvertiseKeys(
            self.index,
            self._enc_key.public_key().public_bytes_raw(),
            self._mask_key.public_key().public_bytes_raw(),
        ):
            raise SecAggProtocolError(f"client {self.index}: directory misstates my own keys")
        if len(keys) != len(directory.keys):
            raise SecAggProtocolError("directory lists an index twice")
        if len(keys) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(keys)} clients advertised keys; t={self.params.threshold}"
            )
        for k in keys.values():
            if not 1 <= k.index <= self.params.num_clients:
                raise SecAggProtocolError(f"directory has index {k.index} outside the cohort")
        self._directory = keys
        holders = sorted(keys)
        t = self.params.threshold
        key_shares = shamir.split(self._mask_key.private_bytes_raw(), threshold=t, indices=holders)
        seed_shares = shamir.split(self._seed, threshold=t, indices=holders)
        self._held[self.index] = (key_shares[self.index], seed_shares[self.index])
        ciphertexts: dict[int, bytes] = {}
        for v in holders:
            if v == self.index:
                continue
            plaintext = (
                self.index.to_bytes(4, "big")
                + v.to_bytes(4, "big")
                + shamir.encode_share(key_shares[v])
                + shamir.encode_share(seed_shares[v])
            )
            nonce = secrets.token_bytes(_NONCE_BYTES)
            aead = ChaCha20Poly1305(self._share_key(v))
            aad = _enc_aad(self.params.round_id, self.index, v)
            ciphertexts[v] = nonce + aead.encrypt(nonce, plaintext, aad)
        return ShareKeys(
            index=self.index, seed_commitment=_commit(self._seed), ciphertexts=ciphertexts
        )

    def _share_key(self, other: int) -> bytes:
        secret = _agree(self._enc_key, self._directory[other].enc_public)
        return derive_key(secret, context=b"share-enc" + _round_bytes(self.params.round_id))

    def masked_input(self, routed: RoutedShares, vector: np.ndarray) -> MaskedInput:
        """Step 2: decrypt the shares held for others, then mask and send the vector.

        Args:
            routed: the ciphertexts addressed to this client (senders = U2 minus self).
            vector: float (D,); already weighted (n_k * x_k and n_k, see
                :mod:`fedft.secagg.encoding`). Entries outside [-clip, clip] are clipped.

        Raises:
            SecAggProtocolError: a ciphertext fails authentication or names wrong parties.
            SecAggAbort: fewer than t clients shared keys.
        """
        self._advance(2, "masked_input")
        for sender, blob in routed.ciphertexts.items():
            if sender == self.index or sender not in self._directory:
                raise SecAggProtocolError(f"client {self.index}: share from unknown {sender}")
            self._held[sender] = self._open_share(sender, blob)
        self._u2 = tuple(sorted(self._held))
        if len(self._u2) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(self._u2)} clients shared keys; t={self.params.threshold}"
            )
        x = np.asarray(vector)
        if x.shape != (self.params.vector_length,):
            raise ValueError(
                f"client {self.index}: vector shape {x.shape} != ({self.params.vector_length},)"
            )
        y, clipped = quantize(x, frac_bits=self.params.frac_bits, clip=self.params.clip)
        if clipped:
            logger.warning(
                "secagg client %d: %d entries clipped to +-%g or non-finite",
                self.index,
                clipped,
                self.params.clip,
            )
        y = y + _self_mask(self._seed, params=self.params, u=self.index)
        for v in self._u2:
            if v != self.index:
                secret = _agree(self._mask_key, self._directory[v].mask_public)
                y = y + _pair_mask(secret, params=self.params, u=self.index, v=v)
        return MaskedInput(index=self.index, masked=y.astype("<u8").tobytes())

    def _open_share(self, sender: int, blob: bytes) -> tuple[int, int]:
        if len(blob) != _NONCE_BYTES + _PLAINTEXT_BYTES + 16:
            raise SecAggProtocolError(f"client {self.index}: share from {sender} has bad length")
        aead = ChaCha20Poly1305(self._share_key(sender))
        aad = _enc_aad(self.params.round_id, sender, self.index)
        try:
            plain = aead.decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
        except InvalidTag as exc:
            raise SecAggProtocolError(
                f"client {self.index}: share from client {sender} failed authentication"
            ) from exc
        if int.from_bytes(plain[:4], "big") != sender or int.from_bytes(plain[4:8], "big") != (
            self.index
        ):
            raise SecAggProtocolError(f"client {self.index}: share from {sender} misaddressed")
        key_share = shamir.decode_share(plain[8 : 8 + shamir.SHARE_BYTES])
        seed_share = shamir.decode_share(plain[8 + shamir.SHARE_BYTES :])
        return key_share, seed_share

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Step 3: reveal seed shares of survivors and key shares of dropped clients.

        Answers once only: a second request (a server fishing for both shares of one
        client) raises SecAggProtocolError.
        """
        self._advance(3, "unmask")
        survivors = set(request.survivors)
        if len(survivors) != len(request.survivors) or self.index not in survivors:
            raise SecAggProtocolError(f"client {self.index}: malformed survivor list")
        if not survivors <= set(self._u2):
            raise SecAggProtocolError(f"client {self.index}: survivors not all in U2")
        if len(survivors) < self.params.threshold:
            raise SecAggAbort(
                f"only {len(survivors)} masked inputs arrived; t={self.params.threshold}"
            )
        seed_shares = {u: shamir.encode_share(self._held[u][1]) for u in sorted(survivors)}
        key_shares = {
            u: shamir.encode_share(self._held[u][0]) for u in self._u2 if u not in survivors
        }
        return UnmaskShares(index=self.index, seed_shares=seed_shares, key_shares=key_shares)


class SecAggServer:
    """The server's side: collect, route, unmask. Call the four collect steps in order.

    Each ``collect_*`` drops (and logs) messages from clients that are not in the previous
    step's set or that repeat an index; it raises :class:`SecAggAbort` when fewer than t
    usable messages remain.
    """

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self._keys: dict[int, AdvertiseKeys] = {}
        self._commitments: dict[int, bytes] = {}
        self._u2: tuple[int, ...] = ()
        self._masked: dict[int, np.ndarray] = {}
        self._step = 0

    def _advance(self, expected: int, name: str) -> None:
        if self._step != expected:
            raise SecAggProtocolError(f"server: {name} called out of order (step {self._step})")
        self._step += 1

    def _enough(self, count: int, what: str) -> None:
        if count < self.params.threshold:
            raise SecAggAbort(
                f"secure aggregation aborted: {count} clients {what}, threshold t="
                f"{self.params.threshold} (n={self.params.num_clients}, "
                f"max_dropouts={self.params.max_dropouts})"
            )

    def _unique(self, messages: Sequence[_M], allowed: set[int], what: str) -> list[_M]:
        seen: set[int] = set()
        kept: list[_M] = []
        for m in messages:
            if m.index in seen or m.index not in allowed:
                logger.warning("secagg server: ignoring %s from client %d", what, m.index)
                continue
            seen.add(m.index)
            kept.append(m)
        return kept

    def collect_keys(self, messages: Sequence[AdvertiseKeys]) -> KeyDirectory:
        """Step 0: build the directory U1 from the advertised keys."""
        self._advance(0, "collect_keys")
        cohort = set(range(1, self.params.num_clients + 1))
        kept = self._unique(messages, cohort, "keys")
        good = [
            m for m in kept if len(m.enc_public) == _KEY_BYTES and len(m.mask_public) == _KEY_BYTES
        ]
        self._enough(len(good), "advertised keys")
        self._keys = {m.index: m for m in good}
        return KeyDirectory(keys=tuple(sorted(good, key=lambda m: m.index)))

    def collect_shares(self, messages: Sequence[ShareKeys]) -> dict[int, RoutedShares]:
        """Step 1: U2 = senders; route to each v in U2 the ciphertexts addressed to it."""
        self._advance(1, "collect_shares")
        good: list[ShareKeys] = []
        for m in self._unique(messages, set(self._keys), "shares"):
            if set(m.ciphertexts) != set(self._keys) - {m.index} or len(m.seed_commitment) != 32:
                logger.warning("secagg server: client %d sent incomplete shares", m.index)
                continue
            good.append(m)
        self._enough(len(good), "shared keys")
        self._u2 = tuple(sorted(m.index for m in good))
        self._commitments = {m.index: m.seed_commitment for m in good}
        return {
            v: RoutedShares(ciphertexts={m.index: m.ciphertexts[v] for m in good if m.index != v})
            for v in self._u2
        }

    def collect_masked(self, messages: Sequence[MaskedInput]) -> UnmaskRequest:
        """Step 2: U3 = senders of a well-formed masked vector."""
        self._advance(2, "collect_masked")
        size = 8 * self.params.vector_length
        for m in self._unique(messages, set(self._u2), "masked input"):
            if len(m.masked) != size:
                logger.warning("secagg server: client %d sent %d bytes", m.index, len(m.masked))
                continue
            self._masked[m.index] = np.frombuffer(m.masked, dtype="<u8").astype(np.uint64)
        self._enough(len(self._masked), "sent masked input")
        return UnmaskRequest(survivors=tuple(sorted(self._masked)))

    def collect_unmasking(self, messages: Sequence[UnmaskShares]) -> SecAggResult:
        """Step 3: rebuild the needed secrets from >= t responses and decode the sum.

        Raises:
            SecAggAbort: fewer than t responses, or some secret cannot be rebuilt from
                shares that verify (tampered or wrong shares and no honest surplus).
        """
        self._advance(3, "collect_unmasking")
        survivors = tuple(sorted(self._masked))
        dropped = tuple(u for u in self._u2 if u not in self._masked)
        responses = self._unique(messages, set(survivors), "unmasking shares")
        self._enough(len(responses), "answered the unmasking step")
        t = self.params.threshold
        total = np.zeros(self.params.vector_length, dtype=np.uint64)
        for y in self._masked.values():
            total = total + y
        wrong: dict[int, set[int]] = {}  # secret owner -> holders whose share was wrong
        for u in survivors:
            shares = self._gather(responses, u, seeds=True)
            commitment = self._commitments[u]
            wrong[u] = set()
            seed = self._rebuild(shares, u, partial(_seed_matches, commitment), wrong[u])
            total = total - _self_mask(seed, params=self.params, u=u)
        for u in dropped:
            shares = self._gather(responses, u, seeds=False)
            public = self._keys[u].mask_public
            wrong[u] = set()
            raw = self._rebuild(shares, u, partial(_key_matches, public), wrong[u])
            key = X25519PrivateKey.from_private_bytes(raw)
            for v in survivors:
                secret = _agree(key, self._keys[v].mask_public)
                total = total - _pair_mask(secret, params=self.params, u=v, v=u)
        logger.info(
            "secagg round %d: summed %d clients (t=%d), %d dropped before masking",
            self.params.round_id,
            len(survivors),
            t,
            len(dropped),
        )
        suspects = blame(wrong)
        if suspects:
            logger.warning(
                "secagg round %d: wrong shares %s; suspects %s (corrected, round completed)",
                self.params.round_id,
                {u: sorted(h) for u, h in wrong.items() if h},
                suspects,
            )
        return SecAggResult(
            total=dequantize(total, frac_bits=self.params.frac_bits),
            included=survivors,
            dropped=dropped,
            suspects=suspects,
        )

    def _gather(self, responses: Sequence[UnmaskShares], u: int, *, seeds: bool) -> dict[int, int]:
        shares: dict[int, int] = {}
        for r in responses:
            blob = (r.seed_shares if seeds else r.key_shares).get(u)
            if blob is None:
                continue
            try:
                shares[r.index] = shamir.decode_share(blob)
            except shamir.ShareError:
                logger.warning("secagg server: malformed share of %d from %d", u, r.index)
        return shares

    def _rebuild(
        self,
        shares: Mapping[int, int],
        u: int,
        verify: Callable[[bytes], bool],
        wrong: set[int] | None = None,
    ) -> bytes:
        try:
            return shamir.reconstruct_verified(
                shares, threshold=self.params.threshold, verify=verify, wrong=wrong
            )
        except shamir.ShareError as exc:
            raise SecAggAbort(f"secure aggregation aborted: secret of client {u}: {exc}") from exc


def blame(wrong: Mapping[int, set[int]]) -> tuple[int, ...]:
    """Who to blame for wrong shares.

    ``wrong`` maps each rebuilt secret's owner to the holders whose share of it was wrong.
    A holder wrong about two or more secrets lied in its unmask answer. A secret with wrong
    shares from two or more holders that are right about every other secret was dealt
    inconsistently by its owner. One holder wrong about one secret only cannot be told apart
    from that secret's owner having dealt it a bad share: both are named.
    """
    count: dict[int, int] = {}
    for holders in wrong.values():
        for h in holders:
            count[h] = count.get(h, 0) + 1
    suspects = {h for h, c in count.items() if c >= 2}
    for owner, holders in wrong.items():
        if holders and all(count[h] == 1 for h in holders):
            suspects.add(owner)
            if len(holders) == 1:
                suspects |= holders
    return tuple(sorted(suspects))


def _seed_matches(commitment: bytes, seed: bytes) -> bool:
    return _commit(seed) == commitment


def _key_matches(public: bytes, raw_private: bytes) -> bool:
    key = X25519PrivateKey.from_private_bytes(raw_private)
    return key.public_key().public_bytes_raw() == public
