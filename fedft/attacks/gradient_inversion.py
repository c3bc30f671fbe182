"""What one client's update reveals to the server that receives it: label and tokens.

Label leakage (iDLG, Zhao et al., 2020): for a batch of one with cross-entropy loss, the
gradient of the classifier's bias is ``softmax(logits) - onehot(label)``: negative at the
true class only, positive elsewhere. The server reads the label off the sign
(:func:`infer_label`); a client's update after one SGD step is ``-lr * gradient``, so
``sign`` says which convention the observed tensor follows.

Gradient inversion (DLG, Zhu et al., 2019, with the cosine objective of Geiping et al.,
2020): the server optimises dummy input embeddings until the LoRA + head gradient they
produce points the same way as the observed one, decodes every position to its nearest
word embedding, then refines position by position over each position's nearest candidates
(a discrete step, as in LAMP, Balunović et al., 2022) keeping the ids whose gradient matches
best (:func:`invert_gradient`). Token-recovery F1 compares the bag of recovered ids with the
bag of true ids (:func:`token_f1`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "InversionResult",
    "gradient_distance",
    "infer_label",
    "invert_gradient",
    "random_guess_f1",
    "released_update_label",
    "token_f1",
    "update_gradients",
]


def infer_label(bias_gradient: Tensor, *, sign: float = 1.0) -> int:
    """The label of a batch-of-one update from its classifier-bias gradient (C,).

    Args:
        bias_gradient: the observed gradient (``sign=1``) or update (``sign=-1``: an update is
            ``-lr * gradient``) of the classifier bias.
        sign: +1 for a gradient, -1 for a descent update.
    """
    return int((sign * bias_gradient.float()).argmin())


def released_update_label(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    bias: str,
    data: Any,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    seed: int | None,
) -> int:
    """The label iDLG reads off the update a DP-SGD client releases after ``steps`` steps.

    The client runs fedft's own DP-SGD loop (:func:`fedft.privacy.dpsgd.train_private`:
    per-example clipping, Gaussian noise on the sum, AdamW) on ``data`` (an ``Encoded``)
    from ``params`` as they are; the server, which knows what it sent, reads the label off
    ``before - after`` of the head bias ``bias`` (the update with its sign flipped). The
    parameters are restored afterwards, whatever happens.
    """
    from fedft.privacy.accountant import PrivacyAccountant
    from fedft.privacy.dpsgd import train_private

    before = {k: p.detach().clone() for k, p in params.items()}
    try:
        train_private(
            model,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            accountant=PrivacyAccountant("rdp", level="sample"),
            seed=seed,
            optimizer="adamw",
        )
        return infer_label(before[bias] - params[bias].detach())
    finally:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(before[k])


def update_gradients(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    *,
    attention_mask: Tensor,
    label: Tensor,
    input_ids: Tensor | None = None,
    inputs_embeds: Tensor | None = None,
    create_graph: bool = False,
) -> dict[str, Tensor]:
    """Gradient of the cross-entropy of one example w.r.t. ``params`` (what a client ships).

    Args:
        model: a (peft-wrapped) sequence classifier.
        params: the trainable parameters by name.
        attention_mask: (1, T).
        label: (1,) class id.
        input_ids / inputs_embeds: exactly one of them.
        create_graph: keep the graph (the attack differentiates the gradient).
    """
    out: Any = model(
        input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask
    )
    loss = nn.functional.cross_entropy(out.logits, label)
    names = list(params)
    grads = torch.autograd.grad(
        loss, [params[n] for n in names], create_graph=create_graph, allow_unused=True
    )
    return {
        n: (g if g is not None else torch.zeros_like(params[n]))
        for n, g in zip(names, grads, strict=True)
    }


def gradient_distance(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Mean over parameters of 1 - cosine similarity (each tensor weighs the same).

    Per tensor, not over the concatenation: the head's gradient is orders of magnitude larger
    than a fresh LoRA B's and would otherwise decide the cosine alone.
    """
    terms = []
    for n in b:
        nb = b[n].norm()
        if float(nb) == 0.0:
            continue
        terms.append(1 - (a[n] * b[n]).sum() / (a[n].norm() * nb + 1e-12))
    if not terms:
        raise ValueError("the observed update is zero: nothing to match")
    return torch.stack(terms).mean()


@dataclass(frozen=True)
class InversionResult:
    """Recovered ids (T,), the inferred label and the final gradient distance."""

    ids: Tensor
    label: int
    distance: float


def invert_gradient(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    observed: Mapping[str, Tensor],
    *,
    length: int,
    bias_name: str,
    steps: int = 200,
    lr: float = 0.05,
    top_k: int = 8,
    sweeps: int = 2,
    seed: int = 0,
) -> InversionResult:
    """DLG on one example's update: recover its ``length`` token ids (no padding).

    Args:
        model: the public model with the same adapter state as when the update was formed.
        params: its trainable parameters by name (those the update covers).
        observed: the observed gradient by name (a plain-SGD client's update divided by
            ``-lr``; any positive multiple works: the objective is the cosine).
        length: sequence length (known to the server from the padding/wire shapes).
        bias_name: the classifier bias parameter's name (label inference, iDLG).
        steps: Adam steps on the continuous embeddings.
        lr: Adam learning rate.
        top_k: nearest-word candidates tried per position in the discrete refinement.
        sweeps: refinement passes over the positions.
        seed: seeds the dummy's initialisation.
    """
    words = model.get_input_embeddings().weight.detach()  # type: ignore[operator]
    label = infer_label(observed[bias_name])
    y = torch.tensor([label])
    mask = torch.ones(1, length, dtype=torch.long)
    target = {n: t.detach().float() for n, t in observed.items()}
    gen = torch.Generator().manual_seed(seed)
    scale = float(words.std())
    dummy = (torch.randn(1, length, words.shape[1], generator=gen) * scale).requires_grad_(True)
    opt = torch.optim.Adam([dummy], lr=lr * scale * 10)
    for _ in range(steps):
        opt.zero_grad()
        g = update_gradients(
            model, params, attention_mask=mask, label=y, inputs_embeds=dummy, create_graph=True
        )
        dist = gradient_distance(g, target)
        dummy.grad = torch.autograd.grad(dist, dummy)[0]
        opt.step()
    ids = torch.cdist(dummy.detach()[0], words).argmin(dim=1)  # (T,)
    candidates = torch.cdist(dummy.detach()[0], words).topk(top_k, largest=False).indices

    def score(seq: Tensor) -> float:
        g = update_gradients(model, params, attention_mask=mask, label=y, input_ids=seq[None])
        return float(gradient_distance(g, target))

    best = score(ids)
    for _ in range(sweeps):
        for p in range(length):
            for c in candidates[p]:
                if int(c) == int(ids[p]):
                    continue
                trial = ids.clone()
                trial[p] = c
                s = score(trial)
                if s < best:
                    best, ids = s, trial
    logger.debug("gradient inversion: label %d, distance %.4f", label, best)
    return InversionResult(ids=ids, label=label, distance=best)


def token_f1(predicted: Tensor, true: Tensor) -> float:
    """F1 of the bag of predicted ids against the bag of true ids (multiset overlap)."""
    p, t = Counter(predicted.tolist()), Counter(true.tolist())
    overlap = sum((p & t).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(p.values()), overlap / sum(t.values())
    return 2 * precision * recall / (precision + recall)


def random_guess_f1(true: Tensor, vocab: Tensor, *, trials: int, seed: int = 0) -> float:
    """Mean :func:`token_f1` of ``len(true)`` ids drawn uniformly from ``vocab``."""
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(trials):
        guess = vocab[torch.randint(0, len(vocab), (len(true),), generator=gen)]
        total += token_f1(guess, true)
    return total / trials
