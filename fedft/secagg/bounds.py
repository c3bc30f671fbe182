"""What the server can still check about an unmasked SecAgg sum it cannot take apart.

Under secure aggregation the server learns only ``[sum_k w_k x_k, sum_k w_k]`` over the
clients U3 whose masked vectors arrived. A client may put anything in its masked vector
(e.g. add offsets in the ring after masking), so without checks one client can replace the
model or set the total weight at will. These bounds hold for every honest cohort, so a sum
that breaks one cannot come from honest clients; the round is then refused as a whole (the
sum does not say who lied) and the model stays unchanged.

- Uniform weights (user-level DP, w_k = 1): the count equals |U3| exactly, and the sum of
  clipped deltas has norm <= |U3| * C (triangle inequality on ||delta_k|| <= C).
- Example-count weights (w_k = n_k): |U3| <= sum n_k <= |U3| * max_examples, with
  max_examples the largest n_k the run accepts (``aggregation.max_examples``).

What these do not give: with example weights and no norm bound, one client still moves the
mean as far as it likes (exactly as a plain FedAvg client can without
``aggregation.max_update_norm``); a robust ``norm_bound`` cannot be checked per client
through a sum, so the configuration refuses ``secure`` with it.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["sum_problems"]


def sum_problems(
    total: np.ndarray,
    *,
    included: int,
    weighted: bool,
    max_examples: int,
    reference: np.ndarray | None = None,
    clip_norm: float | None = None,
    rounding: float = 0.0,
) -> list[str]:
    """List why an unmasked sum cannot come from ``included`` honest clients ([] = fine).

    Args:
        total: float64 (D,) the decoded sum ``[sum w_k x_k, sum w_k]``.
        included: |U3|, the clients whose vectors are in the sum.
        weighted: True when w_k = n_k; False for uniform weights (w_k = 1, user-level DP).
        max_examples: the largest n_k an honest client sends.
        reference: float64 (D - 1,) x0, what every client started from (uniform weights).
        clip_norm: C, the L2 bound each client applied to its delta x_k - x0 (uniform
            weights); None for no norm check.
        rounding: the fixed-point error bound per entry of the sum (n * 2^(-f-1)).
    """
    if included < 1:
        return [f"{included} clients in the sum"]
    weight = float(total[-1])
    if not math.isfinite(weight):
        return [f"total weight {weight} is not finite"]
    slack = rounding + 1e-9
    if not weighted:
        if abs(weight - included) > 0.5:
            return [
                f"client count {weight:.6g} in the sum differs from the {included} clients "
                "whose vectors it holds: a client tampered with its weight"
            ]
        if clip_norm is not None and reference is not None:
            summed = total[:-1] - included * reference  # sum of the clipped deltas
            norm = float(np.linalg.norm(summed))
            limit = included * clip_norm + math.sqrt(summed.size) * slack
            if not norm <= limit:
                return [
                    f"the sum of clipped updates has norm {norm:.6g} > {included} clients x "
                    f"clip {clip_norm:.6g}: a client sent more than its clipped update"
                ]
        return []
    low, high = float(included), float(included) * float(max_examples)
    if not low - slack <= weight <= high + slack:
        return [
            f"total weight {weight:.6g} outside [{low:.6g}, {high:.6g}] ({included} clients, "
            f"at most aggregation.max_examples={max_examples} examples each): a client "
            "tampered with its weight"
        ]
    return []
