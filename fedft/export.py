"""Export a finished run for serving: a merged model, or one LoRA of a chosen rank.

A run's ``adapter/`` holds the global model's total change of every adapted weight (for
FLoRA and FedEx-LoRA including what was folded into the base), factored at its numerical
rank with per-module ranks, plus the classification head as ``modules_to_save``.

* :func:`export_merged` adds it into the base weights (peft's ``merge_and_unload``) and
  writes a plain Hugging Face folder: ``AutoModel*.from_pretrained(OUT)`` loads it without
  peft, and a server that serves plain models (e.g. vLLM) serves it as is.
* :func:`export_lora` refactors every module's delta ΔW into one rank ``r`` (the best
  rank-r approximation, Eckart-Young) and writes a uniform-rank PEFT adapter, what
  multi-LoRA servers expect. Relative error of the truncation, over all modules:
  ``sqrt(Σ_m ‖ΔW_m − ΔW_m^(r)‖²_F) / sqrt(Σ_m ‖ΔW_m‖²_F)`` (0 once r reaches every
  module's numerical rank; never increases with r).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import torch
from safetensors import safe_open
from torch import Tensor

from fedft.adapters import peft_io
from fedft.adapters.math import svd_factors
from fedft.models import load_base_model

logger = logging.getLogger(__name__)

#: last name of a classification head's output layer in Hugging Face models
_HEAD_NAMES = ("classifier", "score", "out_proj", "lin")


class ExportError(ValueError):
    """The run folder cannot be exported as asked (the message says why and what to do)."""


@dataclass(frozen=True)
class RunAdapter:
    """What a run folder says about its final adapter."""

    run_dir: Path
    adapter_dir: Path
    model_name: str
    task: Literal["classification", "causal_lm"]
    seed: int
    peft_type: str
    num_labels: int


@dataclass(frozen=True)
class LoraExport:
    """The result of :func:`export_lora`."""

    rank: int
    #: relative Frobenius error of the truncation over all modules (0 = exact)
    relative_error: float
    #: module -> its own relative error
    module_errors: dict[str, float] = field(default_factory=dict)
    #: module -> numerical rank of its delta before truncation
    module_ranks: dict[str, int] = field(default_factory=dict)


def read_run(run_dir: str | Path) -> RunAdapter:
    """Check that ``run_dir`` holds a finished run and read what export needs.

    Raises:
        ExportError: no ``summary.json`` / ``adapter/`` (not a finished run), or a
            soft-prompt adapter (nothing to merge or truncate).
    """
    run = Path(run_dir)
    summary = run / "summary.json"
    adapter = run / "adapter"
    if not summary.is_file() or not (adapter / "adapter_config.json").is_file():
        raise ExportError(
            f"{run} is not a finished fedft run (it needs summary.json and adapter/); pass "
            "the --out folder of a completed `fedft simulate` or `fedft server` run"
        )
    config = json.loads(summary.read_text(encoding="utf-8"))["config"]
    adapter_config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    task = config["model"]["task"]
    peft_type = str(adapter_config.get("peft_type", ""))
    if peft_type != "LORA":
        raise ExportError(
            f"the adapter of {run} is {peft_type or 'of unknown type'}, not a LoRA: a soft "
            "prompt is an input, not a weight change, so it can be neither merged into the "
            "model nor refactored by rank; serve it with peft "
            "(PeftModel.from_pretrained(base, RUN/adapter))"
        )
    return RunAdapter(
        run_dir=run,
        adapter_dir=adapter,
        model_name=str(config["model"]["name"]),
        task=task,
        seed=int(config.get("seed", 0)),
        peft_type=peft_type,
        num_labels=_num_labels(adapter, adapter_config) if task == "classification" else 2,
    )


def _num_labels(adapter: Path, adapter_config: Mapping[str, Any]) -> int:
    """Classes of the saved head: rows of its output layer's weight."""
    heads = [
        m for m in adapter_config.get("modules_to_save") or [] if m.split(".")[-1] in _HEAD_NAMES
    ]
    files = sorted(adapter.glob("adapter_model.safetensors"))
    if heads and files:
        with safe_open(str(files[0]), framework="pt") as fh:
            keys = set(fh.keys())
            for head in heads:
                for key in (
                    f"base_model.model.{head}.weight",
                    f"base_model.model.{head}.out_proj.weight",  # RoBERTa's two-layer head
                ):
                    if key in keys:
                        return int(fh.get_slice(key).get_shape()[0])
    raise ExportError(
        f"{adapter}: no classification head among modules_to_save "
        f"{adapter_config.get('modules_to_save')}; was the run a classification run?"
    )


def load_adapted(run: RunAdapter) -> tuple[Any, Any]:
    """The base model with the run's adapter attached (``PeftModel``, fp32, eval) + tokenizer."""
    from peft import PeftModel

    base, tokenizer = load_base_model(
        run.model_name, task=run.task, num_labels=run.num_labels, seed=run.seed
    )
    return PeftModel.from_pretrained(base, str(run.adapter_dir)).eval(), tokenizer


def export_merged(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the base model with the run's adapter merged in (plain Hugging Face folder).

    Raises:
        ExportError: not a finished run, or a soft-prompt adapter (nothing to merge).
    """
    run = read_run(run_dir)
    adapted, tokenizer = load_adapted(run)
    merged = adapted.merge_and_unload()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    logger.info("merged %s into %s and wrote %s", run.adapter_dir, run.model_name, out)
    return out


def truncate(deltas: Mapping[str, Tensor], rank: int) -> tuple[dict[str, Tensor], LoraExport]:
    """Best rank-``rank`` approximation of every delta and the relative errors."""
    if rank < 1:
        raise ExportError(f"--rank {rank} is not allowed: a LoRA rank >= 1")
    out: dict[str, Tensor] = {}
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    total_err = total_norm = 0.0
    for name, delta in sorted(deltas.items()):
        d = delta.double()
        f = svd_factors(d, rank)
        approx = f.scaling * (f.b.double() @ f.a.double())  # (out, in)
        err = float(torch.linalg.matrix_norm(d - approx))
        norm = float(torch.linalg.matrix_norm(d))
        out[name] = approx.float()
        errors[name] = err / norm if norm > 0 else 0.0
        ranks[name] = svd_factors(d, None).rank
        total_err += err**2
        total_norm += norm**2
    rel = math.sqrt(total_err / total_norm) if total_norm > 0 else 0.0
    return out, LoraExport(rank=rank, relative_error=rel, module_errors=errors, module_ranks=ranks)


def export_lora(run_dir: str | Path, out_dir: str | Path, *, rank: int) -> LoraExport:
    """Write the run's adapter as one LoRA of rank ``rank`` in PEFT's format.

    Returns:
        The rank and the relative truncation error (overall and per module).
    """
    run = read_run(run_dir)
    model, _ = load_adapted(run)
    factors = peft_io.get_factors(model)
    deltas = {n: f.scaling * (f.b.double() @ f.a.double()) for n, f in factors.items()}
    truncated, report = truncate(deltas, rank)
    config = json.loads((run.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    extras = _saved_extras(run.adapter_dir, config.get("modules_to_save") or [])
    peft_io.save_peft_adapter(
        out_dir,
        base_model_source=run.model_name,
        deltas=truncated,
        extras=extras,
        task=run.task,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in truncated}),
        rank=rank,
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
    )
    logger.info(
        "wrote a rank-%d LoRA to %s (relative error %.3g)", rank, out_dir, report.relative_error
    )
    return report


def _saved_extras(adapter: Path, modules: list[str]) -> dict[str, Tensor]:
    """The ``modules_to_save`` tensors of a saved adapter, by plain parameter name."""
    if not modules:
        return {}
    out: dict[str, Tensor] = {}
    prefixes = tuple(f"base_model.model.{m}." for m in modules)
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as fh:
        for key in fh.keys():
            if key.startswith(prefixes):
                out[key.removeprefix("base_model.model.")] = cast(Tensor, fh.get_tensor(key))
    return out
