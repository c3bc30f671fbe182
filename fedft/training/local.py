"""One local round on one client, evaluation, and the gradients Fed-SB's init needs.

Everything here takes a model and tensors; nothing reads a config. The model is any HF-style
module whose ``forward(input_ids=, attention_mask=, labels=)`` returns ``.loss`` and
``.logits`` (a peft model, a soft-prompt wrapper, ...).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fedft.adapters import peft_io

logger = logging.getLogger(__name__)

Task = Literal["classification", "causal_lm"]


def resolve_device(device: str) -> torch.device:
    """``"auto"`` is CUDA when present, else the CPU; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "federation.device = 'cuda' but no CUDA device is visible; "
            "use device = 'auto' (GPU when present, else CPU) or 'cpu'"
        )
    return torch.device(device)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on a GPU that supports it (fp16 otherwise); a no-op on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad`` (adapters, heads, prompts)."""
    return [p for p in model.parameters() if p.requires_grad]


def _to(batch: Mapping[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_steps(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    lr: float,
    device: torch.device,
    weight_decay: float = 0.0,
) -> dict[str, float]:
    """Plain AdamW over the trainable parameters, one step per batch.

    Returns:
        ``{"train_loss": mean loss over steps, "steps": number of steps}``.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to fine-tune")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda") if _needs_scaler(device) else None
    model.train()
    total, steps = 0.0, 0
    for batch in batches:
        batch = _to(batch, device)
        with autocast(device):
            loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total += float(loss.detach())
        steps += 1
    model.eval()
    if steps and not math.isfinite(total):
        raise FloatingPointError(f"training diverged: mean loss {total / steps} after {steps}")
    return {"train_loss": total / max(steps, 1), "steps": float(steps)}


def _needs_scaler(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_bf16_supported()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    *,
    task: Task,
    device: torch.device,
) -> dict[str, float]:
    """Loss and the task's metric on held-out batches.

    Classification: ``accuracy`` (argmax over logits) and the mean cross-entropy ``loss``.
    Causal LM: ``loss`` is the mean cross-entropy per answer token (labels != -100), and
    ``accuracy`` the next-token accuracy on answer tokens; ``perplexity`` = exp(loss).
    """
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        batch = _to(batch, device)
        with autocast(device):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        logits = logits.float()
        labels = batch["labels"]
        if task == "classification":
            loss_sum += float(
                nn.functional.cross_entropy(logits, labels, reduction="sum")
            )  # logits: (B, C)
            correct += int((logits.argmax(-1) == labels).sum())
            count += int(labels.numel())
        else:
            logits, labels = logits[:, :-1], labels[:, 1:]  # predict token t+1 from t
            # a soft-prompt wrapper returns logits for its virtual tokens too: keep the last T
            logits = logits[:, -labels.shape[1] :]
            mask = labels != -100
            loss_sum += float(
                nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum")
            )
            correct += int((logits[mask].argmax(-1) == labels[mask]).sum())
            count += int(mask.sum())
    if count == 0:
        raise ValueError("evaluation saw no labelled examples (empty test set?)")
    loss = loss_sum / count
    out = {"loss": loss, "accuracy": correct / count}
    if task == "causal_lm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out


def weight_gradients(
    model: nn.Module,
    module_names: Iterable[str],
    batches: Iterator[Mapping[str, Tensor]] | Iterable[Mapping[str, Tensor]],
    *,
    device: torch.device,
) -> dict[str, Tensor]:
    """Mean gradient of the loss w.r.t. each named Linear's full weight: {name: (out, in)}.

    Used for the Fed-SB initialisation (computed on the server's public split, so it costs
    no client's privacy budget). The model's own ``requires_grad`` flags are restored.
    """
    modules = dict(model.named_modules())
    weights = {name: modules[name].weight for name in module_names}
    conv1d = {name for name in weights if peft_io.is_conv1d(modules[name])}  # (in, out)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for w in weights.values():
        w.requires_grad_(True)
        w.grad = None
    n = 0
    try:
        model.train()
        for batch in batches:
            batch = _to(batch, device)
            model(**batch).loss.backward()
            n += 1
    finally:
        model.eval()
        grads = {
            name: (w.grad.detach().clone() / max(n, 1))
            if w.grad is not None
            else torch.zeros_like(w)
            for name, w in weights.items()
        }
        grads = {name: g.T.contiguous() if name in conv1d else g for name, g in grads.items()}
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[name])
    if n == 0:
        raise ValueError("no batches to compute the Fed-SB init gradient from")
    return grads
