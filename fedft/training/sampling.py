"""Which clients train in a round (pure; the server's sampling step).

:func:`sample_clients` draws a fixed-size cohort uniformly without replacement from the
clients that may still train, reproducibly under the run's seed.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

__all__ = ["sample_clients"]


def sample_clients(able: Sequence[int], k: int, *, seed: int, rnd: int) -> list[int]:
    """min(k, |able|) clients of ``able`` for round ``rnd``, sorted by index.

    The draw is ``random.Random(seed * 7919 + rnd).sample``: the stream every earlier run
    used, so their cohorts reproduce.
    """
    return sorted(random.Random(seed * 7919 + rnd).sample(list(able), min(k, len(able))))
