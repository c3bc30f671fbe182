"""The collect step of a round: send the starts, wait, decode what came back.

:func:`collect_plain` runs a plain round (one :func:`exchange`: Flower's
``send_and_receive`` asking for replies every 0.5 s instead of every 3 s);
``server.secure_round.run_secure_round`` runs a secure one. Both return :class:`Replies`,
so every later step of the round (validate, account privacy, aggregate, record) reads one
type. A plain round's decoded updates are still unchecked: the validate step
(``server.rounds.validate``) rejects the unsound ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from fedft import phases
from fedft.aggregation.validate import validate_update
from fedft.replies import check_epsilon
from fedft.training.coordinator import ClientStart
from fedft.transport import records, serde
from fedft.types import AggregationResult, ClientUpdate, LoraFactors, Parts

logger = logging.getLogger(__name__)


@dataclass
class Replies:
    """What came back in one round, plain or secure.

    Attributes:
        updates: plain rounds: one decoded update per client (client index order); the
            validate step keeps the sound ones. Secure rounds: empty (the server never
            sees an update).
        secure: whether the round ran secure aggregation.
        summed: secure rounds: the aggregate rebuilt from the unmasked sum (None when
            the round failed).
        failed: secure rounds: why the sum could not be formed (None when it could).
        in_sum: secure rounds: |U3|, the clients whose vectors are in the sum.
        dropped: secure rounds: SecAgg indices of the clients that dropped at any stage.
        suspects: secure rounds: clients caught sending or dealing wrong secret shares (the
            sum was still rebuilt; see :func:`fedft.secagg.protocol.blame`).
        bytes_up: serialised bytes of every reply.
        bytes_down: serialised bytes of every message the server sent.
        epsilon: client index -> ε spent so far (sample-level DP), accepted replies only.
        accountants: client index -> its accountant state (JSON), mirrored into the
            checkpoint.
        refused: clients that refused to train because their budget is spent.
        rejected: (client index, why) of each reply that was dropped as unsound.
        errored: clients whose reply was an error (crashed, could not decode the start).
        train_loss: secure rounds: the local training losses of the clients in the sum
            (plain rounds read them from ``updates``).
    """

    updates: list[ClientUpdate] = field(default_factory=list)
    secure: bool = False
    summed: AggregationResult | None = None
    failed: str | None = None
    in_sum: int = 0
    dropped: list[int] = field(default_factory=list)
    suspects: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    epsilon: dict[int, float] = field(default_factory=dict)
    accountants: dict[int, str] = field(default_factory=dict)
    refused: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    errored: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)

    @property
    def clients(self) -> int:
        """The clients whose training reaches the aggregate."""
        return self.in_sum if self.secure else len(self.updates)

    def losses(self) -> list[float]:
        """The local training losses of the clients in the aggregate."""
        plain = [float(u.metrics["train_loss"]) for u in self.updates if "train_loss" in u.metrics]
        return plain + self.train_loss

    def take_privacy(self, idx: int, content: RecordDict, rnd: int) -> bool:
        """Check client ``idx``'s privacy record; False when its reply goes no further
        (the record is unacceptable: rejected; the client refused: refused)."""
        checked = records.privacy_from_recorddict(content)
        if checked is None:  # DP is off
            return True
        if isinstance(checked, str):
            self.reject(idx, checked, rnd)
            return False
        if checked.refused:
            logger.warning("round %d: client %d stopped: %s", rnd, idx, checked.message)
            self.refused.append(idx)
            return False
        return True

    def reject(self, idx: int, why: str, rnd: int) -> None:
        """Drop client ``idx``'s reply as unsound (logged)."""
        logger.warning("round %d: rejected reply of client %d: %s", rnd, idx, why)
        self.rejected.append((idx, why))


#: seconds between two asks for replies (Flower 1.41's deployed grid waits 3 s between asks:
#: an exchange, one per plain round, could end up to 3 s after its last reply was in).
REPLY_POLL_S = 0.5


def exchange(grid: Grid, messages: Iterable[Message], *, timeout: float | None) -> list[Message]:
    """Flower's ``grid.send_and_receive`` with a shorter pause between asks for replies.

    Pushes the messages, then asks for replies every :data:`REPLY_POLL_S` seconds (or the
    grid's own ``pull_interval`` when shorter: the simulation's) until every message has
    one or ``timeout`` passes. A grid that is not a Flower ``Grid`` (the tests' in-process
    grid) answers through its own ``send_and_receive``.
    """
    if not isinstance(grid, Grid):
        return list(grid.send_and_receive(messages, timeout=timeout))
    pause = min(REPLY_POLL_S, float(getattr(grid, "pull_interval", REPLY_POLL_S)))
    messages = list(messages)
    kinds = sorted({m.metadata.message_type for m in messages})
    begin = time.time()
    waiting = set(grid.push_messages(messages))
    sent = time.time()
    end = sent + (timeout or 0.0)
    got: list[Message] = []
    arrived: list[float] = []
    while timeout is None or time.time() < end:
        replies = list(grid.pull_messages(waiting))
        got += replies
        arrived += [time.time()] * len(replies)
        waiting -= {m.metadata.reply_to_message_id for m in replies}
        if not waiting:
            break
        time.sleep(pause)
    phases.record(
        "server", kind=",".join(kinds), begin=begin, sent=sent, done=time.time(), arrived=arrived
    )
    return got


def collect_plain(
    grid: Grid,
    messages: list[Message],
    timeout: float | None,
    starts: Mapping[int, ClientStart],
    nodes: Mapping[int, int],
    parts_up: Parts,
    rnd: int,
) -> Replies:
    """Send, wait and decode: one update per client that answered in time for this round.

    Dropped here (and logged): error replies, replies from a node nobody asked or a second
    reply from the same node, replies tagged with another round (stale or replayed),
    replies whose bytes do not decode. A client that refuses (budget spent) is recorded.
    """
    index_of = {nid: idx for idx, nid in nodes.items()}
    out = Replies()
    got: dict[int, ClientUpdate] = {}
    for reply in exchange(grid, messages, timeout=timeout):
        src = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning("round %d: client on node %s failed: %s", rnd, src, reply.error)
            if src in index_of:
                out.errored.append(index_of[src])
            continue
        idx = index_of.get(src)
        if idx is None or idx not in starts or idx in got or idx in out.refused:
            logger.warning(
                "round %d: dropping unexpected or duplicate reply from node %s", rnd, src
            )
            continue
        out.bytes_up += serde.recorddict_nbytes(reply.content)
        update = _decode(out, reply.content, idx, rnd, starts[idx], parts_up)
        if update is not None:
            got[idx] = update
    out.updates = [got[i] for i in sorted(got)]
    return out


def _decode(
    out: Replies,
    content: RecordDict,
    idx: int,
    rnd: int,
    start: ClientStart,
    parts_up: Parts,
) -> ClientUpdate | None:
    """Client ``idx``'s update from its reply, or None (stale, refused or undecodable)."""
    tagged = records.round_of(content)
    if tagged != rnd:
        logger.warning(
            "round %d: dropping a reply of client %d trained for round %r (stale or replayed)",
            rnd,
            idx,
            tagged,
        )
        out.rejected.append((idx, f"reply for round {tagged!r}, not {rnd}"))
        return None
    if not out.take_privacy(idx, content, rnd):
        return None
    try:
        return serde.update_from_recorddict(
            content, client_id=str(idx), parts=parts_up, reference=start.adapters
        )
    except ValueError as exc:
        out.reject(idx, str(exc), rnd)
        return None


def validate_replies(
    replies: Replies,
    starts: Mapping[int, ClientStart],
    *,
    parts: Parts,
    extras: Mapping[str, Tensor],
    max_norm: float | None,
    max_examples: int,
    rnd: int,
) -> None:
    """Keep the sound updates of ``replies``; reject each unsound one on its own.

    An update is unsound when its shapes, frozen parts or extras differ from its start's,
    when a value is not finite, when its delta exceeds ``max_norm``, when it claims more
    than ``max_examples`` examples (:func:`fedft.aggregation.validate.validate_update`), or
    when its reported ε is implausible (:func:`fedft.replies.check_epsilon`). A secure round
    has no update to check (the server sees only the sum). The ε of every accepted update goes into
    ``replies.epsilon``.
    """
    kept: list[ClientUpdate] = []
    for update in replies.updates:
        idx = int(update.client_id)
        expected: Mapping[str, LoraFactors] = starts[idx].adapters
        problems = validate_update(
            update,
            expected=expected,
            parts=parts,
            extras_expected=extras,
            max_norm=max_norm,
            max_examples=max_examples,
        )
        if problems:
            replies.reject(idx, "; ".join(problems), rnd)
            continue
        if "epsilon" in update.metrics:
            bad_eps = check_epsilon(update.metrics["epsilon"])
            if bad_eps is not None:
                replies.reject(idx, bad_eps, rnd)
                continue
            replies.epsilon[idx] = float(update.metrics["epsilon"])
        kept.append(update)
    replies.updates = kept
