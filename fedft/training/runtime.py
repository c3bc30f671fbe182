"""Per-process state a worker reuses across the virtual clients it serves.

The base model and the encoded data are loaded once per worker process and cached here;
each client call only swaps adapters and extras on the shared model. One
local LoRA round (:func:`run_lora_round`) and the server's evaluation of the global model
(:func:`evaluate_global`) live here too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from fedft.adapters import peft_io
from fedft.data import FederatedData, build_federated_data
from fedft.data.encode import Encoded, batches, encode, eval_batches
from fedft.models import default_target_modules, head_parameter_names, load_base_model
from fedft.prompt import PromptTunedModel, SoftPrompt, get_prompt, set_prompt
from fedft.training.coordinator import ClientStart
from fedft.training.local import evaluate, train_steps
from fedft.types import ClientUpdate, LoraFactors, Parts

logger = logging.getLogger(__name__)

Task = Literal["classification", "causal_lm"]


@dataclass
class Runtime:
    """A loaded base model and what the rounds need to know about it."""

    model: nn.Module
    tokenizer: Any
    task: Task
    device: torch.device
    target_modules: list[str]
    #: full module path -> (out_features, in_features) of every adapted Linear.
    shapes: dict[str, tuple[int, int]]
    extras_names: list[str]
    #: the seeded initial value of every extra (same in every process for the same seed).
    initial_extras: dict[str, Tensor]
    #: the adapted layers store weights (in, out) (GPT-2's Conv1D)
    fan_in_fan_out: bool = False


_LOCK = threading.RLock()
_RUNTIMES: dict[tuple[Any, ...], Runtime] = {}
_ENCODED: dict[tuple[Any, ...], Encoded] = {}


def adapted_shapes(model: nn.Module, target_modules: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of every ``nn.Linear`` or GPT-2 ``Conv1D`` named in ``target_modules``.

    A ``Conv1D`` stores its weight (in, out); its shape here is still (out, in), the
    orientation of every delta and factor in fedft.
    """
    shapes = {
        name: peft_io.linear_shape(m)
        for name, m in model.named_modules()
        if peft_io.is_linear(m) and name.rsplit(".", 1)[-1] in target_modules
    }
    if not shapes:
        raise ValueError(
            f"no Linear layer of the model is named any of {target_modules}; "
            "set model.target_modules to the names of its attention projections"
        )
    return shapes


def get_runtime(
    *,
    model_name: str,
    task: Task,
    num_labels: int,
    seed: int,
    device: torch.device,
    target_modules: list[str] | None = None,
    load_in_4bit: bool = False,
) -> Runtime:
    """The process-wide runtime for this model (loaded on first use, then reused)."""
    key = (
        model_name,
        task,
        num_labels,
        seed,
        str(device),
        tuple(target_modules or ()),
        load_in_4bit,
    )
    with _LOCK:
        if key not in _RUNTIMES:
            model, tokenizer = load_base_model(
                model_name, task=task, num_labels=num_labels, seed=seed, load_in_4bit=load_in_4bit
            )
            nn.Module.to(model, device)
            for p in model.parameters():
                p.requires_grad_(False)
            targets = list(target_modules or default_target_modules(model))
            extras = head_parameter_names(model, task)
            params = dict(model.named_parameters())
            _RUNTIMES[key] = Runtime(
                model=model,
                tokenizer=tokenizer,
                task=task,
                device=device,
                target_modules=targets,
                shapes=adapted_shapes(model, targets),
                extras_names=extras,
                initial_extras={n: params[n].detach().cpu().clone() for n in extras},
                fan_in_fan_out=peft_io.uses_fan_in_fan_out(model, targets),
            )
        return _RUNTIMES[key]


def get_data(**kwargs: Any) -> FederatedData:
    """The federated split of a dataset (memoised by ``build_federated_data``)."""
    return build_federated_data(**kwargs)


def get_encoded(
    key: tuple[Any, ...], make: Callable[[], Any], tokenizer: Any, *, task: Task, max_length: int
) -> Encoded:
    """Tokenise ``make()`` once per process per ``key``."""
    with _LOCK:
        if key not in _ENCODED:
            _ENCODED[key] = encode(make(), tokenizer, task=task, max_length=max_length)
        return _ENCODED[key]


def _dense(base_delta: Mapping[str, Tensor | LoraFactors]) -> dict[str, Tensor]:
    return {
        k: (v.delta() if isinstance(v, LoraFactors) else v).float() for k, v in base_delta.items()
    }


PROMPT = "prompt"  # the extras key of a soft prompt (n, H)


def initial_prompt(runtime: Runtime, *, num_tokens: int, seed: int) -> Tensor:
    """The seeded initial soft prompt (n, H) every client starts from."""
    hidden = int(runtime.model.get_input_embeddings().weight.shape[1])  # type: ignore[operator]
    return SoftPrompt(num_tokens, hidden, seed=seed).embedding.detach().clone()


def _train(
    model: nn.Module,
    runtime: Runtime,
    data: Encoded,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    private_train: Callable[[nn.Module], dict[str, float]] | None,
) -> dict[str, float]:
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout: same seed, same round, anywhere
        torch.manual_seed(seed)
        if private_train is not None:
            # DP-SGD draws its batches and noise from generators of its own, seeded from the
            # OS (never a seed the server knows); dropout draws from the global stream, which
            # unseeded would carry over from whatever ran before in this process
            return private_train(model)
        it = batches(data, batch_size=batch_size, steps=steps, seed=seed)
        return train_steps(model, it, lr=lr, device=runtime.device)


def run_lora_round(
    runtime: Runtime,
    *,
    client_id: str,
    start: ClientStart,
    data: Encoded,
    trainable: Parts,
    alpha: float,
    dropout: float,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    private_train: Callable[[nn.Module], dict[str, float]] | None = None,
) -> ClientUpdate:
    """Train one client's LoRA adapter for ``steps`` steps on the shared base model.

    Args:
        private_train: when set (sample-level DP), called with the adapted model instead of
            the plain optimiser loop; returns its metrics (it owns accounting).

    Returns:
        The client's update: its factors, extras, n_k = len(data) and metrics.
    """
    model = runtime.model
    with _LOCK, peft_io.base_delta_applied(model, _dense(start.base_delta)):
        peft_model = peft_io.attach_lora(
            model,
            target_modules=runtime.target_modules,
            rank=start.rank,
            alpha=alpha,
            dropout=dropout,
            trainable=trainable,
            extras=runtime.extras_names,
        )
        try:
            peft_io.set_factors(peft_model, start.adapters)
            peft_io.set_extras(peft_model, start.extras)
            metrics = _train(
                peft_model,
                runtime,
                data,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                private_train=private_train,
            )
            factors = peft_io.get_factors(peft_model)
            extras = peft_io.get_extras(peft_model, runtime.extras_names)
        finally:
            peft_io.detach_lora(peft_model)
    return ClientUpdate(
        client_id=client_id,
        adapters={k: _cpu(v) for k, v in factors.items()},
        num_examples=len(data),
        metrics=metrics,
        extras={k: v.detach().cpu().clone() for k, v in extras.items()},
    )


@contextlib.contextmanager
def _prompted(runtime: Runtime, extras: Mapping[str, Tensor]) -> Iterator[PromptTunedModel]:
    """The shared base model behind a soft prompt set from ``extras`` (head set too).

    Any other base parameter ``extras`` names (a split run's back blocks) is set as well.
    Every parameter set here, the head and the ``requires_grad`` flags are restored on exit.
    """
    model = runtime.model
    names = {*runtime.extras_names, *(k for k in extras if k != PROMPT)}
    saved = peft_io.get_extras(model, sorted(names))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    prompt = extras[PROMPT]
    wrapped = PromptTunedModel(
        model, num_tokens=int(prompt.shape[0]), train_head=bool(runtime.extras_names)
    )
    try:
        set_prompt(wrapped, prompt)
        wrapped.prompt.to(runtime.device)
        peft_io.set_extras(model, {k: v for k, v in extras.items() if k != PROMPT})
        yield wrapped
    finally:
        peft_io.set_extras(model, saved)
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def run_prompt_round(
    runtime: Runtime,
    *,
    client_id: str,
    start: ClientStart,
    data: Encoded,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    private_train: Callable[[nn.Module], dict[str, float]] | None = None,
) -> ClientUpdate:
    """Soft prompt tuning: train the prompt (and the classifier head) on the frozen model.

    Returns:
        An update with no adapters; the prompt and head travel as extras (averaged by p_k).
    """
    with _LOCK, _prompted(runtime, start.extras) as model:
        metrics = _train(
            model,
            runtime,
            data,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            private_train=private_train,
        )
        extras = {PROMPT: get_prompt(model).cpu()}
        extras.update(peft_io.get_extras(runtime.model, runtime.extras_names))
    return ClientUpdate(
        client_id=client_id,
        adapters={},
        num_examples=len(data),
        metrics=metrics,
        extras={k: v.detach().cpu().clone() for k, v in extras.items()},
    )


def _cpu(f: LoraFactors) -> LoraFactors:
    return LoraFactors(
        a=f.a.detach().cpu().clone(),
        b=f.b.detach().cpu().clone(),
        scaling=f.scaling,
        r=None if f.r is None else f.r.detach().cpu().clone(),
    )


def evaluate_global(
    runtime: Runtime,
    *,
    adapters: Mapping[str, LoraFactors],
    base_delta: Mapping[str, Tensor | LoraFactors],
    extras: Mapping[str, Tensor],
    test: Encoded,
    batch_size: int,
) -> dict[str, float]:
    """Evaluate W0 + base_delta + the global adapters (+ extras) on the test set."""
    model = runtime.model
    dense = _dense(base_delta)
    for name, f in adapters.items():  # the adapters' delta folded in exactly
        d = f.delta().float()
        dense[name] = dense[name] + d if name in dense else d
    with _LOCK, peft_io.base_delta_applied(model, dense):
        if PROMPT in extras:
            with _prompted(runtime, extras) as prompted:
                return evaluate(
                    prompted,
                    eval_batches(test, batch_size=batch_size, by_length=True),
                    task=runtime.task,
                    device=runtime.device,
                )
        saved = peft_io.get_extras(model, runtime.extras_names)
        try:
            peft_io.set_extras(model, extras)
            return evaluate(
                model,
                eval_batches(test, batch_size=batch_size, by_length=True),
                task=runtime.task,
                device=runtime.device,
            )
        finally:
            peft_io.set_extras(model, saved)
