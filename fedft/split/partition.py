"""Cut a Hugging Face transformer into a U-shaped split: client front, server body, client back.

U-shape (Vepakomma et al., 2018, "Split learning for health", U-shaped configuration): the
client keeps the embeddings and the first ``front_layers`` blocks (front) and the last
``back_layers`` blocks, the head and the loss (back); the server runs the blocks in between
(body). Token ids, labels and logits therefore never leave the client.

Between the parts only a (B, T, H) hidden state and the (B, T) 0/1 padding mask travel; each
part builds its own extended mask from the 2-D mask (never a 4-D mask on the wire) and, for
Llama, its own position ids (0..T-1) and rotary embeddings, exactly as the unsplit
``LlamaModel.forward`` does.

Supported families: BERT encoders (``BertForSequenceClassification``, e.g. MiniLM) and
Llama decoders (``LlamaForCausalLM``, e.g. SmolLM2). The parts *share* the model's modules:
gradients from the front and the back land on the model's own parameters (tied Llama
embeddings included).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

Family = Literal["bert", "llama"]


def model_family(model: nn.Module) -> Family:
    """Which supported family ``model`` belongs to ("bert" or "llama").

    Raises:
        ValueError: for any other architecture.
    """
    if hasattr(model, "bert") and hasattr(model, "classifier"):
        return "bert"
    if hasattr(model, "model") and hasattr(model.model, "layers") and hasattr(model, "lm_head"):
        return "llama"
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise ValueError(
        f"split learning cuts BERT classifiers (BertForSequenceClassification) and "
        f"Llama-style causal LMs (Llama, Qwen2, Mistral: model.model.layers with rotary "
        f"positions and an lm_head), not {type(model).__name__} (model_type "
        f"{model_type!r}): the cut re-runs the family's own blocks on each side, and only "
        "these two block layouts are implemented; train this model with adapter.method = "
        "'lora' or 'prompt'"
    )


class Blocks(nn.Module):
    """A contiguous run of transformer blocks that takes (B, T, H) hidden + (B, T) mask.

    Args:
        family: "bert" or "llama".
        config: the model's config (decides the attention implementation and mask kind).
        layers: the blocks (shared with the model, not copied).
        rotary: Llama's rotary embedding module (parameter-free); None for BERT.
    """

    def __init__(
        self, family: Family, config: Any, layers: list[nn.Module], rotary: nn.Module | None
    ) -> None:
        super().__init__()
        self.family = family
        self.config = config
        self.layers = nn.ModuleList(layers)
        self.rotary = rotary

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Run the blocks.

        Args:
            hidden: (B, T, H).
            attention_mask: (B, T), 1 = real token, 0 = padding.

        Returns:
            (B, T, H) hidden state after the blocks.
        """
        if len(self.layers) == 0:
            return hidden
        if self.family == "bert":
            ext = create_bidirectional_mask(
                config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
            )
            for layer in self.layers:
                hidden = layer(hidden, ext)
            return hidden
        assert self.rotary is not None
        pos = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # (1, T)
        causal = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=pos,
        )
        rope = self.rotary(hidden, position_ids=pos)
        for layer in self.layers:
            hidden = layer(
                hidden, attention_mask=causal, position_embeddings=rope, position_ids=pos
            )
        return hidden


class Front(nn.Module):
    """Client front: embeddings (+ optional soft prompt) and the first blocks."""

    def __init__(self, family: Family, model: Any, blocks: Blocks) -> None:
        super().__init__()
        self.family = family
        self.embeddings = model.bert.embeddings if family == "bert" else model.model.embed_tokens
        self.word_embeddings = model.get_input_embeddings()
        self.blocks = blocks
        self.prompt: Any = None  # a fedft.prompt.SoftPrompt, set by the caller
        # a fedft.split.dx.DxNoise (SAP's d_χ-privacy on the token embeddings), or None
        self.privatizer: Any = None
        # a fedft.split.dx.CutNoise (Gaussian noise on the front's output), or None
        self.cut_noise: Any = None

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Embed and run the front blocks.

        Args:
            input_ids: (B, T) token ids.
            attention_mask: (B, T) 0/1.

        Returns:
            hidden (B, T', H) and mask (B, T') with T' = T + prompt length (0 without a prompt).
        """
        embeds = self.word_embeddings(input_ids)  # (B, T, H)
        if self.privatizer is not None:  # before the prompt: the prompt is not private data
            embeds = self.privatizer(embeds)
        if self.prompt is not None:
            embeds, attention_mask = self.prompt.prepend(embeds, attention_mask)
        if self.family == "bert":
            hidden = self.embeddings(inputs_embeds=embeds)  # + position, token type, LayerNorm
        else:
            hidden = embeds
        hidden = self.blocks(hidden, attention_mask)
        if self.cut_noise is not None:  # on everything that crosses the cut, prompt included
            hidden = self.cut_noise(hidden)
        return hidden, attention_mask


class Back(nn.Module):
    """Client back: the last blocks, the head and the loss."""

    def __init__(self, family: Family, model: Any, blocks: Blocks) -> None:
        super().__init__()
        self.family = family
        self.blocks = blocks
        self.model = [model]  # a list: keep the HF model out of this module's parameters

    def forward(
        self, hidden: Tensor, attention_mask: Tensor, labels: Tensor | None
    ) -> tuple[Tensor | None, Tensor]:
        """Finish the forward pass on the client.

        Args:
            hidden: (B, T', H) body output.
            attention_mask: (B, T') 0/1.
            labels: classification (B,) class ids; causal LM (B, T) token ids with -100 =
                ignored, left-padded with -100 here to T' when a soft prompt made T' > T.

        Returns:
            (loss or None, logits): logits (B, C) for classification, (B, T', V) for causal LM.
        """
        model: Any = self.model[0]
        hidden = self.blocks(hidden, attention_mask)
        if self.family == "bert":
            pooled = model.bert.pooler(hidden)  # (B, H), first token
            logits = model.classifier(model.dropout(pooled))  # (B, C)
            loss = None
            if labels is not None:
                loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), labels)
            return loss, logits
        logits = model.lm_head(model.model.norm(hidden))  # (B, T', V)
        loss = None
        if labels is not None:
            extra = hidden.shape[1] - labels.shape[1]
            if extra > 0:
                pad = labels.new_full((labels.shape[0], extra), -100)
                labels = torch.cat([pad, labels], dim=1)
            loss = model.loss_function(
                logits=logits, labels=labels, vocab_size=model.config.vocab_size
            )
        return loss, logits


def back_parameter_names(model: Any, *, back_layers: int) -> list[str]:
    """Names of the parameters of the client's back blocks (as in ``named_parameters()``).

    The back blocks are the last ``back_layers`` transformer blocks; the head and the final
    norm are not among them.

    Raises:
        ValueError: unsupported model, or ``back_layers`` outside 0..L-1.
    """
    family = model_family(model)
    prefix = "bert.encoder.layer" if family == "bert" else "model.layers"
    n = len(model.bert.encoder.layer if family == "bert" else model.model.layers)
    if not 0 <= back_layers < n:
        raise ValueError(f"back_layers = {back_layers}: must be in 0..{n - 1}")
    blocks = tuple(f"{prefix}.{i}." for i in range(n - back_layers, n))
    return sorted(name for name, _ in model.named_parameters() if name.startswith(blocks))


@dataclass(frozen=True)
class SplitParts:
    """The three parts of a U-shaped split; all share the original model's modules.

    Attributes:
        family: "bert" or "llama".
        front: client front (embeddings + first blocks).
        body: server body (middle blocks).
        back: client back (last blocks + head + loss).
        hidden_size: H, the width of every tensor on the wire.
        front_layers: blocks in the front.
        body_layers: blocks in the body.
    """

    family: Family
    front: Front
    body: Blocks
    back: Back
    hidden_size: int
    front_layers: int
    body_layers: int


def split_model(model: Any, *, front_layers: int, back_layers: int) -> SplitParts:
    """Cut ``model`` into front / body / back.

    Args:
        model: a ``BertForSequenceClassification`` or ``LlamaForCausalLM``.
        front_layers: blocks on the client before the body (>= 1).
        back_layers: blocks on the client after the body (>= 0).

    Returns:
        The parts; the body holds the remaining ``L - front_layers - back_layers`` (>= 1) blocks.

    Raises:
        ValueError: unsupported model or a cut that leaves no body.
    """
    family = model_family(model)
    layers = list(model.bert.encoder.layer if family == "bert" else model.model.layers)
    n = len(layers)
    if front_layers < 1 or back_layers < 0 or front_layers + back_layers >= n:
        raise ValueError(
            f"cut front_layers={front_layers}, back_layers={back_layers} needs "
            f"front >= 1, back >= 0 and front + back < {n} blocks (body >= 1)"
        )
    rotary = model.model.rotary_emb if family == "llama" else None
    config = model.config

    def blocks(part: list[nn.Module]) -> Blocks:
        return Blocks(family, config, part, rotary)

    return SplitParts(
        family=family,
        front=Front(family, model, blocks(layers[:front_layers])),
        body=blocks(layers[front_layers : n - back_layers]),
        back=Back(family, model, blocks(layers[n - back_layers :])),
        hidden_size=int(config.hidden_size),
        front_layers=front_layers,
        body_layers=n - front_layers - back_layers,
    )
