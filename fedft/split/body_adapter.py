"""Per-client LoRA on the server's one shared, frozen body.

Every client session owns a :class:`BodyAdapter`: LoRA factors (Hu et al., 2021) for the
attention projections of the body. The body's own weights stay frozen and shared and are
never written or swapped: an adapted projection computes
``W x + b + scaling * B (A x)`` (= ``(W + scaling * B @ A) x + b``) in a forward hook on the
shared ``nn.Linear``. The hook adds the adapter that is *active on the calling thread*
(:meth:`BodyAdapter.run` makes it active for the duration of one forward), so forwards of
different clients may interleave on different threads — the split server's worker hands
the body from one client's job to another's between blocks — and each uses only its own
adapter.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fedft.types import LoraFactors

#: attention projections adapted by default (Llama names, BERT names).
DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value")

#: ``_active.run``: (adapter, {id(linear): key}) of the forward running on this thread.
_active = threading.local()


def _lora_hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor | None:
    """Forward hook on a shared linear layer: add this thread's adapter's ``s * B (A x)``."""
    active: tuple[BodyAdapter, dict[int, str]] | None = getattr(_active, "run", None)
    if active is None:
        return None
    adapter, keys = active
    key = keys.get(id(module))
    if key is None:  # a layer this adapter does not adapt (or a different body)
        return None
    a, b = adapter.lora_a[key], adapter.lora_b[key]  # (r, in), (out, r)
    x = args[0]
    delta = F.linear(F.linear(x.to(a.dtype), a), b) * adapter.scaling
    return output + delta.to(output.dtype)


class BodyAdapter(nn.Module):
    """LoRA factors for the linear layers of a body whose last name part is in ``targets``.

    Args:
        body: the shared body (read; its weights are never written: :meth:`run` installs a
            forward hook once on each adapted layer, which adds nothing outside a run).
        rank: LoRA rank r >= 1.
        alpha: LoRA alpha; scaling = alpha / r.
        targets: last components of module names to adapt.
        seed: seeds the A init (Kaiming-uniform, as peft); B starts at zero so the adapted
            body equals the frozen body until the first update.
    """

    def __init__(
        self,
        body: nn.Module,
        *,
        rank: int,
        alpha: float,
        targets: tuple[str, ...] = DEFAULT_TARGETS,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank = {rank}: must be >= 1")
        self.scaling = alpha / rank
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        self._names: dict[str, str] = {}
        gen = torch.Generator().manual_seed(seed)
        for name, module in body.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                key = name.replace(".", "__")
                a = torch.empty(rank, module.in_features)  # (r, in)
                bound = 1.0 / math.sqrt(module.in_features)  # kaiming_uniform_(a=sqrt(5))
                a.uniform_(-bound, bound, generator=gen)
                self.lora_a[key] = nn.Parameter(a)
                self.lora_b[key] = nn.Parameter(torch.zeros(module.out_features, rank))  # (out, r)
                self._names[key] = name
        if not self._names:
            raise ValueError(f"no nn.Linear in the body matches targets {targets}")

    def weights(self, body: nn.Module) -> dict[str, Tensor]:
        """Merged weights ``{"<module>.weight": W + scaling * B @ A}`` (out, in) each.

        What a forward with :meth:`run` computes, as one matrix per layer (for checks).
        """
        return {
            f"{name}.weight": body.get_submodule(name).weight
            + self.scaling * (self.lora_b[key] @ self.lora_a[key])
            for key, name in self._names.items()
        }

    def run(self, body: nn.Module, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Body forward with this client's adapter: (B, T, H), (B, T) -> (B, T, H).

        Only this thread's forward sees the adapter; the body is not modified (a hook is
        installed once on each adapted linear layer, and adds nothing outside a run).
        """
        keys = {}
        for key, name in self._names.items():
            module = body.get_submodule(name)
            if not getattr(module, "_fedft_lora_hook", False):
                module.register_forward_hook(_lora_hook)
                module._fedft_lora_hook = True  # type: ignore[assignment]
            keys[id(module)] = key
        outer = getattr(_active, "run", None)
        _active.run = (self, keys)
        try:
            out: Tensor = body(hidden, attention_mask)
        finally:
            _active.run = outer
        return out

    def factors(self) -> dict[str, LoraFactors]:
        """The adapter as shared vocabulary: ``{module name: LoraFactors}`` (detached)."""
        return {
            name: LoraFactors(
                a=self.lora_a[key].detach().clone(),
                b=self.lora_b[key].detach().clone(),
                scaling=self.scaling,
            )
            for key, name in self._names.items()
        }

    def nbytes(self) -> int:
        """Bytes held by the factors (and their gradients, when present)."""
        total = 0
        for p in self.parameters():
            total += p.numel() * p.element_size()
            if p.grad is not None:
                total += p.grad.numel() * p.grad.element_size()
        return total
