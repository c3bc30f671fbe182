"""The transport-free split-training step, one function per hop.

Order per micro-batch (U-shape)::

    front_forward -> body_forward -> back_forward (+ loss) -> back_backward
                  -> body_backward -> front_backward

Each function takes and returns tensors, so the same code runs in-process (tests, the
oracle in the benchmark) and on both ends of the gRPC service. What crosses the boundary
between client and server is exactly: the cut activations (B, T, H) and the (B, T) mask
up, the body output (B, T, H) down, its gradient (B, T, H) up, the cut gradient (B, T, H)
down.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedft.split.body_adapter import BodyAdapter
from fedft.split.partition import Blocks, SplitParts


@dataclass(frozen=True)
class FrontOutput:
    """Front forward result. ``hidden`` carries the client's autograd graph.

    Attributes:
        hidden: (B, T', H) cut activations (send ``hidden.detach()``).
        attention_mask: (B, T') 0/1 padding mask (prompt positions included).
    """

    hidden: Tensor
    attention_mask: Tensor


@dataclass(frozen=True)
class BodyContext:
    """What the server keeps between a micro-batch's forward and backward.

    Attributes:
        inputs: (B, T', H) leaf holding the received activations (requires grad).
        output: (B, T', H) body output with the body's autograd graph.
    """

    inputs: Tensor
    output: Tensor


@dataclass(frozen=True)
class BackOutput:
    """Back forward result on the client.

    Attributes:
        loss: scalar loss (already multiplied by ``loss_scale``).
        logits: task logits (never sent anywhere).
        body_output: (B, T', H) leaf holding the received body output (requires grad).
    """

    loss: Tensor
    logits: Tensor
    body_output: Tensor


def front_forward(parts: SplitParts, input_ids: Tensor, attention_mask: Tensor) -> FrontOutput:
    """Client: embeddings (+ prompt) and front blocks. (B, T) ids -> (B, T', H)."""
    hidden, mask = parts.front(input_ids, attention_mask)
    return FrontOutput(hidden=hidden, attention_mask=mask)


def body_forward(
    body: Blocks, adapter: BodyAdapter | None, hidden: Tensor, attention_mask: Tensor
) -> BodyContext:
    """Server: run the body on received activations (B, T', H) with the client's adapter."""
    inputs = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        out = (
            body(inputs, attention_mask)
            if adapter is None
            else adapter.run(body, inputs, attention_mask)
        )
    return BodyContext(inputs=inputs, output=out)


def back_forward(
    parts: SplitParts,
    body_output: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    loss_scale: float = 1.0,
) -> BackOutput:
    """Client: back blocks, head and loss on the received body output (B, T', H).

    Args:
        parts: the split model.
        body_output: (B, T', H) as received from the server.
        attention_mask: (B, T') as returned by :func:`front_forward`.
        labels: (B,) class ids or (B, T) token labels.
        loss_scale: multiplies the loss (1 / number of micro-batches for a mean over them).
    """
    leaf = body_output.detach().requires_grad_(True)
    loss, logits = parts.back(leaf, attention_mask, labels)
    assert loss is not None
    return BackOutput(loss=loss * loss_scale, logits=logits, body_output=leaf)


def back_backward(back: BackOutput) -> Tensor:
    """Client: backprop the loss through the back; returns d loss / d body output (B, T', H)."""
    back.loss.backward()
    assert back.body_output.grad is not None
    return back.body_output.grad


def body_backward(ctx: BodyContext, grad_output: Tensor) -> Tensor:
    """Server: backprop through the body (accumulating adapter grads); returns the cut grad."""
    ctx.output.backward(grad_output.to(ctx.output.dtype))
    assert ctx.inputs.grad is not None
    return ctx.inputs.grad


def front_backward(front: FrontOutput, grad_cut: Tensor) -> None:
    """Client: backprop the cut gradient (B, T', H) into the front's parameters (and prompt)."""
    front.hidden.backward(grad_cut.to(front.hidden.dtype))


def local_loss(
    parts: SplitParts, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor]:
    """SFPrompt local-loss shortcut: front output straight into the back, no body, no server.

    Returns:
        (loss, logits) of the shortcut model.
    """
    hidden, mask = parts.front(input_ids, attention_mask)
    loss, logits = parts.back(hidden, mask, labels)
    assert loss is not None
    return loss, logits


def split_train_step(
    parts: SplitParts,
    adapter: BodyAdapter | None,
    input_ids: Tensor,
    attention_mask: Tensor,
    labels: Tensor,
    *,
    loss_scale: float = 1.0,
) -> Tensor:
    """All six hops in process; gradients land on the client model and on ``adapter``.

    Returns:
        The (scaled) loss, detached.
    """
    front = front_forward(parts, input_ids, attention_mask)
    ctx = body_forward(parts.body, adapter, front.hidden, front.attention_mask)
    back = back_forward(
        parts, ctx.output.detach(), front.attention_mask, labels, loss_scale=loss_scale
    )
    grad_out = back_backward(back)
    grad_cut = body_backward(ctx, grad_out)
    front_backward(front, grad_cut)
    return back.loss.detach()


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``module`` with ``requires_grad``."""
    return [p for p in module.parameters() if p.requires_grad]
