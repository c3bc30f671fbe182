"""d_χ-privacy on the client's embeddings: the cut protection of Split-and-Privatize (SAP).

Split learning sends the front's output to the server; from it a curious server can read
back the tokens (:mod:`fedft.attacks.cut_inversion` measures how well). SAP (Shen et al.,
2023, "A Split-and-Privatize Framework for Large Language Model Fine-Tuning") perturbs
every token's input embedding with noise whose density is proportional to ``exp(-ε‖z‖)``
before the front runs: metric local differential
privacy (d_χ-privacy, Chatzikokolakis et al., 2013) with the Euclidean distance between
embeddings, so two tokens whose embeddings are ``D`` apart are told apart with likelihood
ratio at most ``exp(ε D)``.

Sampling ``z`` in H dimensions with density ∝ exp(-ε‖z‖): the direction is uniform on the
sphere and the norm follows Gamma(shape=H, scale=1/ε) (mean H/ε).

The ε here is a per-token *metric* privacy parameter: it is not an (ε, δ)-DP guarantee on a
training example and is never added to DP-SGD's ε (fedft reports it as ``dx_epsilon``).

:class:`CutNoise` is the other, cruder knob: isotropic Gaussian noise added to the front's
*output* (the activations that cross the cut). Nothing bounds how much one token or one
example moves those activations, so a noise std is not calibrated to any sensitivity and
carries no DP guarantee; it only makes inversion harder by an amount fedft measures
(``fedft simulate --audit``).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = ["CutNoise", "DxNoise", "sample_dx_noise"]


def sample_dx_noise(
    shape: tuple[int, ...], epsilon: float, *, generator: torch.Generator | None = None
) -> Tensor:
    """Noise with density ∝ exp(-ε‖z‖) for each row of the last dimension.

    Args:
        shape: ``(..., H)``; every ``H``-vector is an independent draw.
        epsilon: ε > 0 (smaller = more noise; mean norm ``H / ε``).
        generator: CPU generator (None = torch's default).

    Returns:
        fp32 tensor of ``shape``.
    """
    if not epsilon > 0:
        raise ValueError(f"dx epsilon = {epsilon}: must be > 0 (smaller adds more noise)")
    if len(shape) < 1 or shape[-1] < 1:
        raise ValueError(f"shape {shape}: the last dimension is the embedding width (>= 1)")
    dim = shape[-1]
    direction = torch.randn(shape, generator=generator)
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # torch's Gamma sampler takes no generator: seed it from the generator's next integer
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        radius = torch._standard_gamma(torch.full(shape[:-1], float(dim))) / epsilon
    return direction * radius.unsqueeze(-1)


def _generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or from fresh OS randomness when it is None."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


class DxNoise(nn.Module):
    """Adds d_χ noise to input embeddings (B, T, H); the split client's front calls it.

    Args:
        epsilon: per-token ε > 0.
        seed: seeds the noise (None: fresh OS randomness, what a deployment wants: a known
            seed would let the server subtract the noise).
    """

    def __init__(self, epsilon: float, *, seed: int | None = None) -> None:
        super().__init__()
        if not epsilon > 0:
            raise ValueError(f"dx epsilon = {epsilon}: must be > 0 (smaller adds more noise)")
        self.epsilon = float(epsilon)
        self.generator = _generator(seed)

    def forward(self, embeds: Tensor) -> Tensor:
        """``embeds + z`` with one independent ``z`` per token (padding included)."""
        z = sample_dx_noise(tuple(embeds.shape), self.epsilon, generator=self.generator)
        return embeds + z.to(device=embeds.device, dtype=embeds.dtype)


class CutNoise(nn.Module):
    """Adds N(0, std²) noise to every element of the cut activations (B, T, H).

    Not differential privacy: the activations' sensitivity is unbounded, so ``std`` is not
    calibrated to anything (see the module docstring).

    Args:
        std: noise standard deviation > 0, in the units of the activations.
        seed: seeds the noise (None: fresh OS randomness, what a deployment wants).
    """

    def __init__(self, std: float, *, seed: int | None = None) -> None:
        super().__init__()
        if not std > 0:
            raise ValueError(f"cut noise std = {std}: must be > 0 (0 means no noise module)")
        self.std = float(std)
        self.generator = _generator(seed)

    def forward(self, hidden: Tensor) -> Tensor:
        """``hidden + std * n``, n standard normal, drawn on the CPU generator."""
        z = torch.randn(tuple(hidden.shape), generator=self.generator) * self.std
        return hidden + z.to(device=hidden.device, dtype=hidden.dtype)
