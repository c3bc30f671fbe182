"""Per-client LoRA on the server's one shared, frozen body.

Every client session owns a :class:`BodyAdapter`: LoRA factors (Hu et al., 2021) for the
attention projections of the body. The body's own weights stay frozen and shared and are
never written or swapped: each adapted ``nn.Linear`` of the body gets a forward (installed
once) that computes ``(W + scaling * B @ A) x + b`` with the adapter that is *active on the
calling thread*, and ``W x + b`` when none is (:meth:`BodyAdapter.run` makes an adapter
active for the duration of one forward). So forwards of different clients may interleave
on different threads — the split server's worker hands the body from one client's job to
another's between blocks — and each uses only its own adapter.
"""

from __future__ import annotations

import functools
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


def _adapted_linear(module: nn.Linear, x: Tensor) -> Tensor:
    """A shared linear layer's forward: ``W x + b``, or ``(W + s B A) x + b``.

    The second for the layers that the adapter active on this thread adapts.
    """
    active: tuple[BodyAdapter, dict[int, str]] | None = getattr(_active, "run", None)
    key = None if active is None else active[1].get(id(module))
    if active is None or key is None:
        return F.linear(x, module.weight, module.bias)
    adapter = active[0]
    delta = adapter.lora_b[key] @ adapter.lora_a[key]  # (out, r) @ (r, in)
    return F.linear(x, module.weight + adapter.scaling * delta, module.bias)


class BodyAdapter(nn.Module):
    """LoRA factors for the linear layers of a body whose last name part is in ``targets``.

    Args:
        body: the shared body (read; its weights are never written: :meth:`run` installs a
            thread-aware forward once on each adapted layer, ``W x + b`` outside a run).
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
                if type(module) is not nn.Linear:  # its forward is not W x + b
                    raise ValueError(f"{name} is a {type(module).__name__}: only nn.Linear")
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

        Only this thread's forward sees the adapter; the body's weights are not touched.
        """
        keys = {}
        for key, name in self._names.items():
            module = body.get_submodule(name)
            if type(module) is not nn.Linear:  # another body than the one it was built for
                raise ValueError(f"{name} is a {type(module).__name__}, not an nn.Linear")
            if not getattr(module, "_fedft_adapted", False):
                module.forward = functools.partial(_adapted_linear, module)  # type: ignore[method-assign]
                module._fedft_adapted = True  # type: ignore[assignment]
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
