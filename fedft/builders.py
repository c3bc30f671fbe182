"""Builders: the only code below the entry points that reads a :class:`RunConfig`.

Each turns a config into plain keyword arguments (or built objects) for the library, so
nothing under them receives a config object (STYLE.md item 3).
"""

from __future__ import annotations

from typing import Any

from fedft.aggregation import get_aggregator
from fedft.aggregation.base import Aggregator
from fedft.config import RunConfig


def data_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Arguments of :func:`fedft.data.build_federated_data`."""
    d = cfg.data
    return {
        "dataset": d.dataset,
        "task": cfg.model.task,
        "partition": d.partition,
        "alpha": d.alpha,
        "num_clients": cfg.federation.num_clients,
        "test_size": d.test_size,
        "public_size": d.public_size,
        "max_train_examples": d.max_train_examples,
        "seed": cfg.seed,
        "text_column": d.text_column,
        "label_column": d.label_column,
    }


def runtime_kwargs(cfg: RunConfig, *, num_labels: int) -> dict[str, Any]:
    """Arguments of :func:`fedft.training.runtime.get_runtime` (device resolved by caller)."""
    return {
        "model_name": cfg.model.name,
        "task": cfg.model.task,
        "num_labels": num_labels,
        "seed": cfg.seed,
        "target_modules": list(cfg.model.target_modules) or None,
    }


def aggregator_options(cfg: RunConfig) -> dict[str, Any]:
    """Options of the chosen algorithm (only the ones it takes)."""
    a = cfg.aggregation
    if a.algorithm == "lora_fair":
        return {"fair_lambda": a.fair_lambda, "fair_steps": a.fair_steps, "fair_lr": a.fair_lr}
    return {}


def build_aggregator(cfg: RunConfig) -> Aggregator:
    """The configured aggregator (wrappers for robustness / user-level DP are added by the
    server shell, which knows each round's reference adapters)."""
    return get_aggregator(cfg.aggregation.algorithm, **aggregator_options(cfg))


def max_rank(cfg: RunConfig) -> int:
    """The largest rank any client trains at."""
    return max(cfg.adapter.ranks) if cfg.adapter.ranks else cfg.adapter.rank
