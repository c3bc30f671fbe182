"""One client's round of split learning (SFPrompt) inside a Flower round.

The client owns a soft prompt (in its front) and the classifier head (in its back); the
split server runs the shared, frozen middle of the model. Per round (SFPrompt, Cao et al.,
2024):

1. ``local_loss_steps`` local-loss steps: front -> back shortcut, no server traffic;
2. EL2N pruning (Paul et al., 2021): keep the top ``keep_fraction`` of the client's samples;
3. ``steps`` split-training steps on the kept samples against the split server over gRPC
   (micro-batches pipelined up to the granted credits, tensors in ``wire_dtype``).

:func:`run_split_round` reads in that order: ``_check_round`` (the start, the DP budget) ->
``_train`` (the local-loss phase, ``_pruned``, ``_split_train``) -> ``_Trained.update``; its
settings are one typed :class:`SplitKnobs`.

The update has no LoRA adapters; the prompt (n, H), the head and (``split.train_back``,
the default) the weights of the client's back blocks travel as extras, as in
:func:`fedft.training.runtime.run_prompt_round`: the server starts every client from the
extras it sends, averages them by p_k and evaluates the whole model in-process (identical to
the split model while the body is frozen). The start's extras decide what trains here.

The split parts are built over the worker's cached base model (``runtime.model``): its
modules are shared, never copied, and the model's head values, ``requires_grad`` flags,
gradients and train/eval mode are restored on exit.

Sample-level DP (``dp=SplitPrivacy(...)``): every step that touches the client's examples
is a DP-SGD step over a Poisson batch (q = B / N): the local-loss steps on the shortcut, and
the split steps, where each example's gradient of every client trainable is formed from the
back and from the cut gradient the server returns (:mod:`fedft.split.dp`), clipped to one
norm C, noised once per step; the accountant records each step. EL2N pruning is skipped
under DP: keeping the top γ by score makes whether one example trains depend on every other
example's score, which no per-example clipping bounds. The cut activations and gradients the
split server sees are not covered (see docs/threat-model.md).

Deployed clients reach the split server over mutual TLS: ``fedft client --certs DIR`` puts
the paths of ``ca.crt``, ``client-<i>.crt`` and ``client-<i>-tls.key`` and the id
``client-<i>`` in the node config (keys in :data:`fedft.transport.records.SPLIT_TLS_KEYS`);
:func:`client_tls_from_node_config` turns them into a :class:`~client.split_client.ClientTls`
that ``run_split_round(..., tls=...)`` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import threading
from collections.abc import Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar, Unpack

import grpc
import torch
from torch import Tensor

from client.split_client import ClientTls, MicroBatch, SplitClient, Traffic
from fedft.adapters import peft_io
from fedft.data.encode import Encoded, batches
from fedft.privacy.accountant import BudgetExceededError, check_budget
from fedft.privacy.persample import ClippedSum, poisson_sample
from fedft.privacy.planner import sample_rate_for
from fedft.prompt import SoftPrompt, get_prompt, set_prompt
from fedft.seeds import derive_seed
from fedft.split import (
    SplitParts,
    back_parameter_names,
    local_loss_phase,
    select_samples,
    split_model,
)
from fedft.split.dp import SplitPrivacy, apply_noisy_step, client_trainables, shortcut_per_sample
from fedft.split.dx import CutNoise, DxNoise
from fedft.training.coordinator import ClientStart
from fedft.training.runtime import _LOCK, PROMPT, Runtime
from fedft.transport import split_wire as wire
from fedft.transport.records import SPLIT_CA_KEY, SPLIT_CERT_KEY, SPLIT_ID_KEY, SPLIT_KEY_KEY
from fedft.transport.split_wire import Limits
from fedft.types import ClientUpdate

logger = logging.getLogger(__name__)

T = TypeVar("T")


def client_tls_from_node_config(node_config: Mapping[str, Any]) -> ClientTls | None:
    """The split client's mutual-TLS material from a Flower node config.

    Args:
        node_config: ``context.node_config``; ``split-ca``, ``split-cert`` and ``split-key``
            are paths to PEM files, ``split-client-id`` (optional) the id to declare.

    Returns:
        None when none of the three paths is set (plaintext: simulation, ``--insecure``).

    Raises:
        ValueError: only some of the three paths are set.
    """
    paths = {k: node_config.get(k) for k in (SPLIT_CA_KEY, SPLIT_CERT_KEY, SPLIT_KEY_KEY)}
    given = {k: v for k, v in paths.items() if v not in (None, "")}
    if not given:
        return None
    if len(given) != len(paths):
        missing = sorted(set(paths) - set(given))
        raise ValueError(
            f"split mutual TLS needs all of {sorted(paths)} in the node config; missing "
            f"{missing}: this node talks TLS to the server but has no split client "
            "certificate (client-<i>.crt and client-<i>-tls.key from `fedft certs` in "
            "--certs DIR), and the split channel never falls back to plaintext"
        )
    client_id = node_config.get(SPLIT_ID_KEY)
    return ClientTls(
        ca_cert=Path(str(given[SPLIT_CA_KEY])),
        cert=Path(str(given[SPLIT_CERT_KEY])),
        key=Path(str(given[SPLIT_KEY_KEY])),
        client_id=str(client_id) if client_id else None,
    )


class _DeviceSplitClient(SplitClient):
    """A :class:`SplitClient` that puts decoded tensors on the client's device (CPU or GPU)."""

    def _decode(self, frame: wire.Frame, like: Tensor) -> Tensor:
        return super()._decode(frame, like).to(like.device)


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a fresh event loop in its own thread (safe inside a running loop)."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro))
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="fedft-split-round", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


@contextlib.contextmanager
def _split_over(
    runtime: Runtime, extras: Mapping[str, Tensor], *, front_layers: int, back_layers: int
) -> Iterator[SplitParts]:
    """The cached base model cut into front/body/back, with the start's prompt and extras.

    Only the prompt (in the front) and the start's other extras (the head and, with
    ``split.train_back``, the back blocks) are trainable. On exit those parameters'
    values, the ``requires_grad`` flags, gradients and mode are restored; the parts share
    the model's modules (nothing is copied).

    Raises:
        ValueError: an extra names a parameter of the server's body (it never runs here).
    """
    model: Any = runtime.model
    names = trained_names(extras)
    parts = split_model(model, front_layers=front_layers, back_layers=back_layers)
    body = {id(p) for p in parts.body.parameters()}
    in_body = [n for n, p in model.named_parameters() if n in names and id(p) in body]
    allowed = {*runtime.extras_names, *back_parameter_names(model, back_layers=back_layers)}
    elsewhere = [n for n in names if n not in allowed and n not in in_body]
    if elsewhere:  # e.g. the embeddings: their update would show which tokens were used
        raise ValueError(
            f"the start's extras name parameters outside the head and the back blocks "
            f"{elsewhere[:3]}: only the prompt, the head and the client's back blocks train "
            "on the client"
        )
    if in_body:
        raise ValueError(
            f"the start's extras name parameters of the split server's body {in_body[:3]}: "
            "only the prompt, the head and the client's back blocks train on the client"
        )
    saved = peft_io.get_extras(model, sorted({*runtime.extras_names, *names}))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = bool(model.training)
    prompt = extras[PROMPT]  # (n, H)
    soft = SoftPrompt(int(prompt.shape[0]), parts.hidden_size)
    set_prompt(soft, prompt)
    try:
        parts.front.prompt = soft.to(runtime.device)
        for p in model.parameters():
            p.requires_grad_(False)
        peft_io.set_extras(model, {k: v for k, v in extras.items() if k != PROMPT})
        params = dict(model.named_parameters())
        for name in names:
            params[name].requires_grad_(True)
        yield parts
    finally:
        peft_io.set_extras(model, saved)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)


def trained_names(extras: Mapping[str, Tensor]) -> list[str]:
    """The model parameters a split round trains besides the prompt: the start's extras."""
    return sorted(k for k in extras if k != PROMPT)


def _tuples(
    data: Encoded, *, batch_size: int, steps: int, seed: int, device: torch.device
) -> Iterator[MicroBatch]:
    for b in batches(data, batch_size=batch_size, steps=steps, seed=seed):
        yield b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device)


def _poisson_batch(data: Encoded, idx: Tensor, device: torch.device) -> MicroBatch:
    """The examples at ``idx`` as one (b, T) batch on ``device`` (b may be 0)."""
    if len(idx) == 0:
        t = data.input_ids.shape[1]
        empty = torch.zeros(0, t, dtype=data.input_ids.dtype, device=device)
        return empty, empty.clone(), data.labels[:0].to(device)
    b = data.subset(idx).as_batch()
    return b["input_ids"].to(device), b["attention_mask"].to(device), b["labels"].to(device)


def _micro_batches(batch: MicroBatch, count: int) -> list[MicroBatch]:
    """Cut a (B, ...) batch into at most ``count`` near-equal micro-batches along B."""
    ids, mask, labels = batch
    n = min(count, int(ids.shape[0]))
    return list(
        zip(
            torch.tensor_split(ids, n),
            torch.tensor_split(mask, n),
            torch.tensor_split(labels, n),
            strict=True,
        )
    )


async def _split_phase(
    parts: SplitParts,
    steps: list[MicroBatch],
    *,
    target: str,
    model_id: str,
    wire_dtype: wire.WireDType,
    in_flight: int,
    optimizer: torch.optim.Optimizer,
    tls: ClientTls | None = None,
    dp: _PrivateRun | None = None,
) -> tuple[list[float], Traffic]:
    """``len(steps)`` split-training steps in one session; returns losses and traffic.

    With ``dp`` each step is one DP-SGD step (an empty Poisson batch still takes its noisy
    step and commits).
    """
    max_batch = max([int(s[0].shape[0]) for s in steps] + [1])
    max_seq = max([int(s[0].shape[1]) for s in steps] + [1])
    prompt_len = 0 if parts.front.prompt is None else int(parts.front.prompt.num_tokens)
    limits = Limits(
        max_batch=max(1, math.ceil(max_batch / in_flight)),
        max_seq_len=max_seq + prompt_len,
        max_in_flight=in_flight,
    )
    client = _DeviceSplitClient(
        parts, target=target, model_id=model_id, wire_dtype=wire_dtype, limits=limits, tls=tls
    )
    losses: list[float] = []
    async with client:
        for step, batch in enumerate(steps):
            mbs = _micro_batches(batch, in_flight) if batch[0].shape[0] else []
            if dp is None:
                loss = await client.train_step(mbs, round_=0, step=step, optimizer=optimizer)
            else:
                clip = dp.clip()
                loss = await client.train_step(mbs, round_=0, step=step, clip=clip)
                dp.step(clip, optimizer)
            losses.append(loss)
    return losses, client.traffic


class _PrivateRun:
    """One round's DP-SGD state on the client: trainables, q, B, the generators, counters."""

    def __init__(self, dp: SplitPrivacy, parts: SplitParts, n: int, batch_size: int) -> None:
        self.dp = dp
        self.params = client_trainables(parts)
        self.n = n
        self.q = sample_rate_for(n, batch_size)
        self.expected_batch = min(batch_size, n)  # = q n
        base = secrets.randbits(63) if dp.seed is None else dp.seed
        self.sampler = torch.Generator().manual_seed(base)
        self.noise = torch.Generator().manual_seed(derive_seed(base, 1))
        self.taken = self.samples = self.clipped = 0

    def draw(self) -> Tensor:
        """A Poisson batch's indices."""
        return poisson_sample(self.n, self.q, self.sampler)

    def clip(self) -> ClippedSum:
        return ClippedSum(self.params, max_grad_norm=self.dp.max_grad_norm)

    def step(self, clip: ClippedSum, optimizer: torch.optim.Optimizer) -> None:
        """Noise once, step, and record the step on the accountant."""
        apply_noisy_step(
            self.params,
            clip,
            optimizer,
            noise_multiplier=self.dp.noise_multiplier,  # one part clipped: the client's side
            expected_batch_size=self.expected_batch,
            generator=self.noise,
        )
        self.dp.accountant.step(noise_multiplier=self.dp.noise_multiplier, sample_rate=self.q)
        self.taken += 1
        self.samples += clip.samples
        self.clipped += clip.clipped

    def metrics(self) -> dict[str, float]:
        return {
            "sample_rate": self.q,
            "noise_multiplier": float(self.dp.noise_multiplier),
            "max_grad_norm": float(self.dp.max_grad_norm),
            "dp_steps": float(self.taken),
            "mean_batch_size": self.samples / self.taken if self.taken else 0.0,
            "clip_fraction": self.clipped / self.samples if self.samples else 0.0,
            "epsilon_sample": self.dp.accountant.epsilon(self.dp.delta),
            "delta": float(self.dp.delta),
        }


def _private_local_phase(
    parts: SplitParts,
    data: Encoded,
    run: _PrivateRun,
    steps: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
) -> list[float]:
    """SFPrompt's local-loss phase as DP-SGD steps on the shortcut (no server traffic)."""
    losses = []
    for _ in range(steps):
        clip = run.clip()
        idx = run.draw()
        if len(idx):
            b = data.subset(idx).as_batch()
            per, grads = shortcut_per_sample(
                parts,
                run.params,
                b["input_ids"].to(device),
                b["attention_mask"].to(device),
                b["labels"].to(device),
            )
            clip.add(grads)
            losses.append(float(per.mean()))
        run.step(clip, optimizer)
    return losses


class SplitKnobs(TypedDict):
    """The settings of one SFPrompt round (``split`` and ``federation`` sections).

    Attributes:
        server_address: ``host:port`` of the split server.
        model_id: the model id the split server serves (the run's ``model.name``).
        front_layers: blocks before the body (client front).
        back_layers: blocks after the body (client back).
        wire_dtype: "bf16", "fp16" (scaled) or "fp32" on the wire.
        in_flight: micro-batches per step, pipelined up to the granted credits.
        local_loss_steps: SFPrompt local-loss steps (no server traffic).
        keep_fraction: γ in (0, 1]: the top-EL2N fraction of samples kept for split training.
        steps: split-training optimiser steps.
        batch_size: examples per step (cut into ``in_flight`` micro-batches).
        lr: AdamW learning rate of the prompt and head.
        seed: seeds batch order.
        tls: mutual TLS to the split server (:func:`client_tls_from_node_config`); None or
            absent = plaintext (loopback simulation).
        dp: sample-level DP-SGD (module docstring): every local-loss and split step is a
            DP-SGD step over a Poisson batch, recorded on ``dp.accountant``; no EL2N pruning.
            None or absent: no DP.
        dx_epsilon: SAP's d_χ-privacy (:mod:`fedft.split.dx`): every token embedding gets
            noise ∝ exp(-ε‖z‖) before the front runs, in every phase (fresh OS randomness),
            reported as the metric ``dx_epsilon`` (never mixed with DP-SGD's ε). None or
            absent: no noise.
        cut_noise_std: Gaussian noise of this std on the front's output, every phase
            (fresh OS randomness), reported as the metric ``cut_noise_std``; no DP guarantee
            (:class:`fedft.split.dx.CutNoise`). 0 or absent: none.
    """

    server_address: str
    model_id: str
    front_layers: int
    back_layers: int
    wire_dtype: wire.WireDType
    in_flight: int
    local_loss_steps: int
    keep_fraction: float
    steps: int
    batch_size: int
    lr: float
    seed: int
    tls: NotRequired[ClientTls | None]
    dp: NotRequired[SplitPrivacy | None]
    dx_epsilon: NotRequired[float | None]
    cut_noise_std: NotRequired[float]


def run_split_round(
    runtime: Runtime,
    *,
    client_id: str,
    start: ClientStart,
    data: Encoded,
    **knobs: Unpack[SplitKnobs],
) -> ClientUpdate:
    """One SFPrompt round: local-loss phase, EL2N pruning, split training over gRPC.

    Args:
        runtime: the worker's cached base model (cut here, restored on exit).
        client_id: this client's id.
        start: the round's start; ``start.extras`` holds the prompt (n, H) under
            ``"prompt"`` and the head parameters.
        data: this client's encoded examples (N of them).
        **knobs: the round's settings, :class:`SplitKnobs`.

    Returns:
        An update with ``adapters={}`` and ``extras={"prompt": (n, H), <head>}``;
        ``num_examples = N``; metrics ``train_loss`` (mean split loss), ``local_loss``,
        ``kept_samples``, ``steps``, ``split_frames_up/down`` and ``split_bytes_up/down``
        (tensor payload bytes on the split wire); with ``dp`` also ``sample_rate``,
        ``noise_multiplier``, ``max_grad_norm``, ``dp_steps``, ``mean_batch_size``,
        ``clip_fraction``, ``epsilon_sample`` and ``delta``; with ``dx_epsilon`` also
        ``dx_epsilon``; with ``cut_noise_std`` > 0 also ``cut_noise_std``.

    Raises:
        RuntimeError: the split server could not be reached or refused the session.
        BudgetExceededError: with ``dp.epsilon_budget``, the round would exceed it (nothing
            is trained).
    """
    _check_round(start, data, knobs)
    cut = {"front_layers": knobs["front_layers"], "back_layers": knobs["back_layers"]}
    with _LOCK, _split_over(runtime, start.extras, **cut) as parts:
        trained = _train(runtime, parts, client_id, data, knobs, trained_names(start.extras))
    return trained.update(client_id, len(data))


def _check_round(start: ClientStart, data: Encoded, k: SplitKnobs) -> None:
    """Refuse a start split learning cannot train from, or a round past the DP budget."""
    if PROMPT not in start.extras:
        raise ValueError("split learning needs the soft prompt in the start's extras")
    if start.adapters or start.base_delta:
        raise ValueError(
            "split learning keeps the base weights frozen (the server's body is shared): the "
            "start must carry no LoRA adapters or base delta"
        )
    steps, in_flight = k["steps"], k["in_flight"]
    if steps < 1 or in_flight < 1:
        raise ValueError(f"steps = {steps}, in_flight = {in_flight}: both must be >= 1")
    dp = k.get("dp")
    if dp is not None and dp.epsilon_budget is not None:
        decision = check_budget(
            dp.accountant,
            noise_multiplier=dp.noise_multiplier,
            sample_rate=sample_rate_for(len(data), k["batch_size"]),
            steps=k["local_loss_steps"] + steps,
            epsilon_budget=dp.epsilon_budget,
            delta=dp.delta,
        )
        if not decision.allowed:
            raise BudgetExceededError(decision)


@dataclass(frozen=True)
class _Trained:
    """What the split round trained and measured (before it becomes an update)."""

    losses: list[float]
    local: list[float]
    kept: int
    traffic: Traffic
    extras: dict[str, Tensor]
    private: _PrivateRun | None
    dx_epsilon: float | None = None
    cut_noise_std: float = 0.0

    def update(self, client_id: str, num_examples: int) -> ClientUpdate:
        """The client's update: the prompt and head, the round's metrics."""
        mean_loss = sum(self.losses) / len(self.losses)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"split training diverged: mean loss {mean_loss}")
        t = self.traffic
        logger.info(
            "client %s: split round kept %d/%d samples, %d frames up, loss %.4f",
            client_id,
            self.kept,
            num_examples,
            t.frames_up,
            mean_loss,
        )
        metrics = {
            "train_loss": mean_loss,
            "kept_samples": float(self.kept),
            "steps": float(len(self.losses)),
            "split_frames_up": float(t.frames_up),
            "split_frames_down": float(t.frames_down),
            "split_bytes_up": float(t.bytes_up),
            "split_bytes_down": float(t.bytes_down),
        }
        if self.local:
            metrics["local_loss"] = sum(self.local) / len(self.local)
        if self.private is not None:
            metrics.update(self.private.metrics())
        if self.dx_epsilon is not None:
            metrics["dx_epsilon"] = float(self.dx_epsilon)
        if self.cut_noise_std > 0:
            metrics["cut_noise_std"] = float(self.cut_noise_std)
        return ClientUpdate(
            client_id=client_id,
            adapters={},
            num_examples=num_examples,
            metrics=metrics,
            extras=self.extras,
        )


def _train(
    runtime: Runtime,
    parts: SplitParts,
    client_id: str,
    data: Encoded,
    k: SplitKnobs,
    names: list[str],
) -> _Trained:
    """Local-loss phase -> EL2N pruning -> split phase, on the cut model (lock held);
    ``names``: the model parameters that train besides the prompt (they return as extras)."""
    device = runtime.device
    model: Any = runtime.model
    dx_epsilon = k.get("dx_epsilon")
    if dx_epsilon is not None:  # the parts are this round's: the noise leaves with them
        parts.front.privatizer = DxNoise(dx_epsilon)
    cut_noise_std = float(k.get("cut_noise_std", 0.0))
    if cut_noise_std > 0:
        parts.front.cut_noise = CutNoise(cut_noise_std)
    params = [p for p in parts.front.parameters() if p.requires_grad]
    params += [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=k["lr"])
    dp = k.get("dp")
    private = None if dp is None else _PrivateRun(dp, parts, len(data), k["batch_size"])
    model.train()
    if private is not None:
        local = _private_local_phase(parts, data, private, k["local_loss_steps"], optimizer, device)
    else:
        batches = _tuples(
            data,
            batch_size=k["batch_size"],
            steps=k["local_loss_steps"],
            seed=k["seed"],
            device=device,
        )
        local = local_loss_phase(parts, batches, optimizer)
    kept = _pruned(runtime, parts, data, k, private=private is not None, client_id=client_id)
    model.train()
    if private is not None:
        split_steps = [_poisson_batch(data, private.draw(), device) for _ in range(k["steps"])]
    else:
        split_steps = list(
            _tuples(
                kept,
                batch_size=k["batch_size"],
                steps=k["steps"],
                seed=k["seed"] + 1,
                device=device,
            )
        )
    losses, traffic = _split_train(parts, split_steps, k, optimizer, private)
    model.eval()
    assert parts.front.prompt is not None
    extras = {PROMPT: get_prompt(parts.front.prompt).cpu()}
    extras.update(peft_io.get_extras(model, names))
    extras = {key: v.detach().cpu().clone() for key, v in extras.items()}
    return _Trained(losses, local, len(kept), traffic, extras, private, dx_epsilon, cut_noise_std)


def _pruned(
    runtime: Runtime,
    parts: SplitParts,
    data: Encoded,
    k: SplitKnobs,
    *,
    private: bool,
    client_id: str,
) -> Encoded:
    """The top-EL2N fraction γ of ``data`` (all of it when γ = 1 or under DP)."""
    gamma = k["keep_fraction"]
    if gamma >= 1.0:
        return data
    if private:
        logger.info(
            "client %s: EL2N pruning skipped under sample-level DP (top-γ selection "
            "depends on every example's score)",
            client_id,
        )
        return data
    runtime.model.eval()
    device = runtime.device
    idx = select_samples(
        parts,
        data.input_ids.to(device),
        data.attention_mask.to(device),
        data.labels.to(device),
        gamma=gamma,
        batch_size=k["batch_size"],
    )
    return data.subset(idx.cpu())


def _split_train(
    parts: SplitParts,
    split_steps: list[MicroBatch],
    k: SplitKnobs,
    optimizer: torch.optim.Optimizer,
    private: _PrivateRun | None,
) -> tuple[list[float], Traffic]:
    """The split phase over gRPC; a failed server is a RuntimeError that says what to do."""
    address = k["server_address"]
    try:
        return _run(
            _split_phase(
                parts,
                split_steps,
                target=address,
                model_id=k["model_id"],
                wire_dtype=k["wire_dtype"],
                in_flight=k["in_flight"],
                optimizer=optimizer,
                tls=k.get("tls"),
                dp=private,
            )
        )
    except grpc.aio.AioRpcError as err:
        raise RuntimeError(
            f"split server at {address!r} failed: {err.code().name}: "
            f"{err.details()}; start one with `fedft split-server` or leave split.server "
            "empty in a simulation"
        ) from err
