"""One federated round as a pipeline of named steps (the server's side).

:func:`run_round` reads top to bottom as the round does::

    sample -> build starts -> collect (plain or secure) -> validate -> account privacy
           -> aggregate -> evaluate -> checkpoint -> record

Each step is a function of a screenful over :class:`Federation` (what the rounds share:
the coordinator, the privacy ledger, the nodes, the metrics writer) and the round's own
values (:class:`Starts`, :class:`~server.collect.Replies`). To change one step (another
sampling, a stricter validation, another ledger), replace that function; the others do not
change. Byte counts are the serialised sizes of the real messages.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedft.checkpoint import save_checkpoint
from fedft.config import RunConfig
from fedft.privacy import CentralDP
from fedft.privacy.ledger import EPSILON_COVERS, PrivacyLedger
from fedft.privacy.release import published_round
from fedft.privacy.sampling import poisson_cohort
from fedft.reporting.metrics import MetricsWriter
from fedft.seeds import derive_seed
from fedft.training.coordinator import ClientStart, Coordinator
from fedft.training.runtime import Runtime, evaluate_global
from fedft.training.sampling import sample_clients
from fedft.transport import serde
from fedft.types import AggregationResult, ClientUpdate
from server.collect import Replies, collect_plain, validate_replies
from server.secure_round import run_secure_round

logger = logging.getLogger(__name__)

TRAIN = "train"
"""Flower message type of a round's start (client/app.py registers the action)."""

#: client metrics summed over a round's updates into metrics.jsonl (split learning).
SUMMED_CLIENT_METRICS = (
    "kept_samples",
    "split_frames_up",
    "split_frames_down",
    "split_bytes_up",
    "split_bytes_down",
)

#: client metrics written as the round's weakest value (split learning's cut protections,
#: each under its own name: neither is DP-SGD's epsilon): the largest d_χ ε, the smallest
#: Gaussian std on the cut.
WEAKEST_CLIENT_METRICS: dict[str, Callable[[list[float]], float]] = {
    "dx_epsilon": max,
    "cut_noise_std": min,
}


class Outcome(enum.Enum):
    """How a round ended."""

    DONE = "done"  #: aggregated, evaluated, checkpointed
    FAILED = "failed"  #: too few replies: the global model is unchanged, the run goes on
    STOP = "stop"  #: no client can train any more (privacy budgets): the run ends


@dataclass
class Federation:
    """What every round reads and moves forward (built once by ``server.federation``).

    Attributes:
        cfg: the run's configuration.
        grid: the Flower grid the rounds' messages go through.
        runtime: the server's base model (evaluation) and its adapted modules.
        coord: global adapters, folded base delta, extras and the aggregator.
        test: the encoded held-out test set.
        nodes: client index -> Flower node id.
        ledger: per-client ε (sample-level DP), checkpointed.
        max_examples: the largest FedAvg weight (n_k) one client may claim.
        writer: appends metrics.jsonl.
        ckpt_dir: where each round's checkpoint goes.
        last: the latest evaluation of the global model (metric -> value).
        frozen_id: fingerprint of the shared frozen factors ("" when every part trains).
        holds_frozen: clients known to hold the frozen factors (they get only what trains).
        excluded: clients a secure round convicted of cheating (``Replies.suspects``):
            never sampled again in this run, checkpointed with every round (a resumed run
            keeps them out).
    """

    cfg: RunConfig
    grid: Grid
    runtime: Runtime
    coord: Coordinator
    test: Any
    nodes: dict[int, int]
    ledger: PrivacyLedger
    max_examples: int
    writer: MetricsWriter
    ckpt_dir: Path
    last: dict[str, float]
    frozen_id: str = ""
    holds_frozen: set[int] = field(default_factory=set)
    excluded: set[int] = field(default_factory=set)


@dataclass
class Starts:
    """The round's start messages: what each sampled client starts from, as sent."""

    clients: dict[int, ClientStart]
    messages: list[Message]
    bytes_down: int


def run_round(fed: Federation, rnd: int) -> Outcome:
    """Run round ``rnd``: every step in order; write its metrics line."""
    t_round = time.monotonic()
    reason = stop_reason(fed)
    if reason is not None:
        logger.warning("stopping before round %d: %s", rnd, reason)
        return Outcome.STOP
    chosen = sample(fed, rnd)
    admit_split_clients(fed, rnd, chosen)
    starts = build_starts(fed, rnd, chosen)
    replies = collect(fed, rnd, starts)
    validate(fed, rnd, replies, starts)
    account_privacy(fed, replies)
    line = round_record(fed, rnd, replies, sampled=len(chosen))
    if budgets_spent(fed, replies):
        logger.warning("round %d: every client has spent its privacy budget; stopping", rnd)
        record(fed, line, t_round, stopped="every client has spent its privacy budget")
        return Outcome.STOP
    if too_few(fed, rnd, replies):  # checkpointed too: its convictions, the ledger's news
        record(fed, line, t_round, checkpoint_round=rnd, failed=True)
        return Outcome.FAILED
    result = aggregate(fed, replies)
    fed.last = evaluate(fed)
    row = record_fields(fed, line, replies, result, t_round)
    checkpoint(fed, rnd, row)  # first: the checkpoint carries the row, a kill loses no line
    fed.writer.write(**row)
    return Outcome.DONE


# -- before the round -------------------------------------------------------------------
def stop_reason(fed: Federation) -> str | None:
    """Why no further round can run (a user-level budget, every client out), or None."""
    decision = fed.coord.aggregator.budget_decision()
    if decision is not None and not decision.allowed:
        return decision.message
    if not fed.ledger.able(range(fed.cfg.federation.num_clients)):
        return "no client can train within its privacy budget"
    return None


def sample(fed: Federation, rnd: int) -> list[int]:
    """The round's cohort: clients_per_round of the clients still within their budget.

    Under user-level DP: secret Poisson sampling at q = m / N, what its accountant assumes
    (:func:`fedft.privacy.sampling.poisson_cohort`); else a fixed-size sample reproducible
    under the run's seed.
    """
    everyone = range(fed.cfg.federation.num_clients)
    able = [k for k in fed.ledger.able(everyone) if k not in fed.excluded]
    aggregator = fed.coord.aggregator
    if isinstance(aggregator, CentralDP):
        return poisson_cohort(able, sample_rate=aggregator.sample_rate)
    return sample_clients(able, fed.cfg.federation.clients_per_round, seed=fed.cfg.seed, rnd=rnd)


def admit_split_clients(fed: Federation, rnd: int, chosen: list[int]) -> None:
    """Split learning: name this round's cohort to the split service (it admits only these
    client identities, ``client-<index>``, see :func:`server.split_service.write_admission`)."""
    if fed.cfg.adapter.method != "split":
        return
    from fedft.certs import client_name
    from server.split_service import ADMISSION_FILE, write_admission

    path = fed.ckpt_dir.parent / ADMISSION_FILE
    write_admission(path, round_=rnd, identities=[client_name(k) for k in chosen])


def client_config(cfg: RunConfig, *, rnd: int, idx: int, start: ClientStart) -> dict[str, Any]:
    """The per-round config record a client gets with its start."""
    return {
        "round": rnd,
        "client_index": idx,
        "rank": start.rank,
        "seed": derive_seed(cfg.seed, rnd, idx),
    }


def build_starts(fed: Federation, rnd: int, chosen: list[int]) -> Starts:
    """Each chosen client's start (its rank, the global adapters, base delta, extras)."""
    trainable = fed.coord.aggregator.trainable
    out = Starts(clients={}, messages=[], bytes_down=0)
    for idx in chosen:
        start = fed.coord.start_for(idx)
        out.clients[idx] = start
        conf = client_config(fed.cfg, rnd=rnd, idx=idx, start=start)
        if fed.frozen_id:
            conf["frozen_id"] = fed.frozen_id
        content = serde.start_to_recorddict(
            adapters=start.adapters,
            parts=serde.start_parts(trainable, holds_frozen=idx in fed.holds_frozen),
            base_delta=start.base_delta,
            extras=start.extras,
            config=conf,
        )
        out.bytes_down += serde.recorddict_nbytes(content)
        out.messages.append(
            Message(
                content=content, dst_node_id=fed.nodes[idx], message_type=TRAIN, group_id=str(rnd)
            )
        )
    return out


# -- the exchange -----------------------------------------------------------------------
def collect(fed: Federation, rnd: int, starts: Starts) -> Replies:
    """Send the starts and gather the replies: a plain round, or a secure one."""
    fed_cfg = fed.cfg.federation
    timeout = fed_cfg.round_timeout_s or None
    parts = fed.coord.aggregator.trainable
    if fed.cfg.aggregation.secure and starts.clients:  # the server sees only the weighted sum
        first = starts.clients[min(starts.clients)]
        replies = run_secure_round(
            fed.grid,
            starts.messages,
            nodes=fed.nodes,
            rnd=rnd,
            parts=parts,
            template=ClientUpdate(
                client_id="template",
                adapters=first.adapters,
                num_examples=1,
                extras=fed.coord.extras,
            ),
            aggregator=fed.coord.aggregator,
            timeout=timeout,
            min_replies=fed_cfg.min_replies or 1,
            max_examples=fed.max_examples,
        )
    else:
        replies = collect_plain(
            fed.grid, starts.messages, timeout, starts.clients, fed.nodes, parts, rnd
        )
        replies.bytes_down = starts.bytes_down
    fed.holds_frozen.difference_update(replies.errored)  # e.g. a restarted client lost them
    if replies.suspects:
        fed.excluded.update(replies.suspects)
        logger.warning(
            "round %d: clients %s excluded from the rest of the run", rnd, replies.suspects
        )
    return replies


def validate(fed: Federation, rnd: int, replies: Replies, starts: Starts) -> None:
    """Reject each unsound update on its own (:func:`~server.collect.validate_replies`)."""
    validate_replies(
        replies,
        starts.clients,
        parts=fed.coord.aggregator.trainable,
        extras=fed.coord.extras,
        max_norm=fed.cfg.aggregation.max_update_norm or None,
        max_examples=fed.max_examples,
        rnd=rnd,
    )
    if fed.frozen_id:
        fed.holds_frozen.update(int(u.client_id) for u in replies.updates)


def account_privacy(fed: Federation, replies: Replies) -> None:
    """Take the clients' privacy reports (accountants, ε, refusals) into the ledger."""
    fed.ledger.update(replies)


# -- the outcome ------------------------------------------------------------------------
def budgets_spent(fed: Federation, replies: Replies) -> bool:
    """Whether the round got only refusals and every client is now out of budget."""
    return (
        not replies.updates
        and bool(replies.refused)
        and len(fed.ledger.exhausted) == fed.cfg.federation.num_clients
    )


def too_few(fed: Federation, rnd: int, replies: Replies) -> bool:
    """Whether the round has fewer replies than federation.min_replies (logged)."""
    if fed.cfg.privacy.mode == "user":  # every round is a release, even an empty or failed one
        return False
    min_replies = fed.cfg.federation.min_replies or 1
    if replies.clients >= min_replies and not (replies.secure and replies.summed is None):
        return False
    logger.error(
        "round %d: %d replies (federation.min_replies=%d)%s; model unchanged",
        rnd,
        replies.clients,
        min_replies,
        f", secure aggregation: {replies.failed}" if replies.secure else "",
    )
    return True


def aggregate(fed: Federation, replies: Replies) -> AggregationResult:
    """Move the global model forward: aggregate the updates, or apply the secure sum."""
    if not replies.secure:
        return fed.coord.aggregate(replies.updates)
    if replies.summed is None:  # user-level DP (too_few passed it): the noise alone
        logger.error("secure aggregation: %s; the noise alone is released", replies.failed)
        return fed.coord.aggregate([])
    return fed.coord.apply(replies.summed)


def evaluate(fed: Federation) -> dict[str, float]:
    """The global model's figures on the held-out test set."""
    return evaluate_global(
        fed.runtime,
        adapters=fed.coord.global_adapters,
        base_delta=fed.coord.dense_base_delta(),
        extras=fed.coord.extras,
        test=fed.test,
        batch_size=fed.cfg.federation.eval_batch_size,
    )


def checkpoint(fed: Federation, rnd: int, row: Mapping[str, Any]) -> None:
    """Save everything a resumed run needs after round ``rnd`` (with its metrics line)."""
    save_checkpoint(
        fed.ckpt_dir,
        {
            "round": rnd,
            "coordinator": fed.coord.state_dict(),
            "config": fed.cfg.to_dict(),
            **fed.ledger.state_dict(),
            "excluded": sorted(fed.excluded),
            "row": json.dumps(row, default=str),
        },
    )


def excluded_from_state(value: Any, *, num_clients: int) -> set[int]:
    """The checkpoint's ``excluded`` field (clients a secure round convicted), validated.

    A checkpoint without the field (written before exclusions were saved) has none.

    Raises:
        ValueError: not a list of at most ``num_clients`` distinct client indices in
            ``[0, num_clients)``.
    """
    if value is None:
        return set()
    if not isinstance(value, list) or len(value) > num_clients:
        raise ValueError(
            f"checkpoint field 'excluded' must be a list of at most {num_clients} client "
            f"indices, got {type(value).__name__} of length {_length(value)}; the checkpoint "
            "is damaged: restore it or start the run afresh without --resume"
        )
    bad = [v for v in value if type(v) is not int or not 0 <= v < num_clients]
    if bad or len(set(value)) != len(value):
        raise ValueError(
            f"checkpoint field 'excluded' holds {bad[:5] or 'repeated indices'}: each entry "
            f"must be a distinct client index in [0, {num_clients}); the checkpoint is "
            "damaged: restore it or start the run afresh without --resume"
        )
    return set(value)


def _length(value: Any) -> int | str:
    return len(value) if isinstance(value, list | str | dict) else "-"


# -- the metrics line -------------------------------------------------------------------
def round_record(fed: Federation, rnd: int, replies: Replies, *, sampled: int) -> dict[str, Any]:
    """The fields of the round's metrics line known once the replies are in."""
    line: dict[str, Any] = {
        "round": rnd,
        "bytes_up": replies.bytes_up,
        "bytes_down": replies.bytes_down,
        "clients": replies.clients,
        "sampled": sampled,
        "refused": len(replies.refused),
        "rejected": len(replies.rejected),
    }
    if replies.suspects:
        line["secagg_suspects"] = replies.suspects
    for key in SUMMED_CLIENT_METRICS:  # split learning: pruning and wire traffic
        values = [float(u.metrics[key]) for u in replies.updates if key in u.metrics]
        if values:
            line[key] = sum(values)
    for key, weakest in WEAKEST_CLIENT_METRICS.items():
        values = [float(u.metrics[key]) for u in replies.updates if key in u.metrics]
        if values:
            line[key] = weakest(values)
    line.update(fed.ledger.record())
    return line


def record(
    fed: Federation,
    line: dict[str, Any],
    t_round: float,
    *,
    checkpoint_round: int | None = None,
    **outcome: Any,
) -> None:
    """Write the line of a round that did not aggregate (the model's figures unchanged);
    with ``checkpoint_round``, checkpoint that round first (the model as it was)."""
    row = {
        **line,
        **metric_fields(fed.last),
        "epsilon": fed.ledger.epsilon(),
        **outcome,
        "wall_s": time.monotonic() - t_round,
    }
    row = published_round(row, mode=fed.cfg.privacy.mode)
    if checkpoint_round is not None:
        checkpoint(fed, checkpoint_round, row)
    fed.writer.write(**row)


def record_fields(
    fed: Federation,
    line: dict[str, Any],
    replies: Replies,
    result: AggregationResult,
    t_round: float,
) -> dict[str, Any]:
    """The full metrics line of an aggregated round (user-level ε from the result)."""
    epsilon = fed.ledger.epsilon()
    if "epsilon_user" in result.metrics:
        epsilon = float(result.metrics["epsilon_user"])
        line["epsilon_level"] = "user"
        line["epsilon_covers"] = EPSILON_COVERS
    if replies.secure and replies.summed is None:  # user-level DP: the sum was lost
        line["failed"] = True
    losses = replies.losses()
    row = {
        **line,
        **metric_fields(fed.last),
        "epsilon": epsilon,
        "train_loss": sum(losses) / len(losses) if losses else None,
        **{f"agg_{k}": v for k, v in result.metrics.items()},
        "wall_s": time.monotonic() - t_round,
    }
    return published_round(row, mode=fed.cfg.privacy.mode)


def metric_fields(ev: Mapping[str, float]) -> dict[str, Any]:
    """An evaluation's figures as plain floats."""
    return {k: float(v) for k, v in ev.items()}


def frozen_fingerprint(coord: Coordinator) -> str:
    """A fingerprint of the shared frozen factors (SHA-256 of the global factors' bytes).

    FFA's A and Fed-SB's B, A never change: a client that holds them gets only what trains.
    "" when clients train every part (nothing is frozen).
    """
    if coord.aggregator.trainable == "ab":
        return ""
    adapters = coord.global_adapters
    digest = hashlib.sha256()
    for name in sorted(adapters):
        f = adapters[name]
        digest.update(name.encode())
        for t in (f.a, f.b):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]
