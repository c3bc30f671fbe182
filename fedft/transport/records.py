"""The small wire records beside the tensors, each defined once (built and parsed here).

- the **round tag** (``fedft.round``): the round a reply was trained for; the server drops a
  reply tagged for another round (stale or replayed);
- the **privacy record** (``fedft.privacy``): whether a client under DP refused the round
  (budget spent, or its node's terms) and why; never its ledger, which stays on the
  client; the server checks it (:mod:`fedft.replies`);
- the **discovery reply** (``info``): which client index a node serves;
- the **node-config keys** a deployed client is started with (``fedft client``) and the
  ClientApp reads from ``context.node_config``.

The adapters, extras and metrics themselves are :mod:`fedft.transport.serde`'s.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ConfigRecord, RecordDict

from fedft.replies import PrivacyReply, parse_privacy_record
from fedft.transport.serde import PRIVACY_RECORD, ROUND_RECORD
from fedft.transport.worker_wire import WORKER_KEY

__all__ = [
    "ACCOUNTANT_KEY",
    "DATA_KEY",
    "DELTA_KEY",
    "DISCOVERY_RECORD",
    "EPSILON_KEY",
    "LEDGER_KEY",
    "PARTITION_KEY",
    "SPLIT_CA_KEY",
    "SPLIT_CERT_KEY",
    "SPLIT_ID_KEY",
    "SPLIT_KEY_KEY",
    "SPLIT_TLS_KEYS",
    "WORKER_KEY",
    "claimed_index",
    "discovery_to_recorddict",
    "privacy_from_recorddict",
    "privacy_to_record",
    "round_of",
    "round_tag",
]

#: node config: the client index (which partition of a built-in dataset), an int.
PARTITION_KEY = "partition-id"
#: node config: the client's own CSV/JSONL file (optional).
DATA_KEY = "data-path"
#: node config: the client's own privacy budget, ε at ``delta`` (optional; 0 or absent: none).
EPSILON_KEY = "epsilon"
#: node config: the δ of the node's own budget (default 1e-5).
DELTA_KEY = "delta"
#: node config: the accountant the node agrees to ("prv" by default).
ACCOUNTANT_KEY = "accountant"
#: node config: the client's write-ahead privacy ledger file (deployment; optional).
LEDGER_KEY = "ledger"
#: node config: the split service's mutual TLS: CA certificate, client certificate and key
#: (paths to PEM files) and the id the client declares (``client-<i>``).
SPLIT_CA_KEY, SPLIT_CERT_KEY, SPLIT_KEY_KEY, SPLIT_ID_KEY = (
    "split-ca",
    "split-cert",
    "split-key",
    "split-client-id",
)
SPLIT_TLS_KEYS = (SPLIT_CA_KEY, SPLIT_CERT_KEY, SPLIT_KEY_KEY, SPLIT_ID_KEY)
# WORKER_KEY (node config: the Unix socket of the client's resident worker) is defined in
# fedft.transport.worker_wire, which the per-message ClientApp imports without this module.

#: the discovery reply's record: ``{"client_index": int}``.
DISCOVERY_RECORD = "info"


# -- the round tag ------------------------------------------------------------------------
def round_tag(rnd: int) -> ConfigRecord:
    """The record a reply carries under ``fedft.round``: the round it was trained for."""
    return ConfigRecord({"round": int(rnd)})


def round_of(content: RecordDict) -> int | None:
    """The round a reply says it was trained for; None when it carries no usable tag."""
    tag = content.get(ROUND_RECORD)
    if not isinstance(tag, ConfigRecord):
        return None
    value = tag.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# -- the privacy record -------------------------------------------------------------------
def privacy_to_record(report: PrivacyReply) -> ConfigRecord:
    """The ``fedft.privacy`` record of a reply (``message`` only with a refusal).

    Never the client's ledger or accountant: those stay on the client.
    """
    fields: dict[str, Any] = {"refused": report.refused}
    if report.refused:
        fields["message"] = report.message
    return ConfigRecord(fields)


def privacy_from_recorddict(content: RecordDict) -> PrivacyReply | str | None:
    """The checked privacy record of a reply (:func:`fedft.replies.parse_privacy_record`).

    Returns:
        None when the reply has none (DP is off); a string saying what is wrong with it
        when it is unacceptable (the caller rejects that reply alone).
    """
    record = content.get(PRIVACY_RECORD)
    if record is None:
        return None
    if not isinstance(record, ConfigRecord):
        return "privacy record is not a ConfigRecord"
    return parse_privacy_record(record)


# -- discovery ----------------------------------------------------------------------------
def discovery_to_recorddict(client_index: int) -> RecordDict:
    """A node's reply to the discovery query: the client index it serves."""
    return RecordDict({DISCOVERY_RECORD: ConfigRecord({"client_index": int(client_index)})})


def claimed_index(content: RecordDict) -> object:
    """The client index a discovery reply declares, unchecked (None without one).

    The server decides which node serves which index
    (:func:`fedft.replies.bind_client_indices`).
    """
    record = content.get(DISCOVERY_RECORD)
    return record.get("client_index") if isinstance(record, ConfigRecord) else None
