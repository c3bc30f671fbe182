"""Shamir t-of-n secret sharing over Z_q, q the order of the Feldman group, with commitments.

Source: A. Shamir, "How to share a secret", CACM 22(11), 1979. A secret s (an integer below
the prime) is the constant term of a random polynomial f of degree t - 1; share i is
(i, f(i)) for i = 1..n. Any t shares give s by Lagrange interpolation at 0; t - 1 shares are
independent of s. The field is Z_q with q the 2047-bit prime order of
:mod:`fedft.secagg.feldman`'s group, so a 32-byte secret (an X25519 private key or a mask
seed) is one field element and every share can be checked against the dealer's Feldman
commitments (:func:`deal` returns them).

Shamir shares alone carry no integrity: a wrong share silently gives a wrong secret.
:func:`reconstruct_checked` therefore takes the dealer's commitments: on honest shares it is
one interpolation and a consistency check of the spare shares; when some share is off the
polynomial, every share is checked against the commitments, the holders of the wrong ones
are named, and the secret is rebuilt from t shares that verify.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence

from fedft.secagg import feldman

PRIME = feldman.Q
"""The field modulus: the Feldman group's prime order (2047 bits)."""

SECRET_BYTES = 32
"""Secrets are 32-byte strings (X25519 keys, mask seeds)."""

SHARE_BYTES = feldman.ELEMENT_BYTES
"""A field element serialised big-endian (256 bytes)."""


class ShareError(ValueError):
    """Shares are malformed, too few, or reconstruct a secret that fails verification.

    Attributes:
        wrong: indices whose shares failed the dealer's commitments (when checked).
    """

    def __init__(self, message: str, *, wrong: set[int] | None = None) -> None:
        super().__init__(message)
        self.wrong = set(wrong or ())


class DealerError(ShareError):
    """Shares that verify against the commitments rebuild a secret that fails ``verify``."""


def split(secret: bytes, *, threshold: int, indices: Sequence[int]) -> dict[int, int]:
    """Split a 32-byte secret into shares, any ``threshold`` of which recover it.

    :func:`deal` without the commitments.
    """
    return deal(secret, threshold=threshold, indices=indices)[0]


def deal(
    secret: bytes, *, threshold: int, indices: Sequence[int]
) -> tuple[dict[int, int], tuple[bytes, ...]]:
    """Share a 32-byte secret and commit to the polynomial (Feldman).

    Args:
        secret: exactly 32 bytes.
        threshold: t >= 1, the number of shares needed.
        indices: distinct evaluation points in [1, PRIME) (the holders' client indices),
            at least ``threshold`` of them.

    Returns:
        ``(shares, commitments)``: index -> f(index) in [0, PRIME), and the t serialised
        commitments g^{a_j} (:func:`fedft.secagg.feldman.commit`, constant term first).
    """
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    _check_indices(indices)
    if not 1 <= threshold <= len(indices):
        raise ShareError(f"threshold {threshold} must be in [1, {len(indices)}]")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {i: _eval_poly(coeffs, i) for i in indices}, feldman.commit(coeffs)


def reconstruct(shares: Mapping[int, int]) -> bytes:
    """Lagrange-interpolate f(0) from the given shares (all of them are used).

    Args:
        shares: index -> share value; pass exactly t shares (more are fine when they
            lie on the same polynomial).

    Returns:
        the 32-byte secret.

    Raises:
        ShareError: malformed shares, or the interpolated value is not a 32-byte secret
            (a sure sign of a wrong share or too few shares).
    """
    if not shares:
        raise ShareError("no shares to reconstruct from")
    _check_indices(list(shares))
    for i, y in shares.items():
        if not 0 <= y < PRIME:
            raise ShareError(f"share of index {i} is outside the field")
    secret = 0
    xs = list(shares)
    for i in xs:
        num, den = 1, 1
        for j in xs:
            if j != i:
                num = num * (-j) % PRIME
                den = den * (i - j) % PRIME
        secret = (secret + shares[i] * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("reconstructed value is not a 32-byte secret (wrong or missing shares)")
    return secret.to_bytes(SECRET_BYTES, "big")


def _interpolate(points: Sequence[tuple[int, int]]) -> list[int]:
    """The polynomial of degree < len(points) through ``points`` (Lagrange, O(k^2)).

    The master polynomial M(x) = prod_j (x - x_j) is built once; each Lagrange basis
    polynomial is M(x) / (x - x_i) by synthetic division. Returns the coefficients,
    constant term first.
    """
    k = len(points)
    master = [1]  # constant first
    for xj, _ in points:
        master = (
            [(-xj * master[0]) % PRIME]
            + [(master[d - 1] - xj * master[d]) % PRIME for d in range(1, len(master))]
            + [master[-1]]
        )
    coeffs = [0] * k
    for xi, yi in points:
        basis = [0] * k  # M(x) / (x - xi), degree k - 1
        basis[k - 1] = master[k]
        for d in range(k - 1, 0, -1):
            basis[d - 1] = (master[d] + xi * basis[d]) % PRIME
        den = 1
        for xj, _ in points:
            if xj != xi:
                den = den * (xi - xj) % PRIME
        scale = yi * pow(den, -1, PRIME) % PRIME
        for d in range(k):
            coeffs[d] = (coeffs[d] + scale * basis[d]) % PRIME
    return coeffs


def reconstruct_checked(
    shares: Mapping[int, int],
    *,
    threshold: int,
    commitments: Sequence[int],
    verify: Callable[[bytes], bool],
) -> tuple[bytes, set[int]]:
    """Rebuild a secret from shares checked against the dealer's Feldman commitments.

    Fast path (honest shares): interpolate t shares, check that every other share lies on
    the same polynomial and that ``verify`` accepts f(0). Otherwise the shares are checked
    against ``commitments`` in one batched check, bisected to the ones that fail
    (:func:`fedft.secagg.feldman.failing`); those are wrong (their holders lied: they were
    dealt verified shares), and the secret is interpolated from t shares that pass.

    Args:
        shares: index -> share value.
        threshold: t, the polynomial degree plus one.
        commitments: the dealer's t commitments, decoded (:func:`fedft.secagg.feldman.decode`).
        verify: returns True for the committed secret (e.g. recomputes a public key).

    Returns:
        ``(secret, wrong)``: the 32-byte secret and the indices whose shares failed.

    Raises:
        ShareError: fewer than t shares pass.
        DealerError: t verified shares give a value ``verify`` refuses: the dealer shared
            another secret than the one it committed to elsewhere.
    """
    _check_indices(list(shares))
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares, got {len(shares)}")
    points = sorted(shares.items())
    f = _interpolate(points[:threshold])
    if all(_eval_poly(f, x) == y for x, y in points[threshold:]):
        secret = _to_secret(f[0])
        if secret is not None and verify(secret):
            return secret, set()
    failed = feldman.failing([(commitments, x, y) for x, y in points])
    good = [p for k, p in enumerate(points) if k not in failed]
    wrong = {points[k][0] for k in failed}
    if len(good) < threshold:
        raise ShareError(
            f"only {len(good)} of {len(points)} shares match the dealer's commitments "
            f"(wrong: {sorted(wrong)}); need {threshold}",
            wrong=wrong,
        )
    secret = _to_secret(_interpolate(good[:threshold])[0])
    if secret is None or not verify(secret):
        raise DealerError(
            "the shares match the dealer's commitments but rebuild a secret that is not the "
            "one it committed to (its public key or seed commitment)"
        )
    return secret, wrong


def _to_secret(value: int) -> bytes | None:
    if value >= 1 << (8 * SECRET_BYTES):
        return None
    return value.to_bytes(SECRET_BYTES, "big")


def encode_share(value: int) -> bytes:
    """Serialise a field element as :data:`SHARE_BYTES` big-endian bytes."""
    if not 0 <= value < PRIME:
        raise ShareError("share value outside the field")
    return value.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Parse :func:`encode_share` output, checking length and range."""
    if len(data) != SHARE_BYTES:
        raise ShareError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise ShareError("share value outside the field")
    return value


def _eval_poly(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def _check_indices(indices: Sequence[int]) -> None:
    if len(set(indices)) != len(indices):
        raise ShareError(f"share indices must be distinct, got {sorted(indices)}")
    for i in indices:
        if not 0 < i < PRIME:
            raise ShareError(f"share index {i} must be a positive field element")
