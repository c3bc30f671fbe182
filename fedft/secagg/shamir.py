"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Source: A. Shamir, "How to share a secret", CACM 22(11), 1979. A secret s (an integer below
the prime) is the constant term of a random polynomial f of degree t - 1; share i is
(i, f(i)) for i = 1..n. Any t shares give s by Lagrange interpolation at 0; t - 1 shares are
independent of s. The field is the Mersenne prime 2^521 - 1, so a 32-byte secret (an X25519
private key or a mask seed) is one field element.

Shamir shares carry no integrity: a wrong share silently gives a wrong secret. Callers
verify a reconstruction against a public commitment (see :func:`reconstruct_verified`).
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable, Mapping, Sequence

PRIME = 2**521 - 1
"""The field modulus (a Mersenne prime, 521 bits)."""

SECRET_BYTES = 32
"""Secrets are 32-byte strings (X25519 keys, mask seeds)."""

SHARE_BYTES = 66
"""A field element serialised big-endian: ceil(521 / 8) bytes."""

MAX_SUBSETS = 4096
"""How many t-subsets :func:`reconstruct_verified` tries before giving up."""


class ShareError(ValueError):
    """Shares are malformed, too few, or reconstruct a secret that fails verification."""


def split(secret: bytes, *, threshold: int, indices: Sequence[int]) -> dict[int, int]:
    """Split a 32-byte secret into shares, any ``threshold`` of which recover it.

    Args:
        secret: exactly 32 bytes.
        threshold: t >= 1, the number of shares needed.
        indices: distinct evaluation points in [1, PRIME) (the holders' client indices),
            at least ``threshold`` of them.

    Returns:
        index -> share value f(index) in [0, PRIME).
    """
    if len(secret) != SECRET_BYTES:
        raise ShareError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    _check_indices(indices)
    if not 1 <= threshold <= len(indices):
        raise ShareError(f"threshold {threshold} must be in [1, {len(indices)}]")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {i: _eval_poly(coeffs, i) for i in indices}


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


def reconstruct_verified(
    shares: Mapping[int, int], *, threshold: int, verify: Callable[[bytes], bool]
) -> bytes:
    """Reconstruct a secret and check it against a commitment, tolerating bad shares.

    Tries t-subsets of the shares (first the first t, then others, at most
    :data:`MAX_SUBSETS`) until ``verify`` accepts the secret. With at least t honest
    shares among those given, and bad shares no more than the surplus, one subset is all
    honest and the secret is found.

    Args:
        shares: index -> share value, at least ``threshold`` of them.
        threshold: t, the polynomial degree plus one.
        verify: returns True for the committed secret (e.g. recomputes a public key).

    Returns:
        the verified 32-byte secret.

    Raises:
        ShareError: fewer than t shares, or no t-subset verifies.
    """
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares, got {len(shares)}")
    items = sorted(shares.items())
    for n_tried, subset in enumerate(itertools.combinations(items, threshold)):
        if n_tried >= MAX_SUBSETS:
            break
        try:
            secret = reconstruct(dict(subset))
        except ShareError:
            continue
        if verify(secret):
            return secret
    raise ShareError(
        f"no {threshold}-subset of the {len(shares)} shares from indices "
        f"{[i for i, _ in items]} reconstructs the committed secret (tampered shares)"
    )


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
