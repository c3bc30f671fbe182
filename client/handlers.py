"""What a client does with each kind of message, wherever it runs.

The ClientApp (``client/app.py``) calls :func:`handle` in its own process (simulation, or a
SuperNode without a worker); a deployed client's resident worker (``client/worker.py``)
calls it for the messages the per-message ClientApp hands over. The base model and the
encoded data are cached per process (``fedft.training.runtime``): in the worker they stay
loaded from one round to the next.
"""

from __future__ import annotations

import time

import torch
from flwr.app import Context, RecordDict

from client.local_round import client_index, encode_reply, load, train_round
from client.secure_round import handle as secure_handle
from fedft import phases
from fedft.aggregation import AGGREGATORS
from fedft.config import RunConfig
from fedft.transport.flower_config import read_run_config
from fedft.transport.records import discovery_to_recorddict

__all__ = ["handle", "train_reply"]


def train_reply(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    """A plain round's reply: the local round's typed outcome, encoded once."""
    t0 = time.perf_counter()
    if phases.enabled():  # measured apart: the load inside the round is then a cache hit
        load(cfg, client_index(context), context)
    t1 = time.perf_counter()
    outcome = train_round(cfg, content, context)
    t2 = time.perf_counter()
    reply = encode_reply(outcome, parts=AGGREGATORS[cfg.aggregation.algorithm].trainable)
    phases.record(
        "handler",
        kind="train",
        client=client_index(context),
        load_s=t1 - t0,
        round_s=t2 - t1,
        encode_s=time.perf_counter() - t2,
        threads=torch.get_num_threads(),
    )
    return reply


def handle(
    kind: str, content: RecordDict, context: Context, cfg: RunConfig | None = None
) -> RecordDict:
    """The reply content to a ``kind`` message (``query``, ``train``, ``train.secagg``).

    Args:
        kind: Flower's message type.
        content: the message's content.
        context: this node's context (its state is updated in place).
        cfg: the run's configuration; None reads it from ``context.run_config``.
    """
    if kind == "query":
        return discovery_to_recorddict(client_index(context))
    cfg = cfg if cfg is not None else read_run_config(context.run_config)
    if kind == "train":
        return train_reply(cfg, content, context)
    if kind == "train.secagg":
        return secure_handle(cfg, content, context)
    raise ValueError(f"no handler for message type {kind!r}")
