"""SFPrompt for split mode: local-loss phase, EL2N pruning, then split training.

SFPrompt (Cao et al., 2024, "SFPrompt: Communication-Efficient Split Federated Fine-Tuning
for Large Pre-Trained Models over Resource-Limited Devices") trains a soft prompt in the
client front with a *local loss* (front output fed straight into the client back, no server
traffic), scores every sample with EL2N and keeps only the most informative fraction γ for
the expensive split phase.

EL2N (Paul et al., 2021, "Deep Learning on a Data Diet", eq. 2): the L2 norm of the error
vector ``softmax(logits) - onehot(y)`` per sample; for causal LM the mean over the sample's
labelled (non -100) token positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from fedft.split.partition import SplitParts
from fedft.split.step import local_loss


def el2n(logits: Tensor, labels: Tensor) -> Tensor:
    """EL2N score per sample.

    Args:
        logits: (B, C) classification logits, or (B, T, V) causal-LM logits.
        labels: (B,) class ids, or (B, T) next-token labels (-100 ignored; the usual
            one-position shift of causal LM is applied here).

    Returns:
        (B,) scores in [0, sqrt(2)].
    """
    if logits.dim() == 2:
        probs = torch.softmax(logits.float(), dim=-1)  # (B, C)
        onehot = torch.nn.functional.one_hot(labels, probs.shape[-1]).float()
        return (probs - onehot).norm(dim=-1)
    t = labels.shape[1]
    logits = logits[:, -t:, :][:, :-1, :].float()  # (B, T-1, V): positions predicting 1..T-1
    target = labels[:, 1:]  # (B, T-1)
    valid = target != -100
    probs = torch.softmax(logits, dim=-1)
    onehot = torch.nn.functional.one_hot(target.clamp(min=0), probs.shape[-1]).float()
    per_token = (probs - onehot).norm(dim=-1) * valid  # (B, T-1)
    return per_token.sum(dim=1) / valid.sum(dim=1).clamp(min=1)


def keep_top_fraction(scores: Tensor, gamma: float) -> Tensor:
    """Indices of the ``ceil(gamma * N)`` highest scores (the hardest samples), sorted.

    Raises:
        ValueError: gamma outside (0, 1].
    """
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma = {gamma}: the EL2N keep fraction must be in (0, 1]")
    k = max(1, math.ceil(gamma * scores.numel()))
    return torch.topk(scores, k).indices.sort().values


def local_loss_phase(
    parts: SplitParts,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
) -> list[float]:
    """Train the client's trainable parameters (the prompt, ...) on the shortcut loss.

    Args:
        parts: the client's split model (its body is never called).
        batches: (input_ids (B, T), attention_mask (B, T), labels) per step.
        optimizer: over the client's trainable parameters.

    Returns:
        The loss of every step.
    """
    losses = []
    for input_ids, mask, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = local_loss(parts, input_ids, mask, labels)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def el2n_scores(
    parts: SplitParts, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, batch_size: int
) -> Tensor:
    """EL2N of every sample under the local shortcut model (no server traffic).

    Args:
        parts: the client's split model.
        input_ids: (N, T).
        attention_mask: (N, T).
        labels: (N,) or (N, T).
        batch_size: samples per forward.

    Returns:
        (N,) scores.
    """
    out = []
    for i in range(0, input_ids.shape[0], batch_size):
        sl = slice(i, i + batch_size)
        _, logits = local_loss(parts, input_ids[sl], attention_mask[sl], labels[sl])
        out.append(el2n(logits, labels[sl]))
    return torch.cat(out)


def select_samples(
    parts: SplitParts,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    gamma: float,
    batch_size: int = 32,
) -> Tensor:
    """SFPrompt pruning: indices of the top-γ EL2N samples to keep for split training."""
    return keep_top_fraction(
        el2n_scores(parts, input_ids, attention_mask, labels, batch_size), gamma
    )
