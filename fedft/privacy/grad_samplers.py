"""Opacus per-sample gradient rules for fedft's own trainable modules.

A soft prompt (``fedft.prompt.SoftPrompt``) maps a batch (B, T, H) to its prompt repeated per
sequence, (B, n, H): the per-sample gradient of the (n, H) embedding is exactly the gradient
that reached sample b's copy, ``backprops[b]``.
"""

from __future__ import annotations

from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from fedft.prompt.soft_prompt import SoftPrompt


@register_grad_sampler(SoftPrompt)
def soft_prompt_grad_sample(
    layer: SoftPrompt, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradients of the prompt: (B, n, H)."""
    return {layer.embedding: backprops.to(layer.embedding.dtype)}
