"""A model wrapper that trains only a soft prompt (and optionally the classifier head).

The wrapper keeps the Hugging Face calling convention ``forward(input_ids, attention_mask,
labels)`` and returns the model's own output object (``.loss``, ``.logits``). The server
averages prompts as a dense "extra" by p_k; :func:`get_prompt` / :func:`set_prompt` move the
(n, H) tensor in and out.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fedft.prompt.soft_prompt import SoftPrompt

#: attribute names of classification heads that may be trained along with the prompt.
HEAD_NAMES = ("classifier", "score")


class PromptTunedModel(nn.Module):
    """Frozen base model + trainable soft prompt (+ optionally its classifier head).

    Args:
        model: a Hugging Face model accepting ``inputs_embeds`` (BERT, Llama, ...).
        num_tokens: n virtual tokens.
        train_head: also train ``model.classifier`` / ``model.score``.
        seed: seeds the prompt init.
    """

    def __init__(
        self, model: nn.Module, *, num_tokens: int, train_head: bool = False, seed: int = 0
    ) -> None:
        super().__init__()
        self.model: Any = model
        hf: Any = model
        hidden = int(hf.get_input_embeddings().weight.shape[1])
        self.prompt = SoftPrompt(num_tokens, hidden, seed=seed)
        self.is_causal = not any(hasattr(model, h) for h in HEAD_NAMES)
        for p in model.parameters():
            p.requires_grad_(False)
        if train_head:
            head = next((getattr(model, h) for h in HEAD_NAMES if hasattr(model, h)), None)
            if head is None:
                raise ValueError(
                    f"train_head=True needs a classification head ({HEAD_NAMES}); "
                    f"{type(model).__name__} has none"
                )
            for p in head.parameters():
                p.requires_grad_(True)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> Any:
        """Forward with the prompt prepended.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 0/1 (all ones when None).
            labels: (B,) class ids, or (B, T) causal-LM labels (extended with -100 here).

        Returns:
            The model's output object; logits are (B, C) or (B, n + T, V).
        """
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        hf: Any = self.model
        embeds = hf.get_input_embeddings()(input_ids)  # (B, T, H)
        embeds, mask = self.prompt.prepend(embeds, attention_mask)
        if labels is not None and self.is_causal:
            labels = self.prompt.extend_labels(labels)
        return hf(inputs_embeds=embeds, attention_mask=mask, labels=labels)


def get_prompt(model: PromptTunedModel | SoftPrompt) -> Tensor:
    """The (n, H) prompt tensor, detached and cloned."""
    prompt = model.prompt if isinstance(model, PromptTunedModel) else model
    return prompt.embedding.detach().clone()


def set_prompt(model: PromptTunedModel | SoftPrompt, value: Tensor) -> None:
    """Overwrite the prompt in place with ``value`` (n, H); shapes must match.

    Raises:
        ValueError: shape mismatch.
    """
    prompt = model.prompt if isinstance(model, PromptTunedModel) else model
    if value.shape != prompt.embedding.shape:
        raise ValueError(
            f"prompt shape {tuple(value.shape)} != {tuple(prompt.embedding.shape)} (n, H)"
        )
    with torch.no_grad():
        prompt.embedding.copy_(value.to(prompt.embedding.dtype))
