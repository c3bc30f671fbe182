"""An in-process grid for ``server.federation.run_federation`` (no Ray, no processes, no tests).

Every message goes straight to the real client code (``client.app.train_reply``: the
local round's outcome, encoded once; a secure round's stages to ``client.secure_round.handle``)
with one
Flower ``Context`` per client, as a SuperNode keeps it across the messages of one run. A
server restart is a new Flower run: give the resumed run fresh contexts (``LocalGrid.fresh``).
``kill`` lets a test end the "server" at a chosen point of a round with :class:`Killed`, which,
like SIGKILL, no ``except Exception`` in the server code catches. ``mod`` (a Flower mod's
signature, e.g. ``tests/test_faults_apps.FaultMod``) wraps the secure round's stages, so a test
can play a hostile client in process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.app import Context, Message, RecordDict

from client.app import train_reply
from client.secure_round import handle
from fedft.config import RunConfig
from fedft.transport.records import discovery_to_recorddict


class Killed(BaseException):
    """The simulated server died here."""


class _Meta:
    def __init__(self, src: int) -> None:
        self.src_node_id = src


class _Reply:
    def __init__(self, src: int, content: RecordDict) -> None:
        self.metadata = _Meta(src)
        self.content = content
        self.error = None

    def has_error(self) -> bool:
        return False


class _Answer:
    """What a mod's ``call_next`` returns: the handler's reply content."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content


class LocalGrid:
    """Clients ``0..n-1`` on nodes ``100+i``; ``kill(round, replies_so_far)`` may raise."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        kill: Callable[[int, int], None] | None = None,
        node_config: Callable[[int], dict[str, Any]] | None = None,
        mod: Callable[[Message, Context, Callable[..., Any]], Any] | None = None,
    ) -> None:
        from flwr.supercore.task_identity import TaskIdentity

        for name in ("run_id", "task_id", "node_id"):  # Message() reads them, as a ServerApp
            if getattr(TaskIdentity, f"_{name}") is None:
                setattr(TaskIdentity, name, 1 if name != "node_id" else 0)
        self.cfg = cfg
        self.kill = kill
        self.mod = mod
        extra = node_config or (lambda i: {})
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, **extra(i)},
                state=RecordDict(),
                run_config={},
            )
            for i in range(cfg.federation.num_clients)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: list[Message], timeout: Any = None) -> list[_Reply]:
        replies = []
        for msg in messages:
            nid = msg.metadata.dst_node_id
            ctx = self.contexts[nid]
            if msg.metadata.message_type == "query":
                content = discovery_to_recorddict(int(ctx.node_config["partition-id"]))
            elif msg.metadata.message_type == "train.secagg":
                content = self._secagg(msg, ctx)
            else:
                content = train_reply(self.cfg, msg.content, ctx)
                if self.kill is not None:
                    self.kill(int(msg.metadata.group_id), len(replies) + 1)
            replies.append(_Reply(nid, content))
        return replies

    def _secagg(self, msg: Message, ctx: Context) -> RecordDict:
        def call_next(m: Message, c: Context) -> _Answer:
            return _Answer(handle(self.cfg, m.content, c))

        if self.mod is None:
            return call_next(msg, ctx).content
        return self.mod(msg, ctx, call_next).content
