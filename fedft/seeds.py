"""One way to derive the seed of a random stream from the run's seed.

Every seeded draw of a run (a client's round, the server's init of a client's factors, the
DP noise of a simulation) uses ``derive_seed(run_seed, *parts)``, so the streams are
distinct, reproducible under the run's seed, and spelled once.
"""

from __future__ import annotations

__all__ = ["derive_seed"]

#: base of the run's seed and of the parts (both prime; the values the project has
#: always used, so earlier runs reproduce).
SEED_BASE, PART_BASE = 1_000_003, 10_007


def derive_seed(seed: int, *parts: int) -> int:
    """``seed * 1_000_003 + parts`` read as digits in base 10_007, modulo 2**63.

    ``derive_seed(s, rnd, idx)`` = ``s * 1_000_003 + rnd * 10_007 + idx`` (a client's round);
    ``derive_seed(s, k)`` = ``s * 1_000_003 + k``. Distinct while every part but the first is
    below 10_007 (client indices, small counters). The result fits ``torch.manual_seed``.
    """
    value = 0
    for part in parts:
        value = value * PART_BASE + int(part)
    return (int(seed) * SEED_BASE + value) % 2**63
