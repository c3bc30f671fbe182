"""The client's side of a secure-aggregation round over Flower messages.

The server drives five stages (``message_type = "train.secagg"``, the stage named in the
``fedft.secagg`` record); this node answers each one:

- ``advertise``: train one local round exactly as a plain round does
  (:func:`client.local_round.train_round`), turn the update into the weighted vector
  ``[w * x_k, w]`` (:func:`fedft.secagg.encoding.encode_update`), optionally clip the
  update delta first (user-level DP's C or robust ``norm_bound``: the server never sees an
  update, so it cannot clip), create a :class:`~fedft.secagg.SecAggClient` and reply with
  its public keys (plus the training metrics and, under sample-level DP, the privacy
  record: refused or not, never the ledger);
- ``share``, ``verify``, ``masked``, ``unmask``: the protocol's next steps (``verify``
  checks every received share against its dealer's Feldman commitments and complains
  about the dealers whose shares fail).

Between stages the client (private keys, held shares, the vector) lives in this node's
``context.state`` (:func:`fedft.transport.secagg_serde.client_state_to_record`); it is
deleted after the unmask stage. A message for another round than the saved state raises,
which Flower returns to the server as an error reply (the client counts as dropped).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import Context, RecordDict

from client.local_round import encode_reply, train_round
from fedft.aggregation import AGGREGATORS
from fedft.aggregation.flat import clip_l2, flatten_trainables
from fedft.config import RunConfig
from fedft.secagg import SecAggClient, SecAggProtocolError
from fedft.secagg.encoding import encode_update
from fedft.transport import records, serde
from fedft.transport import secagg_serde as ss
from fedft.types import ClientUpdate, Parts

logger = logging.getLogger(__name__)

STATE_KEY = "fedft.secagg.state"
"""Key of this node's SecAgg state in ``context.state``."""


def secure_vector(
    update: ClientUpdate,
    *,
    start: ClientUpdate,
    parts: Parts,
    clip_delta: float,
    weighted: bool,
) -> np.ndarray:
    """The vector this client masks: float64 (D,) = [w * x, w].

    Args:
        update: the trained update (x_k = its uploads, layout of ``flatten_trainables``).
        start: what the client started from, same layout (the reference of the delta).
        parts: what the aggregator trains.
        clip_delta: when > 0, x = start + (x_k - start) * min(1, C / ||x_k - start||_2).
        weighted: w = n_k when True, else 1 (user-level DP's uniform weights).
    """
    if clip_delta <= 0:
        return encode_update(update, parts=parts, weighted=weighted)
    x0 = flatten_trainables(start, parts).to(torch.float64)  # (D - 1,)
    delta, _ = clip_l2(flatten_trainables(update, parts).to(torch.float64) - x0, clip_delta)
    w = float(update.num_examples) if weighted else 1.0
    return np.concatenate([w * (x0 + delta).numpy(), [w]])


def _advertise(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    params, index, clip_delta, weighted = ss.params_from_record(content)
    outcome = train_round(cfg, content, context)  # the plain round, call for call
    parts = AGGREGATORS[cfg.aggregation.algorithm].trainable
    if outcome.update is None:
        return encode_reply(outcome, parts=parts)  # out of budget: no part in this SecAgg
    start = ClientUpdate(
        client_id="start",
        adapters=outcome.start.adapters,
        num_examples=1,
        extras=outcome.start.extras,
    )
    vector = secure_vector(
        outcome.update, start=start, parts=parts, clip_delta=clip_delta, weighted=weighted
    )
    if vector.shape != (params.vector_length,):
        raise SecAggProtocolError(
            f"this client's vector has {vector.shape[0]} entries, the server expects "
            f"{params.vector_length}: server and client disagree on the adapter layout"
        )
    client = SecAggClient(index=index, params=params)
    keys = client.advertise_keys()
    context.state[STATE_KEY] = ss.client_state_to_record(client, vector=vector)
    out = RecordDict(
        {
            ss.RECORD: ss.advertise_to_record(keys),
            serde.METRICS: serde.metrics_to_record(outcome.update.metrics),
        }
    )
    if outcome.privacy is not None:
        out[serde.PRIVACY_RECORD] = records.privacy_to_record(outcome.privacy)
    return out


def _load(context: Context, round_id: int) -> tuple[SecAggClient, np.ndarray]:
    rec = context.state.get(STATE_KEY)
    if rec is None:
        raise SecAggProtocolError("no SecAgg state on this node: the advertise stage never ran")
    client, vector = ss.client_state_from_record(rec)  # type: ignore[arg-type]
    if client.params.round_id != round_id:
        raise SecAggProtocolError(
            f"SecAgg state is for round {client.params.round_id}, the message for {round_id}"
        )
    return client, vector


def handle(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    """Answer one SecAgg stage message; the reply's content.

    Raises:
        SecAggSerdeError, SecAggProtocolError, SecAggAbort: a malformed, out-of-order or
            unsafe request; Flower turns the exception into an error reply.
    """
    stage = ss.stage_of(content)
    if stage == "advertise":
        return _advertise(cfg, content, context)
    client, vector = _load(context, ss.round_of(content))
    n = client.params.num_clients
    if stage == "share":
        reply = ss.share_keys_to_record(
            client.share_keys(ss.directory_from_record(content, num_clients=n))
        )
    elif stage == "verify":
        routed = ss.routed_from_record(content, num_clients=n)
        reply = ss.check_to_record(client.check_shares(routed))
    elif stage == "masked":
        qualified = ss.mask_request_from_record(content, num_clients=n)
        reply = ss.masked_to_record(client.masked_input(qualified, vector))
    else:
        request = ss.request_from_record(content, num_clients=n)
        reply = ss.unmask_to_record(client.unmask(request))
        del context.state[STATE_KEY]
        return RecordDict({ss.RECORD: reply})
    context.state[STATE_KEY] = ss.client_state_to_record(client, vector=vector)
    return RecordDict({ss.RECORD: reply})
