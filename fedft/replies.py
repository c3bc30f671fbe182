"""What the server accepts from a client's reply, besides its update.

One hostile client must not stop a run or take another client's place. Every field a
client reports is checked here before the server uses it; a bad reply is rejected alone
(the caller logs it and counts it as ``rejected``), never raised out of the round. Pure
functions over plain values: the Flower shell hands in the records' items.

- :func:`parse_privacy_record`: the privacy record of a reply (``refused`` flag and a
  message, nothing else: a client's ledger stays on the client, so a record carrying more,
  e.g. an accountant state, is refused).
- :func:`check_epsilon`: a reported ε must be a finite number in [0, :data:`MAX_EPSILON`].
- :func:`bind_client_indices`: which node serves which client index. Nodes declare an index;
  when the operator bound indices to node identities (the node keys registered by
  ``fedft server``), a declaration that disagrees with the binding is ignored, so a node can
  neither take another client's settings nor abort the run by claiming its index.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "MAX_EPSILON",
    "MAX_MESSAGE_CHARS",
    "IndexBinding",
    "PrivacyReply",
    "bind_client_indices",
    "check_epsilon",
    "parse_privacy_record",
]

#: the keys of a privacy record (``refused`` required).
PRIVACY_RECORD_KEYS = frozenset({"refused", "message"})
#: largest ε accepted in a report (an honest client refuses to train long before).
MAX_EPSILON = 1e6
#: a client's free-text message is cut to this many characters before it is logged.
MAX_MESSAGE_CHARS = 200


@dataclass(frozen=True)
class PrivacyReply:
    """A checked privacy record.

    Attributes:
        refused: the client refused to train (budget spent, or a rule it keeps).
        message: its message, cut to :data:`MAX_MESSAGE_CHARS`.
    """

    refused: bool
    message: str


def parse_privacy_record(record: Mapping[str, object]) -> PrivacyReply | str:
    """The checked record, or a string saying what is wrong with it."""
    extra = sorted(set(record) - PRIVACY_RECORD_KEYS)
    if extra:
        return f"privacy record: unexpected keys {extra} (a client's ledger is never sent)"
    if "refused" not in record:
        return "privacy record without its refused flag"
    refused = record["refused"]
    if not isinstance(refused, bool):
        return f"privacy record: refused = {refused!r} is not a boolean"
    message = record.get("message", "")
    text = message if isinstance(message, str) else repr(message)
    return PrivacyReply(refused=refused, message=text[:MAX_MESSAGE_CHARS])


def check_epsilon(value: object) -> str | None:
    """None when ``value`` is a plausible reported ε, else what is wrong with it."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return f"epsilon {value!r} is not a number"
    if not math.isfinite(value) or not 0 <= value <= MAX_EPSILON:
        return f"epsilon {value!r} outside [0, {MAX_EPSILON:g}]"
    return None


@dataclass(frozen=True)
class IndexBinding:
    """Client index -> node id, and what was ignored on the way (node id, reason)."""

    nodes: dict[int, int]
    ignored: list[tuple[int, str]]


def bind_client_indices(
    claims: Sequence[tuple[int, object]],
    *,
    num_clients: int,
    bound: Mapping[int, int] | None = None,
) -> IndexBinding:
    """Decide which node serves each client index.

    Args:
        claims: (node id, the client index it declared) for every node that answered.
        num_clients: indices run over ``range(num_clients)``.
        bound: node id -> client index fixed by the operator (the registered node keys);
            None when nodes have no verified identity (simulation, ``--insecure``).

    Returns:
        With ``bound``: each bound node serves its bound index, whatever it declared (a
        disagreeing declaration is recorded in ``ignored``); nodes outside ``bound`` serve
        nothing. Without: each index goes to the one node that declared it; an index
        declared by several nodes goes to none of them (no first-come takeover).
    """
    nodes: dict[int, int] = {}
    ignored: list[tuple[int, str]] = []
    if bound is not None:
        for node, claimed in claims:
            if node not in bound:
                ignored.append((node, "node not bound to any client index"))
                continue
            idx = bound[node]
            if claimed != idx:
                ignored.append((node, f"declared client index {claimed!r}, bound to {idx}"))
            if 0 <= idx < num_clients:
                nodes[idx] = node
        return IndexBinding(nodes, ignored)
    by_index: dict[int, list[int]] = {}
    for node, claimed in claims:
        if isinstance(claimed, bool) or not isinstance(claimed, int):
            ignored.append((node, f"client index {claimed!r} is not an integer"))
        elif not 0 <= claimed < num_clients:
            ignored.append((node, f"client index {claimed} outside [0, {num_clients})"))
        else:
            by_index.setdefault(claimed, []).append(node)
    for idx, owners in sorted(by_index.items()):
        if len(owners) == 1:
            nodes[idx] = owners[0]
        else:
            ignored += [(n, f"client index {idx} declared by {len(owners)} nodes") for n in owners]
    return IndexBinding(nodes, ignored)
