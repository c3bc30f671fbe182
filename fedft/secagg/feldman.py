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
squared element has prime order q > 2^64, see :func:`batch_verify`).

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

    One check instead of one per item: g^{2 sum r_k s_k} == (prod_k E_k^{r_k})^2 with fresh
    random odd 64-bit r_k and E_k = :func:`evaluate`.
    Every squared element has order q (or 1), so if some item fails its own check the
    batch passes with probability at most 2^-63. On False, check the items one by one to
    find the bad ones.
    """
    exponent = 0
    rhs = gmpy2.mpz(1)
    for commitments, index, share in items:
        if not 0 <= share < Q:
            return False
        r = secrets.randbits(64) | 1
        exponent = (exponent + r * share) % Q
        rhs = rhs * gmpy2.powmod(evaluate(commitments, index), r, _P) % _P
    lhs = _gpow(2 * exponent % Q)
    return bool(lhs == gmpy2.powmod(rhs, 2, _P))
