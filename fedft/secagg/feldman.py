"""Feldman verifiable secret sharing in a prime-order subgroup of Z_p^* (p a 2048-bit safe prime).

Source: P. Feldman, "A practical scheme for non-interactive verifiable secret sharing",
FOCS 1987. A dealer sharing f(x) = a_0 + a_1 x + ... + a_{t-1} x^{t-1} over Z_q publishes
C_j = g^{a_j}; the holder of share (i, s) checks g^s == prod_j C_j^{i^j}. Shares that pass
lie on one polynomial of degree t - 1, so a dealer cannot hand out inconsistent shares
unnoticed, and a holder cannot later reveal a share other than the one it was dealt.

Group: p is the 2048-bit MODP prime of RFC 3526 (group 14), a safe prime p = 2q + 1 with q
prime (2047 bits); g = 4 generates the subgroup of quadratic residues, of prime order q.
Shares are elements of Z_q (:data:`fedft.secagg.shamir.PRIME` is this q). Commitments are
any integers in [1, p); the check is made on squares, g^{2s} == (prod_j C_j^{i^j})^2: squaring
maps Z_p^* onto the order-q subgroup, so an element outside it (e.g. -C) cannot make a
check pass or fail depending on who checks it, and batched checks stay sound (every
squared element has prime order q > 2^64, see :func:`failing`).

Secrecy: C_0 = g^{a_0} reveals g^{secret}; recovering a 256-bit secret from it costs about
2^128 group operations (Pollard's kangaroo), and 2048-bit p gives about 112-bit security
against index calculus. Exponentiations use gmpy2 (GMP) and, for g, a fixed-base table; they
are not constant-time, as Python's integers are not either.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Sequence

import gmpy2

P = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22"
    "514A08798E3404DDEF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6"
    "F44C42E9A637ED6B0BFF5CB6F406B7EDEE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3D"
    "C2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F83655D23DCA3AD961C62F356208552BB"
    "9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3BE39E772C180E8603"
    "9B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AACAA68FFFFFFFFFFFFFFFF",
    16,
)
"""The modulus: RFC 3526's 2048-bit MODP prime, a safe prime (p = 2q + 1)."""

Q = (P - 1) // 2
"""The group order (prime, 2047 bits): the field of the shares."""

G = 4
"""Generator of the order-q subgroup (a quadratic residue other than 1)."""

ELEMENT_BYTES = 256
"""A commitment serialised big-endian."""

_P = gmpy2.mpz(P)
_G = gmpy2.mpz(G)
_WINDOW = 4  # fixed-base table: 512 rows of 16 powers (2 MiB), built once per process


@functools.cache
def _table() -> tuple[tuple[gmpy2.mpz, ...], ...]:
    """Row k holds g^(d * 16^k) for d = 0..15."""
    rows = []
    base = _G
    for _ in range((P.bit_length() + _WINDOW - 1) // _WINDOW):
        row = [gmpy2.mpz(1)]
        for _ in range((1 << _WINDOW) - 1):
            row.append(row[-1] * base % _P)
        rows.append(tuple(row))
        base = row[-1] * base % _P
    return tuple(rows)


def _gpow(exponent: int) -> gmpy2.mpz:
    """g^exponent mod p from the fixed-base table (about 3x faster than powmod)."""
    table, acc, k, e = _table(), gmpy2.mpz(1), 0, exponent % Q
    mask = (1 << _WINDOW) - 1
    while e:
        if e & mask:
            acc = acc * table[k][e & mask] % _P
        e >>= _WINDOW
        k += 1
    return acc


class CommitmentError(ValueError):
    """A commitment is malformed (wrong count, length or range)."""


def commit(coeffs: Sequence[int]) -> tuple[bytes, ...]:
    """C_j = g^{a_j} for the polynomial's coefficients (constant term first), serialised."""
    return tuple(encode(int(_gpow(c))) for c in coeffs)


def encode(element: int) -> bytes:
    """Serialise a group element (an integer in [1, p))."""
    return element.to_bytes(ELEMENT_BYTES, "big")


def decode(blobs: Sequence[bytes], *, threshold: int) -> list[int]:
    """Parse ``threshold`` commitments; each must be :data:`ELEMENT_BYTES` bytes in [1, p)."""
    if len(blobs) != threshold:
        raise CommitmentError(f"expected {threshold} commitments, got {len(blobs)}")
    out = []
    for j, blob in enumerate(blobs):
        if len(blob) != ELEMENT_BYTES:
            raise CommitmentError(f"commitment {j} has {len(blob)} bytes, not {ELEMENT_BYTES}")
        value = int.from_bytes(blob, "big")
        if not 1 <= value < P:
            raise CommitmentError(f"commitment {j} is not an element of Z_p^*")
        out.append(value)
    return out


def evaluate(commitments: Sequence[int], index: int) -> gmpy2.mpz:
    """prod_j C_j^{index^j} (Horner in the exponent: t small exponentiations)."""
    acc = gmpy2.mpz(commitments[-1])
    for c in reversed(commitments[:-1]):
        acc = gmpy2.powmod(acc, index, _P) * c % _P
    return acc


def verify(commitments: Sequence[int], index: int, share: int) -> bool:
    """Whether ``share`` is the dealt polynomial's value at ``index`` (checked on squares)."""
    if not 0 <= share < Q:
        return False
    lhs = _gpow(2 * share % Q)
    return bool(lhs == gmpy2.powmod(evaluate(commitments, index), 2, _P))


def batch_verify(items: Sequence[tuple[Sequence[int], int, int]]) -> bool:
    """Whether every ``(commitments, index, share)`` passes :func:`verify`, batched.

    One batched check; its soundness is derived in :func:`failing`.
    """
    batch = _Batch(items)
    return not batch.out_of_range and batch.passes(batch.live)


def failing(items: Sequence[tuple[Sequence[int], int, int]]) -> set[int]:
    """Positions in ``items`` of the ``(commitments, index, share)`` that fail :func:`verify`.

    One batched check when every item passes; a failed batch is bisected, never checked
    item by item.

    The batch check. Item k holds E_k = :func:`evaluate` (commitments, index) and a share
    s_k; it passes :func:`verify` iff d_k = 2 s_k - log_g(E_k^2) is 0 mod q (squares lie in
    the order-q subgroup, where log_g is defined). With fresh random odd 64-bit r_k
    (``secrets``), a set B of items passes the batch check g^{2 sum_B r_k s_k} ==
    (prod_B E_k^{r_k})^2 iff sum_B r_k d_k = 0 mod q. Complete: a B of passing items
    always passes. Sound: if some k0 in B fails (d_k0 != 0), then for any values of the
    other r_k at most one r_k0 mod q satisfies the equation, and the 2^63 odd 64-bit values
    of r_k0 are distinct mod q (q > 2^64), so B passes with probability <= 2^-63.

    The bisection. The r_k are drawn once and the powers E_k^{r_k} and exponents r_k s_k
    computed once per item; checking a subset then costs its products and one
    exponentiation of g. The subsets checked are nodes of a fixed binary tree over the
    positions (halves of halves), at most 2m - 1 for m items, fixed before the r_k are
    drawn. A failed node is split; when its left half passes, the right half fails by
    algebra (the node's check is the product of its halves'), so only the left one is
    checked; a failed leaf is a failing item. The answer is exact unless some checked node
    that holds a failing item passes: by the union bound over the tree's nodes, probability
    <= (2m - 1) * 2^-63 (< 2^-55 for the 78 shares a client checks at 40 clients). Each
    failing item adds at most two checks per level of the tree: one failing item among m
    costs at most 1 + 2 ceil(log2 m) exponentiations of g instead of m.
    """
    batch = _Batch(items)
    bad = set(batch.out_of_range)

    def search(block: Sequence[int]) -> None:  # ``block`` failed its check
        if len(block) == 1:
            bad.add(block[0])
            return
        left, right = block[: len(block) // 2], block[len(block) // 2 :]
        if batch.passes(left):
            search(right)  # it fails: block = left * right
            return
        search(left)
        if not batch.passes(right):
            search(right)

    if batch.live and not batch.passes(batch.live):
        search(batch.live)
    return bad


class _Batch:
    """Items prepared for batched checks (see :func:`failing`).

    E_k^{r_k} and r_k s_k for fresh random odd 64-bit r_k, computed once per item.
    """

    def __init__(self, items: Sequence[tuple[Sequence[int], int, int]]) -> None:
        self.out_of_range = [k for k, (_, _, s) in enumerate(items) if not 0 <= s < Q]
        self.live = [k for k, (_, _, s) in enumerate(items) if 0 <= s < Q]
        self.powers: dict[int, gmpy2.mpz] = {}
        self.exponents: dict[int, int] = {}
        for k in self.live:
            commitments, index, share = items[k]
            r = secrets.randbits(64) | 1
            self.powers[k] = gmpy2.powmod(evaluate(commitments, index), r, _P)
            self.exponents[k] = r * share % Q

    def passes(self, block: Sequence[int]) -> bool:
        """g^{2 sum_B r_k s_k} == (prod_B E_k^{r_k})^2 for the items ``block``."""
        rhs = gmpy2.mpz(1)
        for k in block:
            rhs = rhs * self.powers[k] % _P
        lhs = _gpow(2 * sum(self.exponents[k] for k in block) % Q)
        return bool(lhs == gmpy2.powmod(rhs, 2, _P))
