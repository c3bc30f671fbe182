"""peft state <-> fedft values: the only module that knows peft's naming.

Module paths in and out of this module are those of the plain Hugging Face model, e.g.
``"bert.encoder.layer.0.attention.self.query"``, never peft's
``"base_model.model....lora_A.default.weight"``.

One base model is shared by every client a worker serves: :func:`attach_lora` wraps it
with a fresh adapter, :func:`detach_lora` restores it bit for bit (no merge), so the next
client can attach another rank.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import Tensor, nn

from fedft.adapters.math import svd_factors
from fedft.types import LoraFactors, Parts

logger = logging.getLogger(__name__)

ADAPTER = "default"

# requires_grad flags of a base model before attach_lora, restored by detach_lora.
_saved_flags: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def _inner(model: nn.Module) -> nn.Module:
    """The plain Hugging Face model inside a PeftModel (or the model itself)."""
    if isinstance(model, PeftModel):
        return cast(nn.Module, model.base_model.model)
    return model


def _lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    return {
        name: module
        for name, module in _inner(model).named_modules()
        if isinstance(module, LoraLayer) and ADAPTER in module.lora_A
    }


def _lora_a(layer: LoraLayer) -> nn.Linear:
    return cast(nn.Linear, cast(nn.ModuleDict, layer.lora_A)[ADAPTER])


def _lora_b(layer: LoraLayer) -> nn.Module:
    """The adapter's ``lora_B``: a Linear, or for Fed-SB ``Sequential(R, B)``."""
    return cast(nn.ModuleDict, layer.lora_B)[ADAPTER]


def _linear(module: nn.Module, index: int | None = None) -> nn.Linear:
    if index is not None:
        module = cast(nn.Sequential, module)[index]
    return cast(nn.Linear, module)


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear layer whose weight is stored (in, out)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a ``Conv1D``: the layers LoRA adapts."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(out_features, in_features) of an ``nn.Linear`` (4-bit ones too) or a ``Conv1D``."""
    if isinstance(module, nn.Linear):  # a bitsandbytes Linear4bit's weight is packed
        return int(module.out_features), int(module.in_features)
    out, inp = cast(Tensor, module.weight).shape[::-1]  # Conv1D: (in, out)
    return int(out), int(inp)


def linear_weight(module: nn.Module) -> Tensor:
    """The weight as (out, in): a transposed view for ``Conv1D`` (writes reach the weight)."""
    weight = cast(Tensor, module.weight)
    return weight.T if is_conv1d(module) else weight


def uses_fan_in_fan_out(model: nn.Module, target_modules: Sequence[str]) -> bool:
    """Whether the targeted layers are ``Conv1D`` (peft's ``fan_in_fan_out=True``)."""
    targets = set(target_modules)
    return any(
        is_conv1d(m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets
    )


def _clean_name(name: str) -> str:
    return name.replace(".base_layer.", ".")


def _base_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Base-model parameters under their plain names (peft's ``base_layer`` removed)."""
    return {
        _clean_name(name): p for name, p in _inner(model).named_parameters() if ".lora_" not in name
    }


def _check_trainable(trainable: str) -> None:
    if trainable not in ("ab", "b", "r"):
        raise ValueError(f"trainable={trainable!r}; allowed: 'ab', 'b' (FFA-LoRA), 'r' (Fed-SB)")


def attach_lora(
    model: nn.Module,
    *,
    target_modules: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    trainable: Parts = "ab",
    extras: Sequence[str] = (),
    seed: int | None = None,
) -> PeftModel:
    """Wrap a (shared) base model with a fresh LoRA adapter.

    ``trainable`` picks what trains: ``"ab"`` both factors (LoRA), ``"b"`` only B with A
    frozen (FFA-LoRA, Sun et al., 2024), ``"r"`` only an (r, r) matrix R between frozen B
    and A (Fed-SB / LoRA-SB, Ponkshe et al., 2025): the layer then computes
    ``W0 x + scaling * B R A x`` with ``lora_B`` replaced by
    ``nn.Sequential(Linear(r, r) [R], Linear(r, out) [B])`` (plain nn.Linear, no buffers:
    Opacus-compatible). A fresh Fed-SB adapter has random A and B and R = 0 (zero delta,
    non-zero gradient for R); a fresh LoRA adapter has random A and B = 0 (peft's init).

    Args:
        model: a plain Hugging Face model without an adapter.
        target_modules: names (or name suffixes) of the nn.Linear layers to adapt.
        rank: LoRA rank r >= 1.
        alpha: LoRA alpha; scaling = alpha / r.
        dropout: dropout on the adapter input.
        trainable: ``"ab"``, ``"b"`` or ``"r"``.
        extras: base-model parameter names that also train (classifier head, pooler).
        seed: if given, the adapter's random init is drawn under this seed (global RNG
            untouched): every client gets the same A (FFA-LoRA) or B, A (Fed-SB).

    Returns:
        The PeftModel; every parameter not listed above has ``requires_grad=False``.
    """
    _check_trainable(trainable)
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if isinstance(model, PeftModel) or hasattr(model, "peft_config") or _lora_layers(model):
        raise ValueError("the model already carries an adapter; call detach_lora first")
    base_params = dict(model.named_parameters())
    unknown = [name for name in extras if name not in base_params]
    if unknown:
        raise ValueError(f"extras {unknown} are not parameters of the model")
    _saved_flags[model] = {name: p.requires_grad for name, p in base_params.items()}
    # peft types lora_alpha as int but computes scaling = lora_alpha / r with any number.
    config = LoraConfig(
        r=rank,
        lora_alpha=cast(Any, alpha),
        lora_dropout=dropout,
        target_modules=list(target_modules),
        bias="none",
        fan_in_fan_out=uses_fan_in_fan_out(model, target_modules),
    )
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
        layers = _lora_layers(peft_model)
        if not layers:
            raise ValueError(f"no module of the model matches target_modules={target_modules}")
        if trainable == "r":
            for layer in layers.values():
                a = _lora_a(layer).weight  # (rank, in)
                middle = nn.Linear(rank, rank, bias=False, device=a.device, dtype=a.dtype)
                nn.init.zeros_(middle.weight)
                b = nn.Linear(
                    rank,
                    int(cast(int, layer.out_features)),
                    bias=False,
                    device=a.device,
                    dtype=a.dtype,
                )
                cast(nn.ModuleDict, layer.lora_B)[ADAPTER] = nn.Sequential(middle, b)
    for p in peft_model.parameters():
        p.requires_grad_(False)
    for layer in layers.values():
        if trainable == "ab":
            _lora_a(layer).weight.requires_grad_(True)
        if trainable in ("ab", "b"):
            _linear(_lora_b(layer)).weight.requires_grad_(True)
        else:
            _linear(_lora_b(layer), 0).weight.requires_grad_(True)
    named = _base_parameters(peft_model)
    for name in extras:
        named[name].requires_grad_(True)
    logger.debug("attached LoRA r=%d (%s) to %d modules", rank, trainable, len(layers))
    return peft_model


def detach_lora(peft_model: PeftModel) -> nn.Module:
    """Remove the adapter without merging and return the untouched base model.

    Base weights are the very same tensors as before :func:`attach_lora` (bit-identical)
    and their ``requires_grad`` flags are restored. Also works on a model from
    ``PeftModel.from_pretrained``: ``modules_to_save`` copies are dropped, the original
    modules come back.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"detach_lora expects a PeftModel, got {type(peft_model).__name__}")
    inner = _inner(peft_model)
    # peft's unload() would keep a modules_to_save copy (the adapter's head); put the
    # original module back instead, so the base model is exactly what it was.
    wrappers = [
        (name, module)
        for name, module in inner.named_modules()
        if isinstance(module, ModulesToSaveWrapper)
    ]
    for name, module in wrappers:
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, module.original_module)
    base = peft_model.unload()
    flags = _saved_flags.pop(base, None)
    if flags is not None:
        for name, p in base.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
    return base


def _is_fedsb(layer: LoraLayer) -> bool:
    return isinstance(_lora_b(layer), nn.Sequential)


def get_factors(peft_model: nn.Module) -> dict[str, LoraFactors]:
    """The adapter's factors (copies), keyed by plain module path.

    Returns:
        module -> LoraFactors(a (r, in), b (out, r), scaling, r (r, r) for Fed-SB).
    """
    out: dict[str, LoraFactors] = {}
    for name, layer in _lora_layers(peft_model).items():
        a = _lora_a(layer).weight.detach().clone()
        scaling = float(layer.scaling[ADAPTER])
        if _is_fedsb(layer):
            middle = _linear(_lora_b(layer), 0).weight.detach().clone()
            b = _linear(_lora_b(layer), 1).weight.detach().clone()
            out[name] = LoraFactors(a=a, b=b, scaling=scaling, r=middle)
        else:
            b = _linear(_lora_b(layer)).weight.detach().clone()
            out[name] = LoraFactors(a=a, b=b, scaling=scaling)
    return out


def set_factors(
    peft_model: nn.Module, factors: Mapping[str, LoraFactors], *, strict: bool = True
) -> None:
    """Load factors into the adapter (in place), including each module's scaling.

    Args:
        peft_model: a model from :func:`attach_lora`.
        factors: module -> LoraFactors with the adapter's shapes; Fed-SB adapters need
            ``r`` set, plain ones need it unset.
        strict: require exactly the adapted modules (else a subset is fine).

    Raises:
        KeyError: unknown modules, or (strict) adapted modules without factors.
        ValueError: a shape or kind mismatch.
    """
    layers = _lora_layers(peft_model)
    unknown = sorted(set(factors) - set(layers))
    missing = sorted(set(layers) - set(factors))
    if unknown or (strict and missing):
        raise KeyError(
            f"set_factors: unknown modules {unknown[:5]}, missing modules {missing[:5]} "
            f"(adapter has {len(layers)} modules)"
        )
    with torch.no_grad():
        for name, f in factors.items():
            layer = layers[name]
            fedsb = _is_fedsb(layer)
            if fedsb != (f.r is not None):
                kind = "Fed-SB (needs r)" if fedsb else "plain LoRA (r must be None)"
                raise ValueError(f"set_factors: module {name!r} is {kind}")
            a_w = _lora_a(layer).weight
            if fedsb:
                r_w, b_w = _linear(_lora_b(layer), 0).weight, _linear(_lora_b(layer), 1).weight
            else:
                r_w, b_w = None, _linear(_lora_b(layer)).weight
            pairs = [("a", f.a, a_w), ("b", f.b, b_w)]
            if r_w is not None and f.r is not None:
                pairs.append(("r", f.r, r_w))
            for label, src, dst in pairs:
                if src.shape != dst.shape:
                    raise ValueError(
                        f"set_factors: module {name!r} {label}{tuple(src.shape)} does not "
                        f"fit the adapter's {tuple(dst.shape)}"
                    )
            for _, src, dst in pairs:
                dst.copy_(src)
            layer.scaling[ADAPTER] = float(f.scaling)


def get_extras(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    """Copies of base-model parameters by plain name (works on a PeftModel too)."""
    params = _base_parameters(model)
    unknown = [n for n in names if n not in params]
    if unknown:
        raise KeyError(f"get_extras: {unknown} are not parameters of the model")
    return {n: params[n].detach().clone() for n in names}


def set_extras(model: nn.Module, values: Mapping[str, Tensor]) -> None:
    """Copy tensors into base-model parameters by plain name, shapes checked."""
    params = _base_parameters(model)
    for name, value in values.items():
        if name not in params:
            raise KeyError(f"set_extras: {name!r} is not a parameter of the model")
        if params[name].shape != value.shape:
            raise ValueError(
                f"set_extras: {name!r} has shape {tuple(params[name].shape)}, "
                f"got {tuple(value.shape)}"
            )
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def _base_weight(model: nn.Module, module: str) -> Tensor:
    try:
        sub = _inner(model).get_submodule(module)
    except AttributeError as err:
        raise KeyError(f"no module {module!r} in the model") from err
    if isinstance(sub, LoraLayer):
        sub = sub.get_base_layer()
    weight = getattr(sub, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"module {module!r} has no 2-D weight (out, in)")
    return linear_weight(sub)  # (out, in); a view of a Conv1D's (in, out) weight


@contextmanager
def base_delta_applied(model: nn.Module, deltas: Mapping[str, Tensor]) -> Iterator[nn.Module]:
    """Temporarily add dense deltas to base weights; the originals come back exactly.

    Args:
        model: a plain or peft-wrapped model.
        deltas: module path -> delta (out, in) added to that module's weight.

    Yields:
        ``model``, with ``W0 + delta`` in the named modules.
    """
    weights = {m: _base_weight(model, m) for m in deltas}
    for module, delta in deltas.items():
        if weights[module].shape != delta.shape:
            raise ValueError(
                f"base delta for {module!r} has shape {tuple(delta.shape)}, the weight "
                f"{tuple(weights[module].shape)}"
            )
    originals: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            for module, delta in deltas.items():
                w = weights[module]
                originals[module] = w.detach().clone()
                w.add_(delta.to(device=w.device, dtype=w.dtype))
        yield model
    finally:
        with torch.no_grad():
            for module, original in originals.items():
                weights[module].copy_(original)


_TASK_TYPES = {"classification": TaskType.SEQ_CLS, "causal_lm": TaskType.CAUSAL_LM}


def _head_module(module: str) -> str:
    top = module.split(".", 1)[0]
    return top if top in ("classifier", "score") else module


def save_peft_adapter(
    out_dir: str | Path,
    *,
    base_model_source: str,
    deltas: Mapping[str, Tensor],
    extras: Mapping[str, Tensor],
    task: Literal["classification", "causal_lm"],
    target_modules: Sequence[str],
    rank: int | None = None,
    fan_in_fan_out: bool = False,
) -> None:
    """Write the final adapter in PEFT's format (adapter_config.json + safetensors).

    Each total delta is factored at its numerical rank (:func:`svd_factors`, scaling 1:
    per-module ``rank_pattern`` and ``alpha_pattern`` = rank), or at exactly ``rank`` for
    every module when given (a delta of higher rank must be truncated first), so
    ``PeftModel.from_pretrained(base, out_dir)`` computes ``W0 + delta`` up to float32
    rounding. Extras (head) are stored as ``modules_to_save``.

    Args:
        out_dir: folder to write (created).
        base_model_source: recorded as ``base_model_name_or_path``.
        deltas: module path -> total delta (out, in) on that module's weight.
        extras: base-model parameter name -> final value (whole modules, e.g. both
            ``classifier.weight`` and ``classifier.bias``).
        task: ``"classification"`` or ``"causal_lm"``.
        target_modules: the adapted layer names; every delta's module must end with one.
        rank: one rank for every module (uniform adapter, no rank_pattern); None: each
            module at its numerical rank.
        fan_in_fan_out: the adapted layers store weights (in, out) (GPT-2's Conv1D).
    """
    if task not in _TASK_TYPES:
        raise ValueError(f"task={task!r}; allowed: {sorted(_TASK_TYPES)}")
    if not deltas:
        raise ValueError("save_peft_adapter: no deltas to save")
    suffixes = tuple(target_modules)
    stray = [m for m in deltas if m.rsplit(".", 1)[-1] not in suffixes and m not in suffixes]
    if stray:
        raise ValueError(f"deltas for {stray[:5]} are not in target_modules={list(suffixes)}")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    for module, delta in sorted(deltas.items()):
        f = svd_factors(delta.detach().cpu(), rank)
        ranks[module] = f.rank
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = f.a.float().contiguous()
        tensors[f"{prefix}.lora_B.weight"] = f.b.float().contiguous()
    # peft wraps a classifier's whole "classifier" / "score" module by itself (SEQ_CLS); a
    # nested name under it (RoBERTa's classifier.dense) would be wrapped twice
    save_modules = sorted({_head_module(name.rsplit(".", 1)[0]) for name in extras})
    for name, value in extras.items():
        # peft saves a modules_to_save copy under the module's own name.
        tensors[f"base_model.model.{name}"] = value.detach().cpu().float().contiguous()
    default_rank = max(ranks.values())
    config = LoraConfig(
        task_type=_TASK_TYPES[task],
        r=default_rank,
        lora_alpha=default_rank,
        target_modules=sorted(deltas),
        rank_pattern={} if rank else {re.escape(m): r for m, r in ranks.items()},
        alpha_pattern={} if rank else {re.escape(m): r for m, r in ranks.items()},
        modules_to_save=save_modules or None,
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        base_model_name_or_path=base_model_source,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    logger.info(
        "saved PEFT adapter to %s: %d modules, ranks %d..%d, %d extras",
        out,
        len(ranks),
        min(ranks.values()),
        default_rank,
        len(extras),
    )


def save_prompt_adapter(
    out_dir: str | Path,
    *,
    base_model: nn.Module,
    base_model_source: str,
    prompt: Tensor,
    extras: Mapping[str, Tensor],
    task: Literal["classification", "causal_lm"],
) -> None:
    """Write a soft prompt (n, H) and the head in PEFT's prompt-tuning format.

    ``PeftModel.from_pretrained(base, out_dir)`` then prepends the same virtual tokens as
    :class:`fedft.prompt.PromptTunedModel` (and restores the head through
    ``modules_to_save``). ``base_model`` is copied, never modified.
    """
    import copy

    from peft import PromptTuningConfig

    model = copy.deepcopy(base_model).cpu()
    set_extras(model, extras)
    hf_config: Any = getattr(model, "config", None)
    # peft keeps a classification head by itself (SEQ_CLS); any other extra (a split run's
    # back blocks) is saved as a modules_to_save copy of its module
    others = sorted(
        {
            name.rsplit(".", 1)[0]
            for name in extras
            if _head_module(name.rsplit(".", 1)[0]) not in ("classifier", "score")
        }
    )
    config = PromptTuningConfig(
        modules_to_save=others or None,
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        num_virtual_tokens=int(prompt.shape[0]),
        token_dim=int(prompt.shape[1]),
        num_transformer_submodules=1,
        num_attention_heads=int(getattr(hf_config, "num_attention_heads", 1)),
        num_layers=int(getattr(hf_config, "num_hidden_layers", 1)),
        base_model_name_or_path=base_model_source,
    )
    peft_model: Any = get_peft_model(cast(Any, model), config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(prompt)
    peft_model.save_pretrained(str(out_dir))
    logger.info("saved a %d-token soft prompt adapter to %s", prompt.shape[0], out_dir)
