"""What a client may send beside its update, and what a run may publish, under DP.

Sample-level DP (neighbours: one example replaced by a null one, so n_k is the same on both
sides): the update is the mechanism's output; the client's example count n_k and what
follows from it alone (q = B / n_k, σ, its ε and whether it refuses) are public. Statistics
of the training itself — the loss, the share of clipped gradients, the realised Poisson
batch sizes — depend on the examples and on which were sampled, so they stay on the client.

User-level DP (neighbours: one client's whole data added or removed): the server is trusted
with the updates, but everything published must come out of the mechanism; a client's loss,
its example count and the size of a round's cohort do not, so they are neither sent nor
written to metrics.jsonl.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: client metrics that may leave a client under sample-level DP (functions of n_k alone).
SAMPLE_LEVEL_PUBLIC = frozenset({"epsilon"})
#: fields of a metrics line that count the clients of a round (the cohort's size).
COHORT_FIELDS = ("clients", "sampled", "refused", "rejected", "bytes_up", "bytes_down")


def released_metrics(metrics: Mapping[str, float], *, mode: str) -> dict[str, float]:
    """The client metrics that leave the client under privacy ``mode``.

    Args:
        metrics: what the local round measured.
        mode: ``"off"`` (everything), ``"sample"`` (:data:`SAMPLE_LEVEL_PUBLIC` only) or
            ``"user"`` (nothing).
    """
    if mode == "off":
        return dict(metrics)
    if mode == "sample":
        return {k: v for k, v in metrics.items() if k in SAMPLE_LEVEL_PUBLIC}
    return {}


def released_num_examples(num_examples: int, *, mode: str) -> int:
    """The example count a client sends: n_k, or 1 under user-level DP (uniform weights)."""
    return 1 if mode == "user" else num_examples


def published_round(record: Mapping[str, Any], *, mode: str) -> dict[str, Any]:
    """A metrics line as a run may publish it under privacy ``mode``.

    Under user-level DP the cohort is secret: the counts of a round's clients (and the
    bytes, which grow with them) are written as null, and the aggregation error (a function
    of the individual, un-noised updates) is not written.
    """
    out = dict(record)
    if mode == "user":
        for key in COHORT_FIELDS:
            if key in out:
                out[key] = None
        out.pop("agg_clients", None)
        out.pop("agg_error", None)
    return out
