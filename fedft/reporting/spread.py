"""Spread over seeds: mean, standard deviation and a Student-t interval, and what they allow.

One run is one draw: the split, the client sampling and the initialisation all come from the
run's seed. ``fedft compare --seeds N`` runs every algorithm on the same N seeds and reads
each metric as a sample of N values:

- the mean and the sample standard deviation (n - 1 in the denominator);
- the two-sided 95 % interval of the mean from Student's t distribution with n - 1 degrees
  of freedom, ``mean ± t(0.975, n - 1) · std / √n``, which assumes the per-seed values are
  roughly normal (with 3 seeds t is 4.30, so the interval is wide on purpose).

Two algorithms are told apart in words (:func:`tell_apart`):

- their intervals do not overlap (the strict reading);
- or, since seed s gives both the same split, the interval of the per-seed differences
  excludes 0 (a paired reading: weaker than the first, stated as such);
- otherwise they cannot be told apart at this number of seeds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

__all__ = [
    "CONFIDENCE",
    "INTERVAL_NAME",
    "Spread",
    "Verdict",
    "spread",
    "spreads_by_key",
    "tell_apart",
]

#: the confidence of every interval fedft reports.
CONFIDENCE = 0.95
#: how the interval is named in tables and JSON.
INTERVAL_NAME = (
    "95 % two-sided Student-t interval of the mean over seeds: "
    "mean ± t(0.975, n-1) · std / sqrt(n), std with n-1 in the denominator"
)


@dataclass(frozen=True)
class Spread:
    """A metric over seeds.

    Attributes:
        values: the per-seed values, in seed order.
        mean: their mean.
        std: sample standard deviation (n - 1); None for one value.
        low, high: the Student-t interval of the mean; None for one value.
    """

    values: tuple[float, ...]
    mean: float
    std: float | None
    low: float | None
    high: float | None

    @property
    def n(self) -> int:
        """Number of seeds."""
        return len(self.values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: values, n, mean, std, low, high."""
        return {
            "values": list(self.values),
            "n": self.n,
            "mean": self.mean,
            "std": self.std,
            "low": self.low,
            "high": self.high,
        }

    def format(self, digits: int = 4, *, spec: str | None = None) -> str:
        """``mean ± std`` (just the mean for one seed), ``digits`` decimals or format ``spec``."""
        spec = spec or f".{digits}f"
        if self.std is None:
            return f"{self.mean:{spec}}"
        return f"{self.mean:{spec}} ± {self.std:{spec}}"

    def format_interval(self, digits: int = 4) -> str:
        """``[low, high]`` (a dash for one seed)."""
        if self.low is None or self.high is None:
            return "-"
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _t_half_width(std: float, n: int, confidence: float) -> float:
    return float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)


def spread(values: Sequence[float], *, confidence: float = CONFIDENCE) -> Spread:
    """Mean, sample std and Student-t interval of ``values``.

    Raises:
        ValueError: no values, a value that is not finite, or a confidence outside (0, 1).
    """
    if not values:
        raise ValueError("spread needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    xs = tuple(float(v) for v in values)
    if not all(math.isfinite(x) for x in xs):
        raise ValueError(f"spread needs finite values, got {list(xs)}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return Spread(xs, mean, None, None, None)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = _t_half_width(std, n, confidence)
    return Spread(xs, mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Verdict:
    """Whether two algorithms differ in one metric beyond the spread over seeds.

    Attributes:
        a, b: the two algorithms.
        metric: the metric compared.
        better: the one ahead (higher, or lower for a loss), or None if they cannot be told
            apart.
        how: ``"intervals"`` (the intervals do not overlap), ``"paired"`` (they overlap but
            the interval of the per-seed differences excludes 0) or ``"none"``.
        diff: the per-seed differences a - b (empty when the seeds do not match).
        text: the sentence for the table.
    """

    a: str
    b: str
    metric: str
    better: str | None
    how: str
    diff: Spread | None
    text: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "a": self.a,
            "b": self.b,
            "metric": self.metric,
            "better": self.better,
            "how": self.how,
            "diff_a_minus_b": None if self.diff is None else self.diff.to_dict(),
            "text": self.text,
        }


def tell_apart(
    a: str,
    sa: Spread,
    b: str,
    sb: Spread,
    *,
    metric: str,
    higher_is_better: bool,
    paired: bool = True,
    confidence: float = CONFIDENCE,
) -> Verdict:
    """Say whether ``a`` and ``b`` differ in ``metric`` beyond the spread over seeds.

    Args:
        a, b: names; sa, sb: their spreads (values in the same seed order when ``paired``).
        metric: the metric's name, for the sentence.
        higher_is_better: True for accuracy, False for a loss.
        paired: the i-th values of both come from the same seed (same split), so the
            per-seed differences may be read too.
    """
    sign = 1.0 if higher_is_better else -1.0
    ahead, behind = (a, b) if sign * (sa.mean - sb.mean) >= 0 else (b, a)
    s_ahead, s_behind = (sa, sb) if ahead == a else (sb, sa)
    rel = ">" if higher_is_better else "<"
    means = f"{metric} {s_ahead.mean:.4f} vs {s_behind.mean:.4f}"  # ahead first
    as_given = f"{metric} {sa.mean:.4f} vs {sb.mean:.4f}"  # a first
    diff = None
    if paired and sa.n == sb.n and sa.n >= 2:
        diff = spread(
            [x - y for x, y in zip(sa.values, sb.values, strict=True)], confidence=confidence
        )
    if sa.std is None or sb.std is None:
        text = f"{a} vs {b}: cannot tell apart (one seed: no spread; {as_given})"
        return Verdict(a, b, metric, None, "none", diff, text)
    assert sa.low is not None and sa.high is not None and sb.low is not None
    assert sb.high is not None
    disjoint = sa.low > sb.high or sb.low > sa.high
    if disjoint:
        text = f"{ahead} {rel} {behind} ({means}): intervals do not overlap"
        return Verdict(a, b, metric, ahead, "intervals", diff, text)
    if diff is not None and diff.low is not None and diff.high is not None:
        d_text = f"per-seed difference {a} - {b} in {diff.format_interval()}"
        if diff.low > 0 or diff.high < 0:
            text = (
                f"{ahead} {rel} {behind} ({means}) paired by seed only: the intervals "
                f"overlap, the {d_text} excludes 0"
            )
            return Verdict(a, b, metric, ahead, "paired", diff, text)
        text = f"{a} vs {b}: cannot tell apart ({as_given}; intervals overlap, {d_text} includes 0)"
        return Verdict(a, b, metric, None, "none", diff, text)
    text = f"{a} vs {b}: cannot tell apart ({as_given}; intervals overlap)"
    return Verdict(a, b, metric, None, "none", diff, text)


def spreads_by_key(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, Spread]:
    """The spread of each of ``keys`` over ``rows`` (one row per seed).

    Keys whose value is not a finite number in every row are left out.
    """
    out: dict[str, Spread] = {}
    for key in keys:
        values = [r.get(key) for r in rows]
        if values and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            out[key] = spread([float(v) for v in values])  # type: ignore[arg-type]
    return out
