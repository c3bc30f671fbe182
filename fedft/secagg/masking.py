"""Fixed-point encoding into the ring Z_{2^64} and ChaCha20 mask expansion.

Quantisation (client side): a float x is clipped to [-clip, clip] and mapped to the integer
round(x * 2^frac_bits) modulo 2^64 (two's complement). Sums of n encoded values are exact
in the ring; decoding reads the ring sum as a signed 64-bit integer and divides by
2^frac_bits. Decoding is correct while the true integer sum stays inside
[-2^63, 2^63), which :func:`check_ring_capacity` guarantees by requiring
n * clip * 2^frac_bits < 2^63. The only error is rounding: at most 2^(-frac_bits-1) per
value, so at most n * 2^(-frac_bits-1) on a sum of n values (plus whatever clipping
removed from values outside [-clip, clip]).

Masks (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS 2017, §4): a 32-byte seed is stretched into uniform ring elements with the
ChaCha20 stream cipher keyed by HKDF-SHA256 of the seed and a context string that binds
the protocol version, the round and the pair. Never numpy's Mersenne Twister (whose
32-bit seeding makes masks guessable).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RING_BITS = 64
"""Masked vectors live in Z_{2^64}: numpy uint64 arithmetic wraps modulo 2^64."""

DOMAIN = b"fedft/secagg/v1/"
"""Prefix of every key-derivation context (protocol version 1)."""

MAX_VECTOR_LENGTH = 1 << 28
"""Largest vector (entries) a mask is expanded for: 2 GiB of uint64."""


def derive_key(secret: bytes, *, context: bytes) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with info = DOMAIN + context: 32 bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=DOMAIN + context).derive(
        secret
    )


def expand_mask(seed: bytes, *, length: int, context: bytes) -> np.ndarray:
    """Stretch a seed into ``length`` uniform elements of Z_{2^64}.

    Args:
        seed: a secret of at least 32 bytes (an X25519 shared secret or a self-mask seed).
        length: D, the number of ring elements.
        context: binds the use (round, pair, self-mask); different contexts give
            independent streams.

    Returns:
        uint64 array (D,): the ChaCha20 keystream (key = HKDF(seed, context), zero
        nonce and counter, which is safe because every key is used for one stream only)
        read as little-endian 64-bit words.
    """
    if not 0 <= length <= MAX_VECTOR_LENGTH:
        raise ValueError(f"mask length {length} outside [0, {MAX_VECTOR_LENGTH}]")
    key = derive_key(seed, context=context)
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    stream = encryptor.update(bytes(8 * length))
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64)


def check_ring_capacity(*, num_clients: int, frac_bits: int, clip: float) -> None:
    """Raise ValueError unless a sum of ``num_clients`` encoded values decodes exactly.

    Requires num_clients * clip * 2^frac_bits < 2^63 (the signed range of the ring) and
    clip * 2^frac_bits < 2^53 (so each value's scaled form is an exact float64 integer).
    """
    if frac_bits < 0 or clip <= 0:
        raise ValueError(f"need frac_bits >= 0 and clip > 0, got {frac_bits}, {clip}")
    scaled = clip * 2.0**frac_bits
    if scaled >= 2.0**53:
        raise ValueError(f"clip * 2^frac_bits = {scaled:.3g} must stay below 2^53")
    if num_clients * scaled >= 2.0 ** (RING_BITS - 1):
        raise ValueError(
            f"{num_clients} clients * clip {clip} * 2^{frac_bits} overflows the signed "
            f"range of Z_2^{RING_BITS}; lower clip or frac_bits"
        )


def quantize(x: np.ndarray, *, frac_bits: int, clip: float) -> tuple[np.ndarray, int]:
    """Encode floats as ring elements.

    Args:
        x: float array (D,), any float dtype (computed in float64).
        frac_bits: f, fractional bits of the fixed-point scale 2^f.
        clip: c; values are clipped to [-c, c] first.

    Returns:
        (uint64 array (D,), number of entries that were clipped or non-finite).
    """
    values = np.asarray(x, dtype=np.float64)
    bad = ~np.isfinite(values)
    clipped = int(np.count_nonzero(bad | (np.abs(values) > clip)))  # +-inf counted once
    values = np.where(bad, 0.0, np.clip(values, -clip, clip))
    ints = np.rint(values * 2.0**frac_bits).astype(np.int64)
    return ints.view(np.uint64), clipped


def dequantize(z: np.ndarray, *, frac_bits: int) -> np.ndarray:
    """Decode a ring element (or a ring sum) back to float64: signed value / 2^f."""
    return np.asarray(z, dtype=np.uint64).view(np.int64).astype(np.float64) / 2.0**frac_bits
