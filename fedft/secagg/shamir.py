"""Shamir t-of-n secret sharing over the prime field GF(2^521 - 1).

Source: A. Shamir, "How to share a secret", CACM 22(11), 1979. A secret s (an integer below
the prime) is the constant term of a random polynomial f of degree t - 1; share i is
(i, f(i)) for i = 1..n. Any t shares give s by Lagrange interpolation at 0; t - 1 shares are
independent of s. The field is the Mersenne prime 2^521 - 1, so a 32-byte secret (an X25519
private key or a mask seed) is one field element.

Shamir shares carry no integrity: a wrong share silently gives a wrong secret. Shares are
a Reed-Solomon codeword (the evaluations of a degree t - 1 polynomial), so
:func:`decode_shares` corrects up to floor((m - t) / 2) wrong shares among m and names the
holders whose shares were wrong (Berlekamp-Welch: E. Berlekamp and L. Welch, US patent
4,633,470, 1986; the linear-system form in e.g. Gemmell and Sudan, IPL 43(4), 1992). Callers
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


def _solve(rows: list[list[int]], rhs: list[int], unknowns: int) -> list[int] | None:
    """One solution of the linear system over GF(PRIME) (free variables 0), or None."""
    m = len(rows)
    a = [row[:] + [b] for row, b in zip(rows, rhs, strict=True)]
    pivots: list[int] = []
    r = 0
    for c in range(unknowns):
        pivot = next((i for i in range(r, m) if a[i][c]), None)
        if pivot is None:
            continue
        a[r], a[pivot] = a[pivot], a[r]
        inv = pow(a[r][c], -1, PRIME)
        a[r] = [v * inv % PRIME for v in a[r]]
        for i in range(m):
            if i != r and a[i][c]:
                f = a[i][c]
                a[i] = [(vi - f * vr) % PRIME for vi, vr in zip(a[i], a[r], strict=True)]
        pivots.append(c)
        r += 1
        if r == m:
            break
    if any(a[i][unknowns] for i in range(r, m)):
        return None  # inconsistent
    x = [0] * unknowns
    for i, c in enumerate(pivots):
        x[c] = a[i][unknowns]
    return x


def _poly_divide(num: list[int], den: list[int]) -> tuple[list[int], list[int]]:
    """(quotient, remainder) of polynomials over GF(PRIME), constant term first."""
    num = num[:]
    while len(den) > 1 and den[-1] == 0:
        den = den[:-1]
    inv = pow(den[-1], -1, PRIME)
    quotient = [0] * max(1, len(num) - len(den) + 1)
    for d in range(len(num) - len(den), -1, -1):
        coef = num[d + len(den) - 1] * inv % PRIME
        quotient[d] = coef
        for j, dj in enumerate(den):
            num[d + j] = (num[d + j] - coef * dj) % PRIME
    return quotient, num[: len(den) - 1]


def decode_shares(shares: Mapping[int, int], *, threshold: int) -> tuple[bytes, set[int]]:
    """Reed-Solomon decode: the secret and the indices whose shares were wrong.

    With m shares of a degree t - 1 polynomial of which at most e = floor((m - t) / 2) are
    wrong, the polynomial is unique and found in polynomial time (Berlekamp-Welch: solve
    Q(x_i) = y_i E(x_i) for E monic of degree e and Q of degree < t + e; f = Q / E). The
    shares that f does not pass through are the wrong ones. Without errors this is one
    interpolation through t shares plus a check of the rest.

    Raises:
        ShareError: fewer than t shares, more errors than the code corrects, or f(0) is not
            a 32-byte secret.
    """
    _check_indices(list(shares))
    t, m = threshold, len(shares)
    if m < t:
        raise ShareError(f"need {t} shares, got {m}")
    points = sorted(shares.items())
    f = _interpolate(points[:t])
    wrong = {x for x, y in points if _eval_poly(f, x) != y}
    if wrong:
        f = []
        for e in range(1, (m - t) // 2 + 1):
            # unknowns: E_0..E_{e-1} (E_e = 1), Q_0..Q_{t+e-1}
            rows, rhs = [], []
            for x, y in points:
                row = [(-y * pow(x, j, PRIME)) % PRIME for j in range(e)]
                row += [pow(x, j, PRIME) for j in range(t + e)]
                rows.append(row)
                rhs.append(y * pow(x, e, PRIME) % PRIME)
            sol = _solve(rows, rhs, e + t + e)
            if sol is None:
                continue
            quotient, remainder = _poly_divide(sol[e:], [*sol[:e], 1])
            if any(remainder):
                continue
            candidate = (quotient + [0] * t)[:t]
            bad = {x for x, y in points if _eval_poly(candidate, x) != y}
            if len(bad) <= e:
                f, wrong = candidate, bad
                break
        if not f:
            raise ShareError(
                f"{m} shares of threshold {t}: more wrong shares than the "
                f"{(m - t) // 2} this many can correct"
            )
    secret = f[0]
    if secret >= 1 << (8 * SECRET_BYTES):
        raise ShareError("reconstructed value is not a 32-byte secret (wrong or missing shares)")
    return secret.to_bytes(SECRET_BYTES, "big"), wrong


def reconstruct_verified(
    shares: Mapping[int, int],
    *,
    threshold: int,
    verify: Callable[[bytes], bool],
    wrong: set[int] | None = None,
) -> bytes:
    """Reconstruct a secret and check it against a commitment, tolerating bad shares.

    First Reed-Solomon decoding (:func:`decode_shares`): corrects up to half the surplus
    of wrong shares at polynomial cost and names the holders of the wrong ones (added to
    ``wrong`` when given). If that fails or does not verify, t-subsets are tried (at most
    :data:`MAX_SUBSETS`) until ``verify`` accepts the secret: with at least t honest shares
    and bad shares no more than the surplus, one subset is all honest.

    Args:
        shares: index -> share value, at least ``threshold`` of them.
        threshold: t, the polynomial degree plus one.
        verify: returns True for the committed secret (e.g. recomputes a public key).
        wrong: a set that receives the indices whose shares decoding found wrong.

    Returns:
        the verified 32-byte secret.

    Raises:
        ShareError: fewer than t shares, or no t-subset verifies.
    """
    if len(shares) < threshold:
        raise ShareError(f"need {threshold} shares, got {len(shares)}")
    try:
        secret, bad = decode_shares(shares, threshold=threshold)
    except ShareError:
        pass
    else:
        if verify(secret):
            if wrong is not None:
                wrong |= bad
            return secret
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
