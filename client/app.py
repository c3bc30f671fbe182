"""The Flower ClientApp: decode the server's start, train one local round, send the update.

The base model and the client's encoded data are cached per worker process
(``fedft.training.runtime``) and reused across the virtual clients the worker serves.
"""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedft import builders
from fedft.aggregation import AGGREGATORS
from fedft.config import RunConfig
from fedft.training.coordinator import ClientStart
from fedft.training.local import resolve_device
from fedft.training.runtime import get_data, get_encoded, get_runtime, run_lora_round
from fedft.transport import serde
from fedft.transport.flower_config import read_run_config

logger = logging.getLogger(__name__)


def client_index(context: Context) -> int:
    """This node's client index: ``partition-id`` in its node config."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError as exc:
        raise RuntimeError(
            "the node config has no 'partition-id'; start the client with "
            "`fedft client --partition N` (or set node-config partition-id=N)"
        ) from exc


def train_round(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    """One local round for this node, from the server's message content to the reply."""
    adapters, base_delta, extras, conf = serde.start_from_recorddict(content)
    idx = client_index(context)
    if int(conf["client_index"]) != idx:
        raise RuntimeError(f"message for client {conf['client_index']} reached client {idx}")
    fed = get_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(
        **builders.runtime_kwargs(cfg, num_labels=fed.num_labels),
        device=resolve_device(cfg.federation.device),
    )
    data_key = tuple(sorted(builders.data_kwargs(cfg).items()))
    data = get_encoded(
        ("client", idx, cfg.model.name, cfg.data.max_length, data_key),
        lambda: fed.clients[idx],
        runtime.tokenizer,
        task=cfg.model.task,
        max_length=cfg.data.max_length,
    )
    trainable = AGGREGATORS[cfg.aggregation.algorithm].trainable
    start = ClientStart(
        adapters=adapters, base_delta=base_delta, extras=extras, rank=int(conf["rank"])
    )
    update = run_lora_round(
        runtime,
        client_id=str(idx),
        start=start,
        data=data,
        trainable=trainable,
        alpha=cfg.adapter.alpha,
        dropout=cfg.adapter.dropout,
        steps=cfg.federation.local_steps,
        batch_size=cfg.federation.batch_size,
        lr=cfg.federation.lr,
        seed=int(conf["seed"]),
    )
    return serde.update_to_recorddict(update, parts=trainable)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg`` (or, deployed, the config in Flower's run config)."""
    app = ClientApp()

    def _config(context: Context) -> RunConfig:
        return cfg if cfg is not None else read_run_config(context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        info: dict[str, Any] = {"client_index": client_index(context)}
        return Message(content=RecordDict({"info": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content=train_round(_config(context), msg.content, context), reply_to=msg)

    return app


app = make_client_app()
