"""Which clients take part in a user-level DP round: secret Poisson sampling.

The user-level accountant (DP-FedAvg, McMahan et al., 2018) assumes each of the N clients
joins a round independently with probability q = m / N, and that nobody outside the
mechanism knows who joined: that is what amplification by sampling needs. A fixed-size
cohort drawn from a generator seeded with the run's (published) seed satisfies neither:
anyone recomputes who trained, and for a client known to be in k rounds the honest ε is
that of k unsampled releases (q = 1), not of the run at q = m / N.

:func:`poisson_cohort` draws every client's coin from the operating system's randomness
(:class:`random.SystemRandom`), so no seed reproduces it; the cohort is not written to any
output (:func:`fedft.privacy.release.published_round`). The cohort's size varies from round
to round (Binomial(N, q)); the noisy sum is still divided by m = q·N.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["poisson_cohort"]

_OS_RANDOM = random.SystemRandom()


def poisson_cohort(
    clients: Sequence[int], *, sample_rate: float, rng: random.Random | None = None
) -> list[int]:
    """Each client of ``clients`` independently with probability ``sample_rate``, sorted.

    Args:
        clients: the client indices.
        sample_rate: q in (0, 1].
        rng: the coin source; None = the OS's (:class:`random.SystemRandom`). Pass one
            only in tests: a seeded generator makes the cohort public.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate = {sample_rate!r}: a probability in (0, 1]")
    coins = rng or _OS_RANDOM
    return sorted(i for i in clients if coins.random() < sample_rate)
