"""Per-client LoRA on the server's one shared, frozen body.

Every client session owns a :class:`BodyAdapter`: LoRA factors (Hu et al., 2021) for the
attention projections of the body. The body's own weights stay frozen and shared; a forward
pass uses ``W + scaling * B @ A`` for the adapted weights through
:func:`torch.func.functional_call`, so no client's weights are ever written into the shared
modules (no stale weights across clients). ``functional_call`` swaps parameters on the
module for the duration of the call, so callers must run body forwards one at a time
(the split server uses a single compute thread).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedft.types import LoraFactors

#: attention projections adapted by default (Llama names, BERT names).
DEFAULT_TARGETS = ("q_proj", "v_proj", "query", "value")


class BodyAdapter(nn.Module):
    """LoRA factors for the linear layers of a body whose last name part is in ``targets``.

    Args:
        body: the shared body (only read; never modified).
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
        """Adapted weights ``{"<module>.weight": W + scaling * B @ A}`` (out, in) each."""
        return {
            f"{name}.weight": body.get_submodule(name).weight
            + self.scaling * (self.lora_b[key] @ self.lora_a[key])
            for key, name in self._names.items()
        }

    def run(self, body: nn.Module, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """Body forward with this client's adapter: (B, T, H), (B, T) -> (B, T, H)."""
        out: Tensor = torch.func.functional_call(body, self.weights(body), (hidden, attention_mask))
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
