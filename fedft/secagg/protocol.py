"""SecAgg (Bonawitz et al., CCS 2017) with Feldman-verified shares, as message-passing objects.

The server learns only the sum of the clients' vectors, even when up to ``max_dropouts``
clients vanish mid-round. Five steps, every message a frozen dataclass of bytes and ints
(no network here; a transport shell carries them):

0. AdvertiseKeys: client u sends X25519 public keys: c_u (sending encrypted shares), s_u
   (agreeing pairwise masks) and, for every other index v of the cohort, r_{u<-v}
   (receiving v's shares; one key per dealer, so that u can later reveal the key of one
   dealer's shares and nothing else). The server broadcasts the directory U1 (|U1| >= t).
1. ShareKeys: u draws a self-mask seed b_u, Shamir-splits s_u's private key and b_u
   t-of-|U1|, publishes Feldman commitments g^{a_j} to both polynomials, encrypts each
   holder v's pair of shares with ChaCha20-Poly1305 under HKDF(X25519(c_u, r_{v<-u})), and
   commits to b_u with SHA-256. The server routes ciphertexts and commitments (U2).
2. ShareCheck: v decrypts and checks every share against its dealer's commitments
   (:mod:`fedft.secagg.feldman`). For each dealer whose shares fail (or do not decrypt), v
   complains and reveals r_{v<-u}'s private key. The server decrypts that one ciphertext
   itself and convicts the dealer (bad ciphertext or bad shares) or the complainer (the
   shares verify; a revealed key that does not match r_{v<-u} is also the complainer's).
   Convicted clients and non-responders leave: U2' (|U2'| >= t), sent as a MaskRequest.
3. MaskedInput: u sends y_u = x_u + PRG(b_u) + sum_{v in U2', v != u} +-PRG(s_uv) in
   Z_{2^64}. U3 = the senders, |U3| >= t.
4. Unmasking: each v in U3 returns its share of b_u for u in U3 and of s_u's key for u in
   U2' minus U3; never both for one u, and only once. The server checks the shares against
   the commitments (only when some share is off the polynomial: :func:`shamir.reconstruct_checked`),
   names the holders of wrong ones, rebuilds every needed secret from t verified shares and
   decodes the sum.

Every client the server convicts is in ``SecAggResult.suspects`` (or ``SecAggAbort.suspects``);
the shell excludes them from later rounds. With at least t honest clients answering, one
client that deals inconsistent shares, complains falsely or reveals wrong shares cannot
abort the round. What it still can do: mask a vector outside the bounds, or share a secret
other than the one it masks with; the sum then fails the server's bounds (the round is
refused, the model unchanged), and a dropped dealer whose rebuilt key does not match its
public key aborts the round naming it.

Threat model: honest-but-curious server; clients may be malicious as above. With t > n/2
no coalition of the server and fewer than t - (n - t) clients learns more than the sum. A
complaint shows the server one dealer's shares to one holder (which the holder, or a
cheating dealer, knew anyway). There are no signatures; deployments authenticate nodes in
the transport (Flower node auth, mTLS).

Ring, quantisation and the error bound: see :mod:`fedft.secagg.masking`.

Derivations (protocol v1; every party must derive the same bytes, so changing one needs a
new version). HKDF contexts follow ``DOMAIN``; r is the round id in 8 bytes, indices in 4,
all big-endian: self mask PRG(b_u, "self-mask" || r || u); pairwise mask
PRG(s_uv, "pair-mask" || r || min(u, v) || max(u, v)), added by the lower index and
subtracted by the higher; share message key HKDF(X25519(c_u, r_{v<-u}), "share-enc" || r),
ChaCha20-Poly1305 with a random 12-byte nonce sent first, associated data DOMAIN || "share"
|| r || u || v and plaintext u || v || key share || seed share (256 bytes each); seed
commitment SHA-256(DOMAIN || "seed-commit" || b_u).
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

from fedft.secagg import feldman, shamir
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
    """The round cannot finish safely: too few clients survive, or a secret cannot be rebuilt.

    Attributes:
        suspects: clients the server convicted of cheating before the abort (excluded from
            later rounds by the shell).
    """

    def __init__(self, message: str, *, suspects: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.suspects = tuple(sorted(set(suspects)))


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
    """Step 0, client -> server: the client's X25519 public keys (32 bytes each).

    ``recv_publics`` maps every other index v of the cohort to the key this client receives
    v's shares under (r_{u<-v}).
    """

    index: int
    enc_public: bytes
    mask_public: bytes
    recv_publics: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyDirectory:
    """Step 0, server -> clients: every advertised key set (U1)."""

    keys: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class ShareKeys:
    """Step 1, client -> server: encrypted shares, b_u's SHA-256 commitment, Feldman commitments.

    ``key_commitments`` / ``seed_commitments``: t group elements each, to the polynomials
    sharing s_u's private key and b_u.
    """

    index: int
    seed_commitment: bytes
    ciphertexts: Mapping[int, bytes] = field(default_factory=dict)
    key_commitments: tuple[bytes, ...] = ()
    seed_commitments: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class RoutedShares:
    """Step 1, server -> client v: ciphertexts addressed to v, every sender's commitments.

    Both mappings are keyed by sender (U2 minus {v}); commitments are ``(key, seed)``.
    """

    ciphertexts: Mapping[int, bytes]
    commitments: Mapping[int, tuple[tuple[bytes, ...], tuple[bytes, ...]]] = field(
        default_factory=dict
    )


@dataclass(frozen=True)
class ShareCheck:
    """Step 2, client -> server: the dealers whose shares failed, with evidence.

    ``complaints`` maps each such dealer u to the private key r_{v<-u} this client received
    its shares under; the server decrypts that one message with it.
    """

    index: int
    complaints: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class MaskRequest:
    """Step 2, server -> clients: U2', the clients that mask with each other."""

    qualified: tuple[int, ...]


@dataclass(frozen=True)
class MaskedInput:
    """Step 3, client -> server: y_u as little-endian uint64 bytes (8 * D)."""

    index: int
    masked: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Step 4, server -> clients: U3, the clients whose masked input arrived."""

    survivors: tuple[int, ...]


@dataclass(frozen=True)
class UnmaskShares:
    """Step 4, client -> server: shares of b_u (u in U3) and of s_u (u in U2' minus U3)."""

    index: int
    seed_shares: Mapping[int, bytes]
    key_shares: Mapping[int, bytes]


@dataclass(frozen=True)
class SecAggResult:
    """What the server learns.

    Attributes:
        total: float64 (D,), the decoded sum over ``included`` clients of their vectors.
        included: U3, the clients whose vectors are in the sum.
        dropped: U2' minus U3, clients that shared keys but never sent masked input.
        suspects: clients convicted of cheating: dealers of shares that fail their
            commitments, false complainers, holders revealing shares that fail the
            commitments at unmasking. The round completed without them (or without their
            wrong shares).
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


def _share_key(private: X25519PrivateKey, public: bytes, round_id: int) -> bytes:
    """The ChaCha20-Poly1305 key of one dealer -> holder share message."""
    return derive_key(_agree(private, public), context=b"share-enc" + _round_bytes(round_id))


def _seal_shares(
    key: bytes, *, round_id: int, sender: int, receiver: int, shares: tuple[int, int]
) -> bytes:
    plaintext = (
        sender.to_bytes(4, "big")
        + receiver.to_bytes(4, "big")
        + shamir.encode_share(shares[0])
        + shamir.encode_share(shares[1])
    )
    nonce = secrets.token_bytes(_NONCE_BYTES)
    aad = _enc_aad(round_id, sender, receiver)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def _open_shares(
    key: bytes, blob: bytes, *, round_id: int, sender: int, receiver: int
) -> tuple[int, int]:
    """Decrypt one share message: ``(key share, seed share)``.

    Raises SecAggProtocolError if it has a bad length, fails authentication, is
    misaddressed or holds a non-field value.
    """
    if len(blob) != _NONCE_BYTES + _PLAINTEXT_BYTES + 16:
        raise SecAggProtocolError(f"share message from {sender} to {receiver} has bad length")
    aad = _enc_aad(round_id, sender, receiver)
    try:
        plain = ChaCha20Poly1305(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise SecAggProtocolError(
            f"share message from {sender} to {receiver} failed authentication"
        ) from exc
    if plain[:8] != sender.to_bytes(4, "big") + receiver.to_bytes(4, "big"):
        raise SecAggProtocolError(f"share message from {sender} to {receiver} misaddressed")
    try:
        key_share = shamir.decode_share(plain[8 : 8 + shamir.SHARE_BYTES])
        seed_share = shamir.decode_share(plain[8 + shamir.SHARE_BYTES :])
    except shamir.ShareError as exc:
        raise SecAggProtocolError(f"share message from {sender}: {exc}") from exc
    return key_share, seed_share


def _shares_verify(
    commitments: tuple[Sequence[int], Sequence[int]], index: int, shares: tuple[int, int]
) -> bool:
    """Whether a holder's key and seed shares both pass the dealer's commitments."""
    return feldman.batch_verify([(commitments[k], index, shares[k]) for k in (0, 1)])


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
    recv_private: Mapping[int, bytes] = field(default_factory=dict)  #: dealer -> r_{u<-v}


class SecAggClient:
    """One client's side of a SecAgg round; call the five steps in order, once each.

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
        self._recv_keys = {
            v: X25519PrivateKey.generate() for v in range(1, params.num_clients + 1) if v != index
        }
        self._seed = secrets.token_bytes(shamir.SECRET_BYTES)
        self._directory: dict[int, AdvertiseKeys] = {}
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (key share, seed share)
        self._u2: tuple[int, ...] = ()  # verified dealers (step 2), then U2' (step 3)
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
            recv_private={v: k.private_bytes_raw() for v, k in self._recv_keys.items()},
        )

    @classmethod
    def from_state(cls, state: SecAggClientState) -> SecAggClient:
        """The client :meth:`export_state` described, ready for its next step."""
        if not 0 <= state.step <= 5:
            raise ValueError(f"client state step {state.step} outside [0, 5]")
        if len(state.seed) != shamir.SECRET_BYTES:
            raise ValueError(
                f"client state seed has {len(state.seed)} bytes, not {shamir.SECRET_BYTES}"
            )
        expected = set(range(1, state.params.num_clients + 1)) - {state.index}
        if set(state.recv_private) != expected:
            raise ValueError("client state lacks a receiving key for some cohort index")
        client = cls(index=state.index, params=state.params)
        client._enc_key = X25519PrivateKey.from_private_bytes(state.enc_private)
        client._mask_key = X25519PrivateKey.from_private_bytes(state.mask_private)
        client._recv_keys = {
            v: X25519PrivateKey.from_private_bytes(k) for v, k in state.recv_private.items()
        }
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
        """Step 0: publish the public keys."""
        self._advance(0, "advertise_keys")
        return self._my_keys()

    def _my_keys(self) -> AdvertiseKeys:
        return AdvertiseKeys(
            index=self.index,
            enc_public=self._enc_key.public_key().public_bytes_raw(),
            mask_public=self._mask_key.public_key().public_bytes_raw(),
            recv_publics={
                v: k.public_key().public_bytes_raw() for v, k in sorted(self._recv_keys.items())
            },
        )

    def share_keys(self, directory: KeyDirectory) -> ShareKeys:
        """Step 1: share the mask key and self-mask seed to U1, with Feldman commitments."""
        self._advance(1, "share_keys")
        keys = {k.index: k for k in directory.keys}
        if keys.get(self.index) != self._my_keys():
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
            if k.index != self.index and self.index not in k.recv_publics:
                raise SecAggProtocolError(f"client {k.index} has no key to receive my shares")
        self._directory = keys
        holders = sorted(keys)
        t = self.params.threshold
        raw_key = self._mask_key.private_bytes_raw()
        key_shares, key_c = shamir.deal(raw_key, threshold=t, indices=holders)
        seed_shares, seed_c = shamir.deal(self._seed, threshold=t, indices=holders)
        self._held[self.index] = (key_shares[self.index], seed_shares[self.index])
        ciphertexts = {
            v: _seal_shares(
                _share_key(self._enc_key, keys[v].recv_publics[self.index], self.params.round_id),
                round_id=self.params.round_id,
                sender=self.index,
                receiver=v,
                shares=(key_shares[v], seed_shares[v]),
            )
            for v in holders
            if v != self.index
        }
        return ShareKeys(
            index=self.index,
            seed_commitment=_commit(self._seed),
            ciphertexts=ciphertexts,
            key_commitments=key_c,
            seed_commitments=seed_c,
        )

    def check_shares(self, routed: RoutedShares) -> ShareCheck:
        """Step 2: decrypt every share and check it against its dealer's commitments.

        A dealer whose message does not decrypt or whose shares fail is complained about,
        with the private key the shares came under; the others' shares are kept.
        """
        self._advance(2, "check_shares")
        if set(routed.commitments) != set(routed.ciphertexts):
            raise SecAggProtocolError(f"client {self.index}: commitments and shares disagree")
        opened: dict[int, tuple[int, int]] = {}
        commitments: dict[int, tuple[list[int], list[int]]] = {}
        complaints: set[int] = set()
        for sender, blob in routed.ciphertexts.items():
            if sender == self.index or sender not in self._directory:
                raise SecAggProtocolError(f"client {self.index}: share from unknown {sender}")
            try:
                key = _share_key(
                    self._recv_keys[sender],
                    self._directory[sender].enc_public,
                    self.params.round_id,
                )
                opened[sender] = _open_shares(
                    key, blob, round_id=self.params.round_id, sender=sender, receiver=self.index
                )
                key_c, seed_c = routed.commitments[sender]
                t = self.params.threshold
                commitments[sender] = (
                    feldman.decode(key_c, threshold=t),
                    feldman.decode(seed_c, threshold=t),
                )
            except (SecAggProtocolError, feldman.CommitmentError) as exc:
                logger.warning(
                    "secagg client %d: complaint against %d: %s", self.index, sender, exc
                )
                complaints.add(sender)
        complaints |= self._failing(opened, commitments, complaints)
        self._held.update({u: sh for u, sh in opened.items() if u not in complaints})
        self._u2 = tuple(sorted(self._held))
        return ShareCheck(
            index=self.index,
            complaints={u: self._recv_keys[u].private_bytes_raw() for u in sorted(complaints)},
        )

    def _failing(
        self,
        opened: Mapping[int, tuple[int, int]],
        commitments: Mapping[int, tuple[list[int], list[int]]],
        skip: set[int],
    ) -> set[int]:
        """Dealers whose opened shares fail their commitments.

        One batched check of all of them, bisected when it fails
        (:func:`fedft.secagg.feldman.failing`).
        """
        items = [u for u in opened if u not in skip]
        batch = [(commitments[u][k], self.index, opened[u][k]) for u in items for k in (0, 1)]
        bad = {items[pos // 2] for pos in feldman.failing(batch)}
        if bad:
            logger.warning("secagg client %d: shares of %s fail their commitments", self.index, bad)
        return bad

    def masked_input(self, request: MaskRequest, vector: np.ndarray) -> MaskedInput:
        """Step 3: mask the vector with the clients in U2' and send it.

        Args:
            request: U2', the qualified clients (a subset of the dealers whose shares this
                client verified, itself included).
            vector: float (D,); already weighted (n_k * x_k and n_k, see
                :mod:`fedft.secagg.encoding`). Entries outside [-clip, clip] are clipped.

        Raises:
            SecAggProtocolError: U2' names a dealer this client holds no verified shares of.
            SecAggAbort: fewer than t clients qualified.
        """
        self._advance(3, "masked_input")
        qualified = set(request.qualified)
        if len(qualified) != len(request.qualified) or self.index not in qualified:
            raise SecAggProtocolError(f"client {self.index}: malformed qualified set")
        if not qualified <= set(self._u2):
            raise SecAggProtocolError(
                f"client {self.index}: qualified set names dealers without verified shares: "
                f"{sorted(qualified - set(self._u2))}"
            )
        if len(qualified) < self.params.threshold:
            raise SecAggAbort(f"only {len(qualified)} clients qualified; t={self.params.threshold}")
        self._u2 = tuple(sorted(qualified))
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

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Step 4: reveal seed shares of survivors and key shares of dropped clients.

        Answers once only: a second request (a server fishing for both shares of one
        client) raises SecAggProtocolError.
        """
        self._advance(4, "unmask")
        survivors = set(request.survivors)
        if len(survivors) != len(request.survivors) or self.index not in survivors:
            raise SecAggProtocolError(f"client {self.index}: malformed survivor list")
        if not survivors <= set(self._u2):
            raise SecAggProtocolError(f"client {self.index}: survivors not all in U2'")
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
    """The server's side: collect, route, resolve complaints, unmask, in order.

    Each ``collect_*`` drops (and logs) messages from clients that are not in the previous
    step's set or that repeat an index; it raises :class:`SecAggAbort` when fewer than t
    usable messages remain. Clients convicted of cheating are in :attr:`convicted`.
    """

    def __init__(self, params: SecAggParams) -> None:
        self.params = params
        self.convicted: set[int] = set()
        self._keys: dict[int, AdvertiseKeys] = {}
        self._commitments: dict[int, bytes] = {}
        self._feldman: dict[int, tuple[list[int], list[int]]] = {}
        self._ciphertexts: dict[int, Mapping[int, bytes]] = {}
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
                f"max_dropouts={self.params.max_dropouts})",
                suspects=sorted(self.convicted),
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
        """Step 0: build the directory U1 from well-formed advertised keys.

        Every key must be a usable X25519 point, with one receiving key for every other
        cohort index.
        """
        self._advance(0, "collect_keys")
        cohort = set(range(1, self.params.num_clients + 1))
        good = []
        for m in self._unique(messages, cohort, "keys"):
            if set(m.recv_publics) != cohort - {m.index} or not all(
                map(_usable, [m.enc_public, m.mask_public, *m.recv_publics.values()])
            ):
                logger.warning("secagg server: client %d advertised unusable keys", m.index)
                continue
            good.append(m)
        self._enough(len(good), "advertised keys")
        self._keys = {m.index: m for m in good}
        return KeyDirectory(keys=tuple(sorted(good, key=lambda m: m.index)))

    def collect_shares(self, messages: Sequence[ShareKeys]) -> dict[int, RoutedShares]:
        """Step 1: U2 = senders of complete shares and well-formed commitments.

        Routes to each v in U2 the ciphertexts addressed to it and every sender's
        commitments.
        """
        self._advance(1, "collect_shares")
        t = self.params.threshold
        good: list[ShareKeys] = []
        for m in self._unique(messages, set(self._keys), "shares"):
            try:
                commitments = (
                    feldman.decode(m.key_commitments, threshold=t),
                    feldman.decode(m.seed_commitments, threshold=t),
                )
            except feldman.CommitmentError as exc:
                logger.warning("secagg server: client %d sent bad commitments: %s", m.index, exc)
                continue
            if set(m.ciphertexts) != set(self._keys) - {m.index} or len(m.seed_commitment) != 32:
                logger.warning("secagg server: client %d sent incomplete shares", m.index)
                continue
            self._feldman[m.index] = commitments
            good.append(m)
        self._enough(len(good), "shared keys")
        self._u2 = tuple(sorted(m.index for m in good))
        self._commitments = {m.index: m.seed_commitment for m in good}
        self._ciphertexts = {m.index: m.ciphertexts for m in good}
        public = {m.index: (m.key_commitments, m.seed_commitments) for m in good}
        return {
            v: RoutedShares(
                ciphertexts={m.index: m.ciphertexts[v] for m in good if m.index != v},
                commitments={u: c for u, c in public.items() if u != v},
            )
            for v in self._u2
        }

    def collect_checks(self, messages: Sequence[ShareCheck]) -> MaskRequest:
        """Step 2: resolve every complaint; U2' = responders minus the convicted."""
        self._advance(2, "collect_checks")
        checks = self._unique(messages, set(self._u2), "share check")
        for m in checks:
            for dealer, evidence in sorted(m.complaints.items()):
                if dealer not in self._u2 or dealer == m.index:
                    self._convict(m.index, f"complained about {dealer}, not a dealer of its")
                    continue
                if dealer in self.convicted:  # proven already: its shares are dropped anyway
                    continue
                guilty, why = self._resolve(m.index, dealer, evidence)
                self._convict(guilty, why)
        qualified = tuple(sorted({m.index for m in checks} - self.convicted))
        self._enough(len(qualified), "qualified after the share check")
        self._u2 = qualified
        return MaskRequest(qualified=qualified)

    def _convict(self, index: int, why: str) -> None:
        if index not in self.convicted:
            logger.warning("secagg round %d: client %d %s", self.params.round_id, index, why)
        self.convicted.add(index)

    def _resolve(self, holder: int, dealer: int, evidence: bytes) -> tuple[int, str]:
        """Who cheated: ``(index, why)``.

        Decrypts the one ciphertext the complaint is about with the revealed receiving key
        and checks its shares against the dealer's commitments.
        """
        try:
            private = X25519PrivateKey.from_private_bytes(evidence)
        except ValueError:
            return holder, f"revealed a malformed key in its complaint about {dealer}"
        if private.public_key().public_bytes_raw() != self._keys[holder].recv_publics[dealer]:
            return holder, f"revealed a key it did not advertise in its complaint about {dealer}"
        try:
            key = _share_key(private, self._keys[dealer].enc_public, self.params.round_id)
            shares = _open_shares(
                key,
                self._ciphertexts[dealer][holder],
                round_id=self.params.round_id,
                sender=dealer,
                receiver=holder,
            )
        except SecAggProtocolError as exc:
            return dealer, f"dealt an unreadable share message to {holder} ({exc})"
        if not _shares_verify(self._feldman[dealer], holder, shares):
            return dealer, f"dealt {holder} shares that fail its commitments"
        return holder, f"complained falsely about {dealer} (the shares verify)"

    def collect_masked(self, messages: Sequence[MaskedInput]) -> UnmaskRequest:
        """Step 3: U3 = senders of a well-formed masked vector (in U2')."""
        self._advance(3, "collect_masked")
        size = 8 * self.params.vector_length
        for m in self._unique(messages, set(self._u2), "masked input"):
            if len(m.masked) != size:
                logger.warning("secagg server: client %d sent %d bytes", m.index, len(m.masked))
                continue
            self._masked[m.index] = np.frombuffer(m.masked, dtype="<u8").astype(np.uint64)
        self._enough(len(self._masked), "sent masked input")
        return UnmaskRequest(survivors=tuple(sorted(self._masked)))

    def collect_unmasking(self, messages: Sequence[UnmaskShares]) -> SecAggResult:
        """Step 4: rebuild the needed secrets from verified shares and decode the sum.

        Raises:
            SecAggAbort: fewer than t responses, fewer than t verified shares of some
                secret, or a dropped dealer's rebuilt key is not its advertised one.
        """
        self._advance(4, "collect_unmasking")
        survivors = tuple(sorted(self._masked))
        dropped = tuple(u for u in self._u2 if u not in self._masked)
        responses = self._unique(messages, set(survivors), "unmasking shares")
        self._enough(len(responses), "answered the unmasking step")
        total = np.zeros(self.params.vector_length, dtype=np.uint64)
        for y in self._masked.values():
            total = total + y
        for u in survivors:
            verify = partial(_seed_matches, self._commitments[u])
            seed = self._rebuild(self._gather(responses, u, seeds=True), u, 1, verify)
            total = total - _self_mask(seed, params=self.params, u=u)
        for u in dropped:
            verify = partial(_key_matches, self._keys[u].mask_public)
            raw = self._rebuild(self._gather(responses, u, seeds=False), u, 0, verify)
            key = X25519PrivateKey.from_private_bytes(raw)
            for v in survivors:
                secret = _agree(key, self._keys[v].mask_public)
                total = total - _pair_mask(secret, params=self.params, u=v, v=u)
        logger.info(
            "secagg round %d: summed %d clients (t=%d), %d dropped before masking, %d convicted",
            self.params.round_id,
            len(survivors),
            self.params.threshold,
            len(dropped),
            len(self.convicted),
        )
        return SecAggResult(
            total=dequantize(total, frac_bits=self.params.frac_bits),
            included=survivors,
            dropped=dropped,
            suspects=tuple(sorted(self.convicted)),
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
                self._convict(r.index, f"sent a malformed share of {u}")
        return shares

    def _rebuild(
        self, shares: Mapping[int, int], u: int, which: int, verify: Callable[[bytes], bool]
    ) -> bytes:
        """Secret ``which`` (0 key, 1 seed) of client ``u``; holders of wrong shares convicted.

        The shares of holders convicted already (e.g. of a wrong share of an earlier secret)
        are left out while t others remain, so one lying holder costs one search for the
        wrong share, not one per secret.
        """
        honest = {h: v for h, v in shares.items() if h not in self.convicted}
        if len(honest) >= self.params.threshold:
            shares = honest
        try:
            secret, wrong = shamir.reconstruct_checked(
                shares,
                threshold=self.params.threshold,
                commitments=self._feldman[u][which],
                verify=verify,
            )
        except shamir.DealerError as exc:
            self._convict(u, f"shared another secret than it committed to ({exc})")
            raise SecAggAbort(
                f"secure aggregation aborted: secret of client {u}: {exc}",
                suspects=sorted(self.convicted),
            ) from exc
        except shamir.ShareError as exc:
            for h in sorted(exc.wrong):
                self._convict(h, f"revealed a share of {u} that fails the commitments")
            raise SecAggAbort(
                f"secure aggregation aborted: secret of client {u}: {exc}",
                suspects=sorted(self.convicted),
            ) from exc
        for h in sorted(wrong):
            self._convict(h, f"revealed a share of {u} that fails the commitments")
        return secret


def _usable(public: bytes) -> bool:
    """A 32-byte X25519 public key that is not a low-order point (its agreement is not 0)."""
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        return False
    return True


_PROBE = X25519PrivateKey.generate()


def _seed_matches(commitment: bytes, seed: bytes) -> bool:
    return _commit(seed) == commitment


def _key_matches(public: bytes, raw_private: bytes) -> bool:
    key = X25519PrivateKey.from_private_bytes(raw_private)
    return key.public_key().public_bytes_raw() == public
