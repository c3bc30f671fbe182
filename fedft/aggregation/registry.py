"""The literal registry of aggregation algorithms (names as in ``[aggregation] algorithm``)."""

from __future__ import annotations

import inspect
from typing import Any

from fedft.aggregation.base import Aggregator
from fedft.aggregation.fedavg import FedIT
from fedft.aggregation.fedex import FedEx
from fedft.aggregation.fedsb import FedSB
from fedft.aggregation.ffa import FFA
from fedft.aggregation.flora import FLoRA
from fedft.aggregation.hetlora import HetLoRA
from fedft.aggregation.lora_fair import LoraFair

__all__ = ["AGGREGATORS", "get_aggregator"]

AGGREGATORS: dict[str, type[Aggregator]] = {
    "fedit": FedIT,
    "flora": FLoRA,
    "fedsb": FedSB,
    "lora_fair": LoraFair,
    "hetlora": HetLoRA,
    "ffa": FFA,
    "fedex": FedEx,
}


def get_aggregator(name: str, **options: Any) -> Aggregator:
    """Build the aggregator registered under ``name``.

    Args:
        name: one of ``AGGREGATORS`` ("fedit", "flora", "fedsb", "lora_fair", "hetlora",
            "ffa", "fedex").
        **options: the algorithm's keyword options (e.g. ``fair_lambda`` for lora_fair).

    Raises:
        ValueError: for an unknown name (listing the known ones) or an option the algorithm
            does not take (listing the ones it does).
    """
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        raise ValueError(
            f"unknown aggregation algorithm {name!r}; known: {sorted(AGGREGATORS)}"
        ) from None
    params = inspect.signature(cls.__init__).parameters
    accepted = sorted(p for p in params if p != "self")
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(
            f"aggregation algorithm {name!r} takes no option(s) {unknown}; it takes {accepted}"
        )
    return cls(**options)
