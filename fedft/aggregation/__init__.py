"""Aggregation algorithms behind one interface, chosen by name from a literal registry.

Use :func:`get_aggregator` (``fedft.aggregation.get_aggregator("flora")``); every
algorithm implements :class:`Aggregator` (see ``base.py``) and lives in its own file.
"""

from fedft.aggregation._weights import average_extras, client_weights, weighted_mean
from fedft.aggregation.base import Aggregator
from fedft.aggregation.fedavg import FedIT
from fedft.aggregation.fedex import FedEx
from fedft.aggregation.fedsb import FedSB
from fedft.aggregation.ffa import FFA
from fedft.aggregation.flora import FLoRA
from fedft.aggregation.hetlora import HetLoRA
from fedft.aggregation.lora_fair import LoraFair, fair_correction
from fedft.aggregation.registry import AGGREGATORS, get_aggregator

__all__ = [
    "AGGREGATORS",
    "FFA",
    "Aggregator",
    "FLoRA",
    "FedEx",
    "FedIT",
    "FedSB",
    "HetLoRA",
    "LoraFair",
    "average_extras",
    "client_weights",
    "fair_correction",
    "get_aggregator",
    "weighted_mean",
]
