"""DP-SGD's per-step pieces as plain functions over tensors (no Opacus, no module hooks).

Algorithm 1 of Abadi et al. (2016), "Deep Learning with Differential Privacy", one logical
step: draw a Poisson batch (every example independently with probability q), clip each
example's whole gradient g_i to L2 norm ≤ C (factor ``min(1, C / (‖g_i‖ + 1e-6))``, Opacus'
rule), sum, add N(0, σ²C²) to every coordinate once, divide by the expected batch size B = q n.

These are used where the per-example gradients are formed by fedft itself rather than by
Opacus' hooks: split learning, where one example's gradient is assembled from the client's
back, the cut gradient the server returns and the client's front (``fedft.split.dp``), and
the split server's per-client adapter.

Several separately clipped parts under one Poisson sample (the client's side of a split
model clipped to C_c, the server's adapter clipped to C_s, each noised with σ_side·C_part):
whitened by the noise, one example moves the released pair by at most √(k)/σ_side for k
parts, so the pair is one subsampled Gaussian mechanism with noise multiplier
σ_side / √k (:func:`side_noise_multiplier` is the inverse). The accountant records that one
mechanism per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["ClippedSum", "noisy_mean", "poisson_sample", "side_noise_multiplier"]


def poisson_sample(n: int, q: float, generator: torch.Generator) -> Tensor:
    """Indices of a Poisson batch: each of ``n`` examples kept independently with prob. ``q``.

    Returns:
        (b,) int64 indices in increasing order; b may be 0.
    """
    return (torch.rand(n, generator=generator) < q).nonzero().flatten()


def side_noise_multiplier(release_sigma: float, parts: int) -> float:
    """σ each of ``parts`` separately clipped parts adds so that the release has ``release_sigma``.

    Args:
        release_sigma: the noise multiplier the accountant records for the whole release.
        parts: how many parts are clipped separately under the same Poisson sample (1: the
            client's side only; 2: the client's side and the server's per-client adapter).

    Returns:
        ``release_sigma * sqrt(parts)``.
    """
    if parts < 1:
        raise ValueError(f"parts = {parts}: at least one clipped part")
    return release_sigma * math.sqrt(parts)


class ClippedSum:
    """Σ_i min(1, C / (‖g_i‖ + 1e-6)) g_i over the examples of one logical step.

    ‖g_i‖ is the L2 norm of example i's gradient over *all* the named parameters together
    (one clip norm for the whole per-example gradient).

    Args:
        params: ``{name: parameter}``: the trainable parameters (shapes, dtypes, devices).
        max_grad_norm: C > 0.
    """

    def __init__(self, params: Mapping[str, Tensor], *, max_grad_norm: float) -> None:
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm = {max_grad_norm}: must be > 0")
        self.max_grad_norm = float(max_grad_norm)
        self.total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        self.samples = 0
        self.clipped = 0

    def add(self, grads: Sequence[Mapping[str, Tensor | None]]) -> Tensor:
        """Clip each example's gradient and add it to the sum.

        Args:
            grads: one ``{name: gradient}`` per example (a missing or None entry counts as 0;
                an unknown name is an error).

        Returns:
            (b,) the per-example norms before clipping.
        """
        norms = []
        for g in grads:
            unknown = set(g) - set(self.total)
            if unknown:
                raise KeyError(f"gradients for unknown parameters {sorted(unknown)}")
            parts = {n: t.float() for n, t in g.items() if t is not None}
            sq = sum((t.pow(2).sum() for t in parts.values()), torch.zeros(()))
            norm = sq.sqrt()
            factor = min(1.0, self.max_grad_norm / (float(norm) + 1e-6))
            for n, t in parts.items():
                self.total[n].add_(t, alpha=factor)
            self.samples += 1
            self.clipped += int(float(norm) > self.max_grad_norm)
            norms.append(norm)
        return torch.stack(norms) if norms else torch.zeros(0)


def noisy_mean(
    summed: ClippedSum,
    *,
    noise_multiplier: float,
    expected_batch_size: int,
    generator: torch.Generator | None,
) -> dict[str, Tensor]:
    """(Σ clipped + N(0, σ²C²)) / B for every parameter: the DP-SGD gradient of one step.

    Args:
        summed: the step's clipped sum (C is its ``max_grad_norm``).
        noise_multiplier: σ ≥ 0 (0: clipped, not private).
        expected_batch_size: B = q n, the Poisson batch's expectation (never the realised size,
            which would leak whether an example was drawn).
        generator: the noise generator (CPU); None = torch's default generator.

    Returns:
        ``{name: gradient}`` with each parameter's shape.
    """
    if noise_multiplier < 0 or expected_batch_size < 1:
        raise ValueError(
            f"noise_multiplier = {noise_multiplier} (>= 0), "
            f"expected_batch_size = {expected_batch_size} (>= 1)"
        )
    std = noise_multiplier * summed.max_grad_norm
    out = {}
    for name, total in summed.total.items():
        noise = torch.normal(0.0, std, size=total.shape, generator=generator) if std > 0 else 0.0
        out[name] = (total.cpu() + noise).to(total.device) / expected_batch_size
    return out
