"""LoRA-FAIR (Bian et al., 2025): FedIT plus a server-side correction of B.

With ``A = sum p_k A_k``, ``B = sum p_k B_k`` and the ideal ``dW = sum p_k s B_k A_k``, the
server finds ``dB`` minimising ``(1 - cos(dW, s (B + dB) A)) + lambda * ||dB||_F`` (cosine
over the flattened matrices) and broadcasts ``(A, B + dB)`` as every client's next start.
W0 is unchanged and the download equals FedIT's.

Implementation notes:
- Everything is computed in factored form in float64: with ``A_s = vstack(p_k s A_k)`` and
  ``B_s = hstack(B_k)``, ``<dW, M> = s * sum((B_s^T B) * (A_s A^T))`` and
  ``||M||^2 = s^2 * sum((B^T B) * (A A^T))``, so no (out, in) matrix is ever formed.
- Adam runs on ``D = dB / rms(B)`` (the same objective, preconditioned so that ``fair_lr``
  is relative to the scale of B), starting from dB = 0, deterministic on the CPU.
- The best iterate (lowest objective, dB = 0 included) is returned. Hence
  ``1 - cos* + lambda ||dB*|| <= 1 - cos_FedIT``, which gives the paper's invariants
  exactly: ``cos* >= cos_FedIT``, ``||dB*|| <= (1 - cos_FedIT) / lambda`` (so dB -> 0 as
  lambda grows), and dB = 0 when FedIT is already exact (e.g. all clients share A).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from fedft.aggregation._weights import (
    average_extras,
    check_updates,
    client_weights,
    weighted_mean,
)
from fedft.aggregation.base import Aggregator
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

__all__ = ["FairCorrection", "LoraFair", "fair_correction"]

#: objective improvements smaller than this are rounding noise, not progress.
_TOL = 1e-12


@dataclass(frozen=True)
class FairCorrection:
    """The server correction of one module.

    Attributes:
        delta_b: dB, (out, r) in float64.
        cos_before: cos(dW, s B A) (FedIT).
        cos_after: cos(dW, s (B + dB) A).
    """

    delta_b: Tensor
    cos_before: float
    cos_after: float


def _stacked_product_norm(b_s: Tensor, a_s: Tensor) -> Tensor:
    """||b_s @ a_s||_F for b_s (out, K r) and a_s (K r, in), by the cheaper route.

    Through the (K r) x (K r) Gram matrices, O((K r)^2 (out + in)), while K r is below
    out * in / (out + in); else through the dense (out, in) product, O(K r out in), which
    stays linear in the number of clients.
    """
    kr, (out, inp) = a_s.shape[0], (b_s.shape[0], a_s.shape[1])
    if kr * (out + inp) <= out * inp:
        return torch.sqrt(((b_s.T @ b_s) * (a_s @ a_s.T)).sum().clamp_min(0.0))
    return torch.linalg.matrix_norm(b_s @ a_s)


def fair_correction(
    factors: Sequence[LoraFactors],
    weights: Sequence[float],
    *,
    lam: float,
    steps: int,
    lr: float,
) -> FairCorrection:
    """Solve LoRA-FAIR's correction for one module.

    Args:
        factors: the clients' factors (one rank r and scaling s), A_k (r, in), B_k (out, r).
        weights: p_k, one per client.
        lam: lambda >= 0, weight of ``||dB||_F``.
        steps: Adam steps (0 returns dB = 0).
        lr: Adam learning rate, relative to ``rms(B)``.
    """
    f64 = torch.float64
    s = float(factors[0].scaling)
    a_bar = weighted_mean([f.a for f in factors], weights).to(f64)  # (r, in)
    b_bar = weighted_mean([f.b for f in factors], weights).to(f64)  # (out, r)
    a_s = torch.cat(
        [pk * s * f.a.detach().to(f64) for pk, f in zip(weights, factors, strict=True)]
    )  # (K r, in)
    b_s = torch.cat([f.b.detach().to(f64) for f in factors], dim=1)  # (out, K r)
    dw_norm = _stacked_product_norm(b_s, a_s)
    cross = a_s @ a_bar.T  # (K r, r)
    gram_a = a_bar @ a_bar.T  # (r, r)

    def cosine(b: Tensor) -> Tensor:
        inner = s * ((b_s.T @ b) * cross).sum()
        m_norm = abs(s) * torch.sqrt(((b.T @ b) * gram_a).sum().clamp_min(0.0))
        return inner / (dw_norm * m_norm).clamp_min(1e-300)

    zero = torch.zeros_like(b_bar)
    with torch.no_grad():
        cos0 = float(cosine(b_bar))
    if steps <= 0 or float(dw_norm) == 0.0 or 1.0 - cos0 <= _TOL:
        return FairCorrection(delta_b=zero, cos_before=cos0, cos_after=cos0)
    sigma = float(b_bar.pow(2).mean().sqrt()) or 1.0
    d = torch.zeros_like(b_bar, requires_grad=True)
    m1, m2 = torch.zeros_like(b_bar), torch.zeros_like(b_bar)  # Adam moments
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    best_obj, best_db, best_cos = 1.0 - cos0, zero, cos0
    for step in range(steps + 1):
        db = sigma * d
        cos = cosine(b_bar + db)
        obj = (1.0 - cos) + lam * torch.linalg.matrix_norm(db)
        val = float(obj.detach())
        if math.isfinite(val) and val < best_obj - _TOL:
            best_obj, best_db, best_cos = val, db.detach().clone(), float(cos.detach())
        if step == steps:
            break
        (grad,) = torch.autograd.grad(obj, d)
        with torch.no_grad():  # Adam (Kingma & Ba, 2015) with bias correction
            m1.mul_(beta1).add_(grad, alpha=1 - beta1)
            m2.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            m_hat = m1 / (1 - beta1 ** (step + 1))
            v_hat = m2 / (1 - beta2 ** (step + 1))
            d.sub_(lr * m_hat / (v_hat.sqrt() + eps))
    return FairCorrection(delta_b=best_db, cos_before=cos0, cos_after=best_cos)


class LoraFair(Aggregator):
    """FedIT averages with LoRA-FAIR's server-side correction of B."""

    name: ClassVar[str] = "lora_fair"
    supports_mixed_ranks: ClassVar[bool] = False
    linear: ClassVar[bool] = False
    trainable: ClassVar[Parts] = "ab"

    def __init__(
        self, *, fair_lambda: float = 0.01, fair_steps: int = 200, fair_lr: float = 0.01
    ) -> None:
        """Set the correction's options.

        Args:
            fair_lambda: lambda >= 0, weight of ``||dB||_F``.
            fair_steps: Adam steps per module and round (>= 0).
            fair_lr: Adam learning rate (> 0), relative to ``rms(B)``.
        """
        super().__init__()
        if fair_lambda < 0 or fair_steps < 0 or fair_lr <= 0:
            raise ValueError(
                f"lora_fair: need fair_lambda >= 0, fair_steps >= 0, fair_lr > 0; got "
                f"{fair_lambda}, {fair_steps}, {fair_lr}"
            )
        self.fair_lambda = float(fair_lambda)
        self.fair_steps = int(fair_steps)
        self.fair_lr = float(fair_lr)

    def aggregate(self, updates: Sequence[ClientUpdate]) -> AggregationResult:
        """Return ``(A, B + dB)`` per module; metrics carry the cosines before/after."""
        ups = check_updates(updates, algorithm=self.name, mixed_ranks=False)
        p = client_weights(ups)
        adapters: dict[str, LoraFactors] = {}
        before, after, sq_norm = [], [], 0.0
        for mod in sorted(ups[0].adapters):
            fs = [u.adapters[mod] for u in ups]
            fix = fair_correction(
                fs, p, lam=self.fair_lambda, steps=self.fair_steps, lr=self.fair_lr
            )
            b_bar = weighted_mean([f.b for f in fs], p)
            b_new = (b_bar.to(torch.float64) + fix.delta_b).to(b_bar.dtype)  # (out, r)
            adapters[mod] = LoraFactors(
                a=weighted_mean([f.a for f in fs], p), b=b_new, scaling=fs[0].scaling
            )
            before.append(fix.cos_before)
            after.append(fix.cos_after)
            sq_norm += float(fix.delta_b.pow(2).sum())
        self._shapes = {mod: f.shape for mod, f in adapters.items()}
        metrics = {
            "clients": float(len(ups)),
            "fair_cos_before": sum(before) / len(before),
            "fair_cos_after": sum(after) / len(after),
            "fair_cos_after_min": min(after),
            "fair_delta_b_norm": math.sqrt(sq_norm),
        }
        return AggregationResult(adapters=adapters, metrics=metrics, extras=average_extras(ups, p))

    def state_dict(self) -> dict[str, Any]:
        """Return the shapes and the correction's options."""
        state = super().state_dict()
        state.update(fair_lambda=self.fair_lambda, fair_steps=self.fair_steps, fair_lr=self.fair_lr)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the shapes and options."""
        super().load_state_dict(state)
        self.fair_lambda = float(state["fair_lambda"])
        self.fair_steps = int(state["fair_steps"])
        self.fair_lr = float(state["fair_lr"])
