"""The Flower ClientApp: the discovery query, a plain round, a secure round's stages.

Each handler is one line of translation to :func:`client.handlers.handle` (the local round
in ``client/local_round.py``, the secure round's stages in ``client/secure_round.py``).
Where it runs:

- a deployed client (``fedft client``) has a resident worker, named in the node config
  (``worker-socket``): the handler hands the message to it (``client/worker_link.py``) and
  relays the reply. Flower starts this app in a fresh process for every message, so this
  module imports neither torch nor transformers: the base model and the encoded data stay
  loaded in the worker from one round to the next;
- otherwise (simulation, a SuperNode started by hand, ``fedft client --no-worker``, or a
  worker of another code version) the handler runs here; its modules are imported on first
  use, and the base model and the data are cached per process (``fedft.training.runtime``)
  and reused across the virtual clients a simulation worker serves.
"""

from __future__ import annotations

import time

_IMPORT_START = time.time()

import atexit  # noqa: E402 - the import's own cost is measured from _IMPORT_START
import logging  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.typing import Mod  # noqa: E402

from client.worker_link import CodeMismatch, ask_worker  # noqa: E402
from fedft import phases  # noqa: E402
from fedft.transport.worker_wire import WORKER_KEY  # noqa: E402

if TYPE_CHECKING:
    from fedft.config import RunConfig

_IMPORT_END = time.time()

logger = logging.getLogger(__name__)

__all__ = ["app", "client_index", "make_client_app", "train_reply"]

_MISMATCH_SAID = False


def client_index(context: Context) -> int:
    """This node's client index (``partition-id`` in its node config)."""
    from client.local_round import client_index as index

    return index(context)


def train_reply(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    """A plain round's reply, computed in this process."""
    from client.handlers import train_reply as reply

    return reply(cfg, content, context)


def _here(kind: str, content: RecordDict, context: Context, cfg: RunConfig | None) -> RecordDict:
    t0 = time.time()
    from client.handlers import handle  # heavy: torch, transformers, the model code

    t1 = time.time()
    reply = handle(kind, content, context, cfg)
    _record(kind, context, t0, worker=False, import_s=t1 - t0)
    return reply


def _record(kind: str, context: Context, start: float, **fields: object) -> None:
    if phases.enabled():
        # when this process ends (after Flower pushed the reply to the SuperNode)
        atexit.register(phases.record, "app-exit", kind=kind, client=_client_of(context))
        phases.record(
            "app",
            kind=kind,
            client=_client_of(context),
            proc_start=phases.process_started(),
            import_start=_IMPORT_START,
            import_end=_IMPORT_END,
            handler_start=start,
            handler_end=time.time(),
            **fields,
        )


def _client_of(context: Context) -> object:
    return context.node_config.get("partition-id")


def dispatch(
    kind: str, content: RecordDict, context: Context, cfg: RunConfig | None = None
) -> RecordDict:
    """The reply to a ``kind`` message: from the node's worker when it has one, else here."""
    global _MISMATCH_SAID
    path = str(context.node_config.get(WORKER_KEY, "")) if cfg is None else ""
    if not path:
        return _here(kind, content, context, cfg)
    t0 = time.time()
    try:
        reply = ask_worker(path, kind, context, content)
    except CodeMismatch as exc:
        if not _MISMATCH_SAID:
            logger.warning("%s; running the run's app bundle in this process instead", exc)
            _MISMATCH_SAID = True
        return _here(kind, content, context, cfg)
    _record(kind, context, t0, worker=True)
    return reply


def make_client_app(cfg: RunConfig | None = None, *, mods: Sequence[Mod] = ()) -> ClientApp:
    """A ClientApp for ``cfg`` (or, deployed, the config in Flower's run config).

    Args:
        cfg: the run's configuration; None reads it from Flower's run config (and hands the
            messages to the node's worker when its node config names one).
        mods: Flower mods around every handler (instrumentation, fault injection in tests).
    """
    app = ClientApp(mods=list(mods))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return Message(content=dispatch("query", msg.content, context, cfg), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content=dispatch("train", msg.content, context, cfg), reply_to=msg)

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        return Message(content=dispatch("train.secagg", msg.content, context, cfg), reply_to=msg)

    return app


app = make_client_app()
