"""Sample-level DP-SGD on a client's trainable parameters (Opacus).

Algorithm 1 of Abadi et al. (2016), "Deep Learning with Differential Privacy": each step
draws a Poisson batch (every example independently with probability q = B / n), computes
per-example gradients of the trainable parameters only (LoRA factors, Fed-SB's R, soft
prompts, a classifier head) with Opacus' ``GradSampleModule`` hooks, clips each example's
whole gradient to L2 norm ≤ C, sums, adds N(0, σ²C²) to every coordinate, divides by the
expected batch size B and takes an optimiser step. The caller's
:class:`~fedft.privacy.accountant.PrivacyAccountant` records exactly the steps taken.

What changes the guarantee (σ, C, B, the accountant) is passed as keyword arguments and
returned in the metrics; what cannot (the physical batch a Poisson batch is cut into to
fit in memory) is :class:`PerformanceFlags`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from fedft.privacy import grad_samplers  # noqa: F401  (registers SoftPrompt with Opacus)
from fedft.privacy.accountant import (
    BudgetDecision,
    BudgetExceededError,
    PrivacyAccountant,
    check_budget,
)
from fedft.privacy.persample import poisson_sample
from fedft.privacy.planner import sample_rate_for
from fedft.seeds import derive_seed

logger = logging.getLogger(__name__)

__all__ = [
    "BudgetDecision",
    "BudgetExceededError",
    "EncodedBatch",
    "LossFn",
    "PerformanceFlags",
    "PrivateData",
    "check_budget",
    "per_sample_loss",
    "train_private",
]

#: (logits, labels) -> per-example losses (B,). Each example's loss must depend on that
#: example only (no normalisation by counts over the batch), or clipping bounds nothing.
LossFn = Callable[[Tensor, Tensor], Tensor]


class EncodedBatch(Protocol):
    """Tokenised examples (e.g. ``fedft.data.encode.Encoded``).

    ``input_ids`` and ``attention_mask`` are (B, T); ``labels`` is (B,) for classification
    or (B, T) for causal LM (-100 = ignored).
    """

    @property
    def input_ids(self) -> Tensor: ...  # noqa: D102

    @property
    def attention_mask(self) -> Tensor: ...  # noqa: D102

    @property
    def labels(self) -> Tensor: ...  # noqa: D102


class PrivateData(Protocol):
    """A client's examples: ``len()`` and ``subset(indices: LongTensor) -> EncodedBatch``."""

    def __len__(self) -> int: ...

    def subset(self, indices: Tensor) -> EncodedBatch: ...  # noqa: D102


@dataclass(frozen=True, kw_only=True)
class PerformanceFlags:
    """Knobs that change speed and memory, never the privacy guarantee.

    Attributes:
        physical_batch_size: the most examples in one forward/backward pass; a Poisson batch
            larger than this is processed in pieces whose clipped gradients are summed
            before the one noisy step (Opacus' BatchMemoryManager scheme). 0 = no limit.
    """

    physical_batch_size: int = 0

    def __post_init__(self) -> None:
        if self.physical_batch_size < 0:
            raise ValueError(
                f"physical_batch_size = {self.physical_batch_size}: an integer >= 0 (0 = no limit)"
            )


def per_sample_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-example cross-entropy: (B,).

    Classification: ``logits`` (B, C), ``labels`` (B,). Causal LM: ``logits`` (B, T', V),
    ``labels`` (B, T) with -100 for ignored positions; token t+1 is predicted from t, the
    last T-1 logit positions are used (a soft-prompt wrapper prepends virtual tokens), and
    each example's loss is the mean over its own labelled tokens (0 when it has none), so
    it does not depend on the other examples in the batch (HF's own causal-LM loss averages
    over all tokens of the batch, which couples examples).
    """
    logits = logits.float()
    if logits.dim() == 2:
        return F.cross_entropy(logits, labels, reduction="none")  # (B,)
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"logits{tuple(logits.shape)} with labels{tuple(labels.shape)}: want (B, C) with "
            "(B,) or (B, T, V) with (B, T)"
        )
    targets = labels[:, 1:]  # (B, T-1)
    pred = logits[:, -targets.shape[1] - 1 : -1]  # (B, T-1, V)
    tok = F.cross_entropy(
        pred.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )  # (B, T-1)
    count = (targets != -100).sum(dim=1).clamp(min=1)  # (B,)
    return tok.sum(dim=1) / count


def _fresh_seed() -> int:
    return secrets.randbits(63)


def _per_sample_norms(params: list[nn.Parameter]) -> Tensor:
    """L2 norm of each example's whole gradient over ``params``: (b,)."""
    samples = [getattr(p, "grad_sample") for p in params]  # Opacus sets it: (b, *p.shape)  # noqa: B009
    norms = [g.reshape(len(g), -1).norm(2, dim=1) for g in samples]
    return torch.stack(norms, dim=1).norm(2, dim=1)


def train_private(
    model: nn.Module,
    data: PrivateData,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    accountant: PrivacyAccountant,
    seed: int | None = None,
    device: str | torch.device = "cpu",
    loss_fn: LossFn | None = None,
    delta: float | None = None,
    epsilon_budget: float | None = None,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    performance: PerformanceFlags | None = None,
) -> dict[str, float]:
    """Run ``steps`` DP-SGD steps on ``model``'s trainable parameters, in place.

    The model is moved to ``device`` before Opacus wraps it (wrapping first and moving after
    silently breaks peft + Opacus training), and unwrapped afterwards: no hooks or Opacus
    attributes remain, ``.grad`` is None and the train/eval mode is restored.

    Args:
        model: a (possibly peft-wrapped) HF model; ``forward(input_ids=, attention_mask=)``
            returns ``.logits``. Parameters with ``requires_grad`` are trained.
        data: the client's examples (``len()`` and ``subset(indices)``).
        steps: DP-SGD steps to take.
        batch_size: B, the expected Poisson batch size: q = B / len(data) (capped at 1).
        lr: learning rate.
        noise_multiplier: σ; the noise added to the clipped sum has std σ·C.
        max_grad_norm: C, the per-example clipping norm.
        accountant: the client's sample-level accountant, kept across rounds; it records
            one step per step taken (also when training stops with an error).
        seed: seeds the Poisson sampling and the noise. None draws a fresh seed from the OS:
            use None in deployment, since anyone who knows the seed can subtract the noise.
        device: where to train.
        loss_fn: (logits, labels) -> per-example losses (B,); default
            :func:`per_sample_loss`.
        delta: when given, the result includes ``epsilon_sample`` at this δ.
        epsilon_budget: when given (with ``delta``), refuse to train if the round would take
            ε above it: :class:`BudgetExceededError`, and nothing changes.
        optimizer: ``"sgd"`` (plain SGD) or ``"adamw"``; a fresh one per call.
        performance: :class:`PerformanceFlags` (physical batch size).

    Returns:
        ``train_loss`` (mean per-example loss over the step batches; not privatised),
        ``steps``, ``sample_rate``, ``noise_multiplier``, ``max_grad_norm``,
        ``mean_batch_size`` (realised Poisson batch), ``clip_fraction`` (share of per-example
        gradients with norm > C) and, with ``delta``, ``epsilon_sample`` and ``delta``.

    Raises:
        BudgetExceededError: the round would exceed ``epsilon_budget``.
        ValueError: a bad argument, no trainable parameters, or an accountant that is not
            sample-level.
    """
    perf = performance or PerformanceFlags()
    if accountant.level != "sample":
        raise ValueError(
            f"DP-SGD spends a sample-level budget; got a {accountant.level}-level accountant"
        )
    if steps < 0 or lr <= 0 or noise_multiplier < 0 or max_grad_norm <= 0:
        raise ValueError(
            f"steps = {steps} (>= 0), lr = {lr} (> 0), noise_multiplier = {noise_multiplier} "
            f"(>= 0), max_grad_norm = {max_grad_norm} (> 0)"
        )
    if noise_multiplier == 0:
        logger.warning("noise_multiplier = 0: clipped but not private (epsilon = inf)")
    n = len(data)
    q = sample_rate_for(n, batch_size)
    expected_batch = min(batch_size, n)  # = q * n
    if epsilon_budget is not None:
        if delta is None:
            raise ValueError("epsilon_budget needs delta")
        decision = check_budget(
            accountant,
            noise_multiplier=noise_multiplier,
            sample_rate=q,
            steps=steps,
            epsilon_budget=epsilon_budget,
            delta=delta,
        )
        if not decision.allowed:
            logger.warning("%s", decision.message)
            raise BudgetExceededError(decision)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: nothing to fine-tune")
    loss_fn = loss_fn or per_sample_loss
    dev = torch.device(device)
    model.to(dev)  # before wrapping: see the module docstring
    base_seed = _fresh_seed() if seed is None else seed
    sampler_gen = torch.Generator().manual_seed(base_seed)
    noise_gen = torch.Generator(device=dev).manual_seed(derive_seed(base_seed, 1))
    base_opt: torch.optim.Optimizer = (
        torch.optim.SGD(params, lr=lr) if optimizer == "sgd" else torch.optim.AdamW(params, lr=lr)
    )
    was_training = model.training
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    dp_opt = DPOptimizer(
        base_opt,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch,
        loss_reduction="mean",
        generator=noise_gen,
    )
    taken, seen, clipped, loss_sum = 0, 0, 0, 0.0
    try:
        gsm.train()
        for _ in range(steps):
            dp_opt.zero_grad(set_to_none=True)
            chosen = poisson_sample(n, q, sampler_gen)  # (b,)
            if len(chosen) == 0:  # an empty Poisson batch still releases noise
                for p in params:
                    empty = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                    setattr(p, "grad_sample", empty)  # noqa: B010 (Opacus' attribute)
                dp_opt.step()
            else:
                pieces = (
                    chosen.split(perf.physical_batch_size)
                    if perf.physical_batch_size
                    else (chosen,)
                )
                for i, piece in enumerate(pieces):
                    batch = data.subset(piece)
                    out = gsm(
                        input_ids=batch.input_ids.to(dev),
                        attention_mask=batch.attention_mask.to(dev),
                    )
                    losses = loss_fn(out.logits, batch.labels.to(dev))  # (b,)
                    losses.mean().backward()
                    norms = _per_sample_norms(params)
                    clipped += int((norms > max_grad_norm).sum())
                    loss_sum += float(losses.detach().sum())
                    seen += len(piece)
                    if i < len(pieces) - 1:
                        dp_opt.signal_skip_step(do_skip=True)  # clip + accumulate only
                        dp_opt.step()
                        dp_opt.zero_grad(set_to_none=True)
                    else:
                        dp_opt.step()  # clip, add N(0, σ²C²), divide by B, update
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=q, steps=1)
            taken += 1
    finally:
        dp_opt.zero_grad(set_to_none=True)
        gsm.to_standard_module()  # removes hooks and Opacus' per-parameter attributes
        for p in params:
            if hasattr(p, "summed_grad"):
                del p.summed_grad
            p.grad = None
        model.train(was_training)
    metrics = {
        "train_loss": loss_sum / seen if seen else float("nan"),
        "steps": float(taken),
        "sample_rate": q,
        "noise_multiplier": float(noise_multiplier),
        "max_grad_norm": float(max_grad_norm),
        "mean_batch_size": seen / taken if taken else 0.0,
        "clip_fraction": clipped / seen if seen else 0.0,
    }
    if delta is not None:
        metrics["epsilon_sample"] = accountant.epsilon(delta)
        metrics["delta"] = float(delta)
    logger.info("DP-SGD round: %s", metrics)
    return metrics
