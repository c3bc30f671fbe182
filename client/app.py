"""The Flower ClientApp: the discovery query, a plain round, a secure round's stages.

Each handler is one line of translation: the plain round (:func:`train_reply`) runs the
local round (:func:`client.local_round.train_round`, a typed outcome) and encodes the
reply once (:func:`client.local_round.encode_reply`); the secure round's stages are
``client/secure_round.py``'s. The base model and the client's encoded data are cached per
worker process (``fedft.training.runtime``) and reused across the virtual clients the
worker serves.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from client.local_round import client_index, encode_reply, train_round
from client.secure_round import handle
from fedft.aggregation import AGGREGATORS
from fedft.config import RunConfig
from fedft.transport.flower_config import read_run_config
from fedft.transport.records import discovery_to_recorddict

logger = logging.getLogger(__name__)

__all__ = ["app", "client_index", "make_client_app", "train_reply"]


def train_reply(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    """A plain round's reply: the local round's typed outcome, encoded once."""
    outcome = train_round(cfg, content, context)
    return encode_reply(outcome, parts=AGGREGATORS[cfg.aggregation.algorithm].trainable)


def make_client_app(cfg: RunConfig | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp for ``cfg`` (or, deployed, the config in Flower's run config).

    Args:
        cfg: the run's configuration; None reads it from Flower's run config.
        mods: Flower mods around every handler (instrumentation, fault injection in tests).
    """
    app = ClientApp(mods=list(mods))

    def _config(context: Context) -> RunConfig:
        return cfg if cfg is not None else read_run_config(context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(content=discovery_to_recorddict(client_index(context)), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content=train_reply(_config(context), msg.content, context), reply_to=msg)

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        return Message(content=handle(_config(context), msg.content, context), reply_to=msg)

    return app


app = make_client_app()
