"""Soft prompt tuning: ``n`` trainable virtual tokens prepended to the input embeddings.

Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning": an (n, H)
matrix prepended to the (B, T, H) input embeddings; only it (and optionally a head) trains.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SoftPrompt(nn.Module):
    """``n`` virtual tokens of width ``hidden``.

    Args:
        num_tokens: n >= 1.
        hidden_size: H, the model's embedding width.
        init: optional (n, H) initial value (e.g. embeddings of real vocabulary tokens, as
            Lester et al. recommend); default N(0, 0.02²) like BERT/Llama embedding init.
        seed: seeds the default init.
    """

    def __init__(
        self, num_tokens: int, hidden_size: int, *, init: Tensor | None = None, seed: int = 0
    ) -> None:
        super().__init__()
        if num_tokens < 1 or hidden_size < 1:
            raise ValueError(
                f"soft prompt needs n >= 1 and H >= 1; got {num_tokens}, {hidden_size}"
            )
        if init is None:
            gen = torch.Generator().manual_seed(seed)
            init = torch.randn(num_tokens, hidden_size, generator=gen) * 0.02
        elif tuple(init.shape) != (num_tokens, hidden_size):
            raise ValueError(f"init shape {tuple(init.shape)} != ({num_tokens}, {hidden_size})")
        self.embedding = nn.Parameter(init.detach().clone().float())  # (n, H)

    @property
    def num_tokens(self) -> int:
        """n, the number of virtual tokens."""
        return int(self.embedding.shape[0])

    def prepend(self, embeds: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Prepend the prompt to every sequence.

        Args:
            embeds: (B, T, H) input embeddings.
            attention_mask: (B, T) 0/1.

        Returns:
            (B, n + T, H) embeddings and the (B, n + T) mask with ones for the prompt.
        """
        b = embeds.shape[0]
        prompt = self(embeds)  # (B, n, H), through __call__ so DP-SGD hooks see it
        ones = attention_mask.new_ones(b, self.num_tokens)
        return torch.cat([prompt, embeds], dim=1), torch.cat([ones, attention_mask], dim=1)

    def forward(self, embeds: Tensor) -> Tensor:
        """The prompt repeated for every sequence of ``embeds`` (B, T, H): (B, n, H)."""
        return self.embedding.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)

    def extend_labels(self, labels: Tensor) -> Tensor:
        """Causal-LM labels (B, T) -> (B, n + T) with -100 (ignored) on the prompt."""
        pad = labels.new_full((labels.shape[0], self.num_tokens), -100)
        return torch.cat([pad, labels], dim=1)
