"""Per-example gradients on both sides of a U-shaped cut (sample-level DP-SGD for split).

Nothing in the server's body mixes examples (no batch norm; attention stays within one
sequence), so for a batch loss L = Σ_j ℓ_j the row i of every body tensor depends on example
i only, and

    d L / d x_i = d ℓ_i / d x_i        (x_i: example i's cut activations, (T', H))

the cut gradient the server returns is per-example by construction. Example i's gradient of
a client trainable θ is then assembled on the client from two halves:

    g_i(θ) = ∂ℓ_i/∂θ |back  +  J_front,i(θ)ᵀ · (d ℓ_i / d x_i)

the first from the client's back (blocks after the body, head, loss) on the received body
output, the second from the client's front (embeddings, soft prompt, first blocks) seeded
with row i of the returned cut gradient. A parameter used on both ends (Llama's tied
embedding) gets both halves summed. Each example's whole client-side gradient is clipped to
one norm C (:class:`fedft.privacy.persample.ClippedSum`).

The server does the same for a client's :class:`~fedft.split.BodyAdapter`: example i's
adapter gradient is ``J_body,i(adapter)ᵀ · (d ℓ_i / d body output_i)``, clipped to its own C
on the server.

Every function here forms per-example gradients by per-example autograd (a batch of one per
example): exact for any module (masks, rotary embeddings, dropout), at the cost of one small
forward/backward per example.

What DP-SGD does not cover: the cut activations and the gradients that cross the wire are
computed from private examples and are seen by the split server as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedft.privacy.accountant import PrivacyAccountant
from fedft.privacy.dpsgd import per_sample_loss
from fedft.privacy.persample import ClippedSum, noisy_mean
from fedft.split.body_adapter import BodyAdapter
from fedft.split.partition import Blocks, SplitParts

Grads = dict[str, Tensor | None]

__all__ = [
    "DetachedBody",
    "SplitPrivacy",
    "apply_noisy_step",
    "Grads",
    "PerSampleFront",
    "back_per_sample",
    "body_backward_per_sample",
    "body_forward_detached",
    "client_trainables",
    "front_grads_per_sample",
    "front_per_sample",
    "merge",
    "shortcut_per_sample",
]


@dataclass(frozen=True, kw_only=True)
class SplitPrivacy:
    """Sample-level DP for one client's split round (what changes the guarantee).

    Attributes:
        noise_multiplier: σ of the release, the one mechanism per step the accountant records.
            With a server adapter clipped separately under the same Poisson sample, each side
            adds ``side_noise_multiplier(σ, 2)`` (see :mod:`fedft.privacy.persample`).
        max_grad_norm: C, one clip norm for each example's whole client-side gradient (and
            for its server-adapter gradient, on the server).
        accountant: the client's sample-level accountant, kept across rounds.
        delta: δ at which ε is reported.
        epsilon_budget: refuse a round that would take ε above it (None: no check here).
        seed: seeds Poisson sampling and noise; None = fresh OS randomness (deployment).
    """

    noise_multiplier: float
    max_grad_norm: float
    accountant: PrivacyAccountant
    delta: float
    epsilon_budget: float | None = None
    seed: int | None = None


def apply_noisy_step(
    params: Mapping[str, nn.Parameter],
    clip: ClippedSum,
    optimizer: torch.optim.Optimizer,
    *,
    noise_multiplier: float,
    expected_batch_size: int,
    generator: torch.Generator | None,
) -> None:
    """Set every trainable's ``.grad`` to the noisy mean of ``clip`` and take the step."""
    grads = noisy_mean(
        clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size,
        generator=generator,
    )
    for name, p in params.items():
        p.grad = grads[name].to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def client_trainables(parts: SplitParts) -> dict[str, nn.Parameter]:
    """Every trainable parameter on the client's side of the cut, named once each.

    The model's parameters with ``requires_grad`` outside the body (front and back blocks,
    embeddings, head; a tied embedding appears once) plus the soft prompt's
    (``prompt.embedding``).
    """
    model: nn.Module = parts.back.model[0]
    body = {id(p) for p in parts.body.parameters()}
    out: dict[str, nn.Parameter] = {
        name: p for name, p in model.named_parameters() if p.requires_grad and id(p) not in body
    }
    if parts.front.prompt is not None:
        for name, p in parts.front.prompt.named_parameters(prefix="prompt"):
            if p.requires_grad:
                out[name] = p
    return out


def merge(*halves: Grads) -> Grads:
    """Sum per-parameter gradient pieces of one example (None = no contribution)."""
    out: Grads = {}
    for half in halves:
        for name, g in half.items():
            if g is None:
                continue
            prev = out.get(name)
            out[name] = g if prev is None else prev + g
    return out


def _grads(
    output: Tensor, params: Mapping[str, Tensor], seed: Tensor | None, extra: list[Tensor]
) -> tuple[list[Tensor | None], Grads]:
    """Gradients of ``output`` w.r.t. ``extra`` and ``params``, seeded with ``seed``.

    ``seed`` None: ``output`` is a scalar. A parameter that ``output`` does not reach gets None.
    """
    names = list(params)
    inputs = [*extra, *params.values()]
    if not output.requires_grad:
        return [None] * len(extra), dict.fromkeys(names)
    got = torch.autograd.grad(output, inputs, grad_outputs=seed, allow_unused=True)
    return list(got[: len(extra)]), dict(zip(names, got[len(extra) :], strict=True))


@dataclass(frozen=True)
class PerSampleFront:
    """The client front run one example at a time.

    Attributes:
        rows: B tensors (1, T', H), each with its own example's autograd graph.
        hidden: (B, T', H) the rows stacked and detached (what goes on the wire).
        attention_mask: (B, T') 0/1 (prompt positions included).
    """

    rows: list[Tensor]
    hidden: Tensor
    attention_mask: Tensor


def front_per_sample(
    parts: SplitParts, input_ids: Tensor, attention_mask: Tensor
) -> PerSampleFront:
    """Front forward per example: (B, T) ids -> B graphs and the (B, T', H) wire tensor."""
    rows, masks = [], []
    for i in range(input_ids.shape[0]):
        h, m = parts.front(input_ids[i : i + 1], attention_mask[i : i + 1])
        rows.append(h)
        masks.append(m)
    return PerSampleFront(
        rows=rows, hidden=torch.cat(rows).detach(), attention_mask=torch.cat(masks)
    )


def back_per_sample(
    parts: SplitParts,
    params: Mapping[str, Tensor],
    body_output: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
) -> tuple[Tensor, Tensor, list[Grads]]:
    """Back forward/backward per example on the received body output.

    Args:
        parts: the client's split model.
        params: the client trainables (:func:`client_trainables`).
        body_output: (B, T', H) as received from the server.
        attention_mask: (B, T').
        labels: (B,) class ids or (B, T) token labels (-100 ignored).

    Returns:
        losses (B,) (per-example, :func:`fedft.privacy.per_sample_loss`), d ℓ_i / d body
        output_i stacked (B, T', H) (what goes back to the server), and each example's
        gradient of the back's trainables.
    """
    losses, seeds, grads = [], [], []
    for i in range(body_output.shape[0]):
        leaf = body_output[i : i + 1].detach().requires_grad_(True)
        _, logits = parts.back(leaf, attention_mask[i : i + 1], None)
        loss = per_sample_loss(logits, labels[i : i + 1])[0]
        (g_leaf,), g = _grads(loss, params, None, [leaf])
        assert g_leaf is not None
        losses.append(loss.detach())
        seeds.append(g_leaf)
        grads.append(g)
    return torch.stack(losses), torch.cat(seeds), grads


def front_grads_per_sample(
    front: PerSampleFront, params: Mapping[str, Tensor], grad_cut: Tensor
) -> list[Grads]:
    """Each example's gradient of the front's trainables, seeded with its cut-gradient row.

    Args:
        front: from :func:`front_per_sample`.
        params: the client trainables.
        grad_cut: (B, T', H) d ℓ_i / d x_i as returned by the server.
    """
    out = []
    for i, row in enumerate(front.rows):
        _, g = _grads(row, params, grad_cut[i : i + 1].to(row.dtype), [])
        out.append(g)
    return out


def shortcut_per_sample(
    parts: SplitParts,
    params: Mapping[str, Tensor],
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
) -> tuple[Tensor, list[Grads]]:
    """SFPrompt's local-loss shortcut (front -> back, no body) per example.

    Returns:
        losses (B,) and each example's gradient of the client trainables.
    """
    losses, grads = [], []
    for i in range(input_ids.shape[0]):
        h, m = parts.front(input_ids[i : i + 1], attention_mask[i : i + 1])
        _, logits = parts.back(h, m, None)
        loss = per_sample_loss(logits, labels[i : i + 1])[0]
        _, g = _grads(loss, params, None, [])
        losses.append(loss.detach())
        grads.append(g)
    return torch.stack(losses), grads


@dataclass(frozen=True)
class DetachedBody:
    """What a DP session's server keeps between a micro-batch's forward and backward.

    Attributes:
        inputs: (B, T', H) the received activations (no graph).
        attention_mask: (B, T') 0/1.
        output: (B, T', H) the body output that was sent back (no graph).
    """

    inputs: Tensor
    attention_mask: Tensor
    output: Tensor


def body_forward_detached(
    body: Blocks, adapter: BodyAdapter | None, hidden: Tensor, attention_mask: Tensor
) -> DetachedBody:
    """Server, DP session: the batched body output, without a graph.

    The backward redoes the forward one example at a time (:func:`body_backward_per_sample`).
    """
    with torch.no_grad():
        out = (
            body(hidden, attention_mask)
            if adapter is None
            else adapter.run(body, hidden, attention_mask)
        )
    return DetachedBody(inputs=hidden, attention_mask=attention_mask, output=out)


def body_backward_per_sample(
    body: Blocks, adapter: BodyAdapter, ctx: DetachedBody, grad_output: Tensor, clip: ClippedSum
) -> Tensor:
    """Server, DP session: per-example backward through the body with the client's adapter.

    Args:
        body: the shared frozen body.
        adapter: this client's adapter (its parameters are what ``clip`` sums).
        ctx: from :func:`body_forward_detached`.
        grad_output: (B, T', H) d ℓ_i / d body output_i from the client.
        clip: the step's clipped sum of adapter gradients (updated in place).

    Returns:
        (B, T', H) the cut gradient, row i = d ℓ_i / d x_i.
    """
    params = dict(adapter.named_parameters())
    cuts, grads = [], []
    for i in range(ctx.inputs.shape[0]):
        x = ctx.inputs[i : i + 1].detach().requires_grad_(True)
        with torch.enable_grad():
            out = adapter.run(body, x, ctx.attention_mask[i : i + 1])
        (g_x,), g = _grads(out, params, grad_output[i : i + 1].to(out.dtype), [x])
        assert g_x is not None
        cuts.append(g_x)
        grads.append(g)
    clip.add(grads)
    return torch.cat(cuts)
