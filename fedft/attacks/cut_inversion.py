"""Activation inversion at the split cut: token ids back from what the split server receives.

The split server sees the client front's output, a (B, T, H) hidden state, for every
micro-batch (:mod:`fedft.split.step`). It also holds the public base model. Two inverters:

* depth 0 (the cut right after the embeddings): the front is a known, position-wise map of
  the token id (BERT: LayerNorm(word + position + token type); Llama: the word embedding),
  so the server computes that map for every vocabulary entry at every position and takes the
  nearest one (:func:`nearest_embedding_invert`). Without noise this is exact.
* depth ≥ 1 (front blocks on the client): a ridge regression from the depth-d hidden state of
  one token to its word embedding, fitted on public text the server runs through the same
  public front, then nearest word embedding (:class:`RidgeInverter`).

Recovery rate = the fraction of real (mask = 1) tokens whose id is recovered exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fedft.split.partition import Blocks, Front, model_family

logger = logging.getLogger(__name__)

__all__ = [
    "RidgeInverter",
    "cut_front",
    "depth0_candidates",
    "nearest_embedding_invert",
    "recovery_rate",
]


def cut_front(model: Any, depth: int) -> Front:
    """The split client's front with ``depth`` blocks (0 = embeddings only), sharing ``model``.

    ``fedft.split.split_model`` needs a body, so a front of any depth is built from the same
    :class:`~fedft.split.partition.Front` and :class:`~fedft.split.partition.Blocks`.
    """
    family = model_family(model)
    layers = list(model.bert.encoder.layer if family == "bert" else model.model.layers)
    if not 0 <= depth <= len(layers):
        raise ValueError(
            f"cut depth {depth}: the model has {len(layers)} blocks (0..{len(layers)})"
        )
    rotary = model.model.rotary_emb if family == "llama" else None
    return Front(family, model, Blocks(family, model.config, layers[:depth], rotary))


@torch.no_grad()
def depth0_candidates(model: Any, length: int, *, chunk: int = 8192) -> Tensor:
    """The depth-0 cut activation of every vocabulary id at every position: (T, V, H).

    BERT: ``LayerNorm(word[v] + position[p] + token_type[0])`` (what ``BertEmbeddings`` computes
    in eval mode); Llama: ``word[v]`` at every position.
    """
    family = model_family(model)
    words = model.get_input_embeddings().weight  # (V, H)
    if family == "llama":
        return words.detach().float().unsqueeze(0).expand(length, -1, -1)
    emb = model.bert.embeddings
    out = torch.empty(length, words.shape[0], words.shape[1])
    tt = emb.token_type_embeddings.weight[0]
    for p in range(length):
        base = emb.position_embeddings.weight[p] + tt
        for s in range(0, words.shape[0], chunk):
            out[p, s : s + chunk] = emb.LayerNorm(words[s : s + chunk] + base).float()
    return out


@torch.no_grad()
def nearest_embedding_invert(hidden: Tensor, candidates: Tensor) -> Tensor:
    """Token ids (B, T): at each position the vocabulary id whose candidate is nearest (L2).

    Args:
        hidden: (B, T, H) cut activations as the server received them.
        candidates: (T', V, H) with T' >= T, from :func:`depth0_candidates`.
    """
    b, t, _ = hidden.shape
    if candidates.shape[0] < t:
        raise ValueError(f"candidates cover {candidates.shape[0]} positions, hidden has {t}")
    out = torch.empty(b, t, dtype=torch.long)
    for p in range(t):
        d = torch.cdist(hidden[:, p].float(), candidates[p])  # (B, V)
        out[:, p] = d.argmin(dim=1)
    return out


def recovery_rate(predicted: Tensor, true: Tensor, mask: Tensor) -> float:
    """Fraction of real tokens (mask = 1) whose id was recovered exactly."""
    real = mask.bool()
    n = int(real.sum())
    if n == 0:
        raise ValueError("no real tokens in the mask")
    return float((predicted[real] == true[real]).sum()) / n


@dataclass
class RidgeInverter:
    """Linear map from one token's cut activation (H) to its word embedding (H), + nearest id.

    Attributes:
        weight: (H + 1, H) (the last row is the bias), set by :meth:`fit`.
        words: (V, H) the model's word embeddings (the decoding dictionary).
    """

    weight: Tensor
    words: Tensor

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        front: nn.Module,
        words: Tensor,
        public_ids: Tensor,
        public_mask: Tensor,
        *,
        ridge: float = 1e-3,
    ) -> RidgeInverter:
        """Fit on public text: the server runs it through the (public) front itself.

        Args:
            front: a front of the attacked depth (:func:`cut_front`).
            words: (V, H) word embeddings.
            public_ids: (N, T) token ids of public text.
            public_mask: (N, T) 0/1.
            ridge: L2 penalty λ (scaled by the mean feature energy).
        """
        hidden, mask = front(public_ids, public_mask)
        real = mask.bool()
        x = _with_bias(hidden[real].float())  # (n, H + 1)
        y = words[public_ids[real]].float()  # (n, H)
        gram = x.T @ x
        lam = ridge * float(gram.diagonal().mean())
        weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0]), x.T @ y)
        logger.debug("ridge inverter fitted on %d public tokens", x.shape[0])
        return cls(weight=weight, words=words.detach().float())

    @torch.no_grad()
    def invert(self, hidden: Tensor, *, chunk: int = 4096) -> Tensor:
        """Token ids (B, T) for cut activations (B, T, H)."""
        b, t, h = hidden.shape
        pred = _with_bias(hidden.reshape(-1, h).float()) @ self.weight  # (B*T, H)
        ids = torch.cat([torch.cdist(p, self.words).argmin(dim=1) for p in pred.split(chunk)])
        return ids.reshape(b, t)


def _with_bias(x: Tensor) -> Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
