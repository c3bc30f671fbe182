"""One secure-aggregation round over Flower messages (the server's side).

Five exchanges (``server.collect.exchange``) with the round's clients, each message carrying a
:mod:`fedft.secagg` message as the ``fedft.secagg`` ConfigRecord
(:mod:`fedft.transport.secagg_serde`; ``message_type = "train.secagg"``):

1. ``advertise``: the round's start (the same content a plain round sends) plus the SecAgg
   parameters; each client trains and replies with its two X25519 public keys;
2. ``share``: the key directory U1 -> encrypted Shamir shares and Feldman commitments (U2);
3. ``verify``: the shares and commitments routed to each client -> its complaints against
   dealers whose shares fail; the server convicts the cheater of each complaint (U2');
4. ``masked``: U2' -> each client's masked vector (U3);
5. ``unmask``: U3 -> the shares that remove the masks (checked against the commitments).

Clients convicted in a round (``Replies.suspects``) are left out of the run's later rounds.

:func:`run_secure_round` reads in that order: the SecAgg parameters (``_params``) ->
``_protocol`` (``_advertise``: stage 1, each client's privacy record taken by
``Replies.take_privacy`` as in a plain round; ``_mask_and_sum``: stages 2-5) -> ``_take_in``
(who is in the sum, their losses) -> ``_Release`` (the checks before the sum is used).

The server learns only ``[sum w_k x_k, sum w_k]`` over U3 (w_k = n_k, or 1 under user-level
DP) and rebuilds the round's result with :func:`fedft.secagg.encoding.decode_aggregate`.
The threshold is t = max(federation.min_replies, floor(n/2) + 1): up to n - t clients may
drop at any stage (a client that dies after sending its masked input is still in the
sum); beyond that :class:`~fedft.secagg.SecAggAbort` fails the round cleanly and the global
model is left unchanged. Dropped or late clients, replies from a node other than the one
asked, replies claiming another SecAgg index and malformed records are logged and dropped.

What the server cannot do here: validate an update's values or norm (it never sees one).
It checks what the sum still reveals (:func:`check_sum`): the total weight lies in
[|U3|, |U3| * max_examples], and under user-level DP the count is exactly |U3| and the sum
of clipped deltas has norm <= |U3| * C. A sum that fails is refused whole (the round fails,
the model is unchanged). The configuration refuses ``secure`` with a robust ``norm_bound``
or a ``max_update_norm``, whose per-client bounds no sum can show.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedft.aggregation.base import Aggregator
from fedft.aggregation.flat import flatten_trainables
from fedft.aggregation.robust import NormBound
from fedft.privacy import CentralDP
from fedft.replies import check_epsilon
from fedft.secagg import KeyDirectory, SecAggError, SecAggParams, SecAggResult, SecAggServer
from fedft.secagg.bounds import sum_problems
from fedft.secagg.encoding import decode_aggregate, vector_length
from fedft.transport import secagg_serde as ss
from fedft.transport import serde
from fedft.types import AggregationResult, ClientUpdate, Parts
from server.collect import Replies, exchange

logger = logging.getLogger(__name__)

MESSAGE_TYPE = "train.secagg"
"""Flower message type of every SecAgg stage (client/app.py registers the action)."""


_T = TypeVar("_T")


def secagg_threshold(num_clients: int, min_replies: int) -> int:
    """t = max(min_replies, floor(n/2) + 1): SecAgg needs t > n/2 survivors."""
    return max(min_replies, num_clients // 2 + 1)


def client_clip(aggregator: Aggregator) -> tuple[float, bool]:
    """``(clip_delta, weighted)`` clients apply before masking, for this aggregator.

    User-level DP: clip to C, uniform weights; robust ``norm_bound``: clip to its bound,
    weights n_k; otherwise no clip, weights n_k.
    """
    if isinstance(aggregator, CentralDP):
        return aggregator.clip_norm, False
    if isinstance(aggregator, NormBound):
        return aggregator.bound, True
    return 0.0, True


class _Exchange:
    """Sends one stage's messages to SecAgg indices and keeps the usable replies."""

    def __init__(
        self, grid: Grid, *, node_of: Mapping[int, int], rnd: int, timeout: float | None
    ) -> None:
        self.grid = grid
        self.node_of = dict(node_of)
        self.index_of = {nid: i for i, nid in node_of.items()}
        self.rnd = rnd
        self.timeout = timeout
        self.bytes_up = 0
        self.bytes_down = 0
        self.dropped: set[int] = set()

    def send(self, stage: str, contents: Mapping[int, RecordDict]) -> dict[int, RecordDict]:
        messages = []
        for i, content in contents.items():
            self.bytes_down += serde.recorddict_nbytes(content)
            messages.append(
                Message(
                    content=content,
                    dst_node_id=self.node_of[i],
                    message_type=MESSAGE_TYPE,
                    group_id=str(self.rnd),
                )
            )
        got: dict[int, RecordDict] = {}
        for reply in exchange(self.grid, messages, timeout=self.timeout):
            src = reply.metadata.src_node_id
            k = self.index_of.get(src)
            if reply.has_error():
                logger.warning(
                    "round %d secagg %s: client on node %s failed: %s",
                    self.rnd,
                    stage,
                    src,
                    reply.error,
                )
                continue
            if k is None or k not in contents or k in got:
                logger.warning(
                    "round %d secagg %s: dropping unexpected reply from node %s",
                    self.rnd,
                    stage,
                    src,
                )
                continue
            self.bytes_up += serde.recorddict_nbytes(reply.content)
            got[k] = reply.content
        missing = set(contents) - set(got)
        if missing:
            logger.warning(
                "round %d secagg %s: no reply from indices %s", self.rnd, stage, sorted(missing)
            )
            self.dropped |= missing
        return got

    def decode(
        self, stage: str, replies: Mapping[int, RecordDict], decoder: Callable[[RecordDict], _T]
    ) -> list[_T]:
        """Decode each reply; drop (and log) malformed ones and ones claiming another index."""
        out: list[_T] = []
        for i, content in replies.items():
            try:
                msg = decoder(content)
            except ValueError as exc:
                logger.warning("round %d secagg %s: index %d sent %s", self.rnd, stage, i, exc)
                self.dropped.add(i)
                continue
            if getattr(msg, "index", i) != i:
                logger.warning(
                    "round %d secagg %s: node of index %d claims index %s",
                    self.rnd,
                    stage,
                    i,
                    getattr(msg, "index", None),
                )
                self.dropped.add(i)
                continue
            out.append(msg)
        return out


def run_secure_round(
    grid: Grid,
    messages: Sequence[Message],
    *,
    nodes: Mapping[int, int],
    rnd: int,
    parts: Parts,
    template: ClientUpdate,
    aggregator: Aggregator,
    timeout: float | None,
    min_replies: int,
    max_examples: int,
    frac_bits: int = 24,
    clip: float = float(2**20),
) -> Replies:
    """Run one SecAgg round for the clients ``messages`` address; return what it produced.

    The :class:`~server.collect.Replies` of a secure round carry no updates: ``summed`` is
    the round's aggregate (None when the round failed, ``failed`` says why), ``in_sum`` the
    clients whose vectors are in it.

    Args:
        grid: the Flower grid.
        messages: the round's start messages (one per sampled client, as a plain round
            builds them); their content gains the ``fedft.secagg`` record.
        nodes: client index -> node id.
        rnd: the round number (the SecAgg round id: keys and masks are bound to it).
        parts: what the aggregator trains (``aggregator.trainable``).
        template: the adapters and extras every client starts from (all clients of a
            linear aggregator start from the same global), as a ClientUpdate.
        aggregator: the run's aggregator (linear; possibly wrapped by NormBound or
            CentralDP).
        timeout: seconds each stage waits for replies (None: wait for all).
        min_replies: federation.min_replies; fewer clients in the sum fail the round.
        max_examples: the largest n_k a client may weigh in with (bounds the total weight).
        frac_bits: fixed-point fractional bits (rounding error n * 2^(-f-1) per entry).
        clip: fixed-point clip on each entry of [w x, w].
    """
    out = Replies(secure=True)
    client_of_node = {nid: idx for idx, nid in nodes.items()}
    starts = {client_of_node[m.metadata.dst_node_id]: m.content for m in messages}
    secagg_index = {idx: k + 1 for k, idx in enumerate(sorted(starts))}  # client idx -> 1..n
    length = vector_length(template, parts=parts)
    params = _params(len(starts), min_replies, length, rnd=rnd, frac_bits=frac_bits, clip=clip)
    if isinstance(params, str):
        out.failed = params
        return out
    ex = _Exchange(
        grid, node_of={k: nodes[idx] for idx, k in secagg_index.items()}, rnd=rnd, timeout=timeout
    )
    sr = _SecureRound(ex, SecAggServer(params), out, secagg_index)
    result = _protocol(sr, starts, aggregator)
    _close(out, ex)
    if result is not None:
        _take_in(out, *result, sr.client_index, rnd)
        _Release(template, parts, aggregator, min_replies, max_examples).apply(out, result[0], rnd)
    return out


def _params(
    n: int, min_replies: int, length: int, *, rnd: int, frac_bits: int, clip: float
) -> SecAggParams | str:
    """The round's SecAgg parameters for ``n`` clients, or why it cannot run."""
    t = secagg_threshold(n, min_replies)
    if n < 2 or t > n:
        return f"secure aggregation needs >= 2 clients and t={t} <= n={n}"
    return SecAggParams(
        num_clients=n,
        max_dropouts=n - t,
        vector_length=length,
        round_id=rnd,
        frac_bits=frac_bits,
        clip=clip,
    )


@dataclass(frozen=True)
class _SecureRound:
    """One secure round's moving parts.

    Attributes:
        ex: the exchange with the round's clients.
        server: the SecAgg server (its parameters, its convictions).
        out: what the round produced so far.
        secagg_index: client index -> SecAgg index (1..n).
    """

    ex: _Exchange
    server: SecAggServer
    out: Replies
    secagg_index: Mapping[int, int]

    @property
    def client_index(self) -> dict[int, int]:
        """SecAgg index -> client index."""
        return {k: idx for idx, k in self.secagg_index.items()}


def _protocol(
    sr: _SecureRound, starts: Mapping[int, RecordDict], aggregator: Aggregator
) -> tuple[SecAggResult, dict[int, RecordDict]] | None:
    """The five stages: the unmasked sum and the advertise replies of the clients who trained.

    None when the round failed (too many clients dropped or were convicted, or the shares
    do not rebuild the masks): ``out.failed`` says why, ``out.suspects`` who was convicted.
    """
    try:
        keyed, directory = _advertise(sr, starts, aggregator)
        return _mask_and_sum(sr, directory), keyed
    except SecAggError as exc:
        logger.error("round %d: %s; model unchanged", sr.server.params.round_id, exc)
        sr.out.failed = str(exc)
        sr.out.suspects = sorted(sr.client_index[k] for k in sr.server.convicted)
        return None


def _advertise(
    sr: _SecureRound, starts: Mapping[int, RecordDict], aggregator: Aggregator
) -> tuple[dict[int, RecordDict], KeyDirectory]:
    """Stage 1 (advertise): the round's start plus the SecAgg parameters -> each client
    trains and advertises its keys; the replies of the clients who trained (privacy records
    taken) and the key directory U1."""
    params, rnd, index = sr.server.params, sr.server.params.round_id, sr.secagg_index
    clip_delta, weighted = client_clip(aggregator)
    advertise: dict[int, RecordDict] = {}
    for idx in sorted(starts):
        content = RecordDict(dict(starts[idx].items()))
        content[ss.RECORD] = ss.params_to_record(
            params, index=index[idx], clip_delta=clip_delta, weighted=weighted
        )
        advertise[index[idx]] = content
    replies = sr.ex.send("advertise", advertise)
    client_index = sr.client_index
    keyed = {k: c for k, c in replies.items() if _privacy(sr.out, client_index[k], c, rnd)}
    n = params.num_clients
    ads = sr.ex.decode("advertise", keyed, lambda c: ss.advertise_from_record(c, num_clients=n))
    return keyed, sr.server.collect_keys(ads)


def _mask_and_sum(sr: _SecureRound, directory: KeyDirectory) -> SecAggResult:
    """Stages 2-5 (share, verify, masked, unmask) after the keys are in; the unmasked sum."""
    ex, server = sr.ex, sr.server
    n, rnd, length = server.params.num_clients, server.params.round_id, server.params.vector_length
    rec = ss.directory_to_record(directory, round_id=rnd)
    replies = ex.send("share", {k.index: RecordDict({ss.RECORD: rec}) for k in directory.keys})
    shares = ex.decode("share", replies, lambda c: ss.share_keys_from_record(c, num_clients=n))
    routed = server.collect_shares(shares)
    # share check: complaints against dealers, resolved by the server
    replies = ex.send(
        "verify",
        {
            k: RecordDict({ss.RECORD: ss.routed_to_record(r, round_id=rnd)})
            for k, r in routed.items()
        },
    )
    checks = ex.decode("verify", replies, lambda c: ss.check_from_record(c, num_clients=n))
    qualified = server.collect_checks(checks)
    rec = ss.mask_request_to_record(qualified, round_id=rnd)
    replies = ex.send("masked", {k: RecordDict({ss.RECORD: rec}) for k in qualified.qualified})
    masked = ex.decode(
        "masked",
        replies,
        lambda c: ss.masked_from_record(c, num_clients=n, vector_length=length),
    )
    request = server.collect_masked(masked)
    rec = ss.request_to_record(request, round_id=rnd)
    replies = ex.send("unmask", {k: RecordDict({ss.RECORD: rec}) for k in request.survivors})
    unmask = ex.decode("unmask", replies, lambda c: ss.unmask_from_record(c, num_clients=n))
    return server.collect_unmasking(unmask)


def _take_in(
    out: Replies,
    total: SecAggResult,
    keyed: Mapping[int, RecordDict],
    client_index: Mapping[int, int],
    rnd: int,
) -> None:
    """Who is in the sum, who was convicted of cheating, the clients' training losses."""
    out.in_sum = len(total.included)
    out.suspects = sorted(client_index[k] for k in total.suspects)
    if out.suspects:
        logger.warning(
            "round %d: clients %s cheated in the share exchange (convicted; the round went on "
            "without their shares)",
            rnd,
            out.suspects,
        )
    for k in total.included:
        loss = _metric(keyed[k], "train_loss")
        if loss is not None:
            out.train_loss.append(loss)


@dataclass(frozen=True)
class _Release:
    """What an unmasked sum must satisfy before the round's aggregate is rebuilt from it."""

    template: ClientUpdate
    parts: Parts
    aggregator: Aggregator
    min_replies: int
    max_examples: int

    def apply(self, out: Replies, total: SecAggResult, rnd: int) -> None:
        """``out.summed`` from ``total`` when it is sound, else ``out.failed`` says why."""
        if out.in_sum < self.min_replies:
            out.failed = (
                f"{out.in_sum} clients in the sum < federation.min_replies={self.min_replies}"
            )
            return
        problems = check_sum(
            total,
            template=self.template,
            parts=self.parts,
            aggregator=self.aggregator,
            max_examples=self.max_examples,
        )
        if problems:
            out.failed = "; ".join(problems)
            logger.error("round %d: refused the secure sum: %s; model unchanged", rnd, out.failed)
            return
        out.summed = aggregate_from_sum(
            total, template=self.template, parts=self.parts, aggregator=self.aggregator
        )


def check_sum(
    total: SecAggResult,
    *,
    template: ClientUpdate,
    parts: Parts,
    aggregator: Aggregator,
    max_examples: int,
    frac_bits: int = 24,
) -> list[str]:
    """Why the unmasked sum cannot come from honest clients ([] = it can), see
    :func:`fedft.secagg.bounds.sum_problems`."""
    clip_delta, weighted = client_clip(aggregator)
    reference = None
    if not weighted:
        reference = flatten_trainables(template, parts).to(torch.float64).numpy()
    return sum_problems(
        np.asarray(total.total, dtype=np.float64),
        included=len(total.included),
        weighted=weighted,
        max_examples=max_examples,
        reference=reference,
        clip_norm=clip_delta if clip_delta > 0 else None,
        rounding=len(total.included) * 2.0 ** (-frac_bits - 1),
    )


def _close(out: Replies, ex: _Exchange) -> None:
    out.bytes_up, out.bytes_down = ex.bytes_up, ex.bytes_down
    out.dropped = sorted(ex.dropped)


def _metric(content: RecordDict, name: str) -> float | None:
    metrics = content.get(serde.METRICS)
    if metrics is None or name not in metrics:  # type: ignore[operator]
        return None
    value = metrics[name]  # type: ignore[index]
    return float(value) if isinstance(value, int | float) else None


def _privacy(out: Replies, idx: int, content: RecordDict, rnd: int) -> bool:
    """Take the privacy record and the ε of an advertise reply (checked by
    :mod:`fedft.replies`); False if the client refused or its record is unacceptable."""
    if not out.take_privacy(idx, content, rnd):
        return False
    metrics = content.get(serde.METRICS)
    if metrics is not None and "epsilon" in metrics:  # type: ignore[operator]
        eps = metrics["epsilon"]  # type: ignore[index]
        bad = check_epsilon(eps)
        if bad is not None:
            logger.warning("round %d: rejected reply of client %d: %s", rnd, idx, bad)
            out.rejected.append((idx, bad))
            return False
        out.epsilon[idx] = float(eps)  # type: ignore[arg-type]
    return True


def aggregate_from_sum(
    total: SecAggResult,
    *,
    template: ClientUpdate,
    parts: Parts,
    aggregator: Aggregator,
) -> AggregationResult:
    """The round's result from the unmasked sum ``[sum w_k x_k, sum w_k]``.

    Plain linear aggregators and ``norm_bound`` (clients clipped themselves): the weighted
    mean, formatted by the inner aggregator (:func:`decode_aggregate`). User-level DP: the
    sum of clipped deltas goes through :meth:`CentralDP.release` (noise once, divide by the
    expected cohort m, inner aggregator, accountant), the same code the plain round runs.
    """
    if isinstance(aggregator, CentralDP):
        return _central_dp_from_sum(total, template=template, parts=parts, dp=aggregator)
    inner = aggregator.inner if isinstance(aggregator, NormBound) else aggregator
    return decode_aggregate(total, template=template, parts=parts, inner=inner)


def _central_dp_from_sum(
    total: SecAggResult,
    *,
    template: ClientUpdate,
    parts: Parts,
    dp: CentralDP,
) -> AggregationResult:
    """User-level DP from the unmasked ``[sum (x0 + clipped delta_k), K]``: CentralDP's release."""
    vec = np.asarray(total.total, dtype=np.float64)  # [sum (x0 + clipped delta_k), K]
    count = float(vec[-1])
    if not count >= 0.5 or not math.isfinite(count):
        raise ValueError(f"unmasked client count {count} is not a positive count")
    x0 = flatten_trainables(template, parts).to(torch.float64)  # (D,) the reference
    summed = torch.from_numpy(vec[:-1].copy()) - round(count) * x0  # sum of clipped deltas
    dp.set_reference(template.adapters, extras=template.extras)  # what the clients started from
    return dp.release(summed, clients=len(total.included))
