"""The round loop on the server: a thin shell between Flower messages and fedft objects.

Per round: sample clients, send each node its own start (its rank, the global adapters, the
folded base delta, the extras), receive updates, validate them, aggregate with
``fedft.aggregation``, evaluate the global model on the held-out test set, write a metrics
line and a checkpoint. Byte counts are the serialised sizes of the real messages.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedft import builders
from fedft.adapters import peft_io
from fedft.adapters.math import effective_delta
from fedft.aggregation.validate import validate_update
from fedft.checkpoint import load_checkpoint, save_checkpoint
from fedft.config import RunConfig
from fedft.data.encode import batches
from fedft.replies import bind_client_indices, check_epsilon, parse_privacy_record
from fedft.reporting.metrics import MetricsWriter, read_metrics, write_summary
from fedft.reporting.report import write_report
from fedft.training.coordinator import ClientStart, Coordinator
from fedft.training.local import resolve_device, weight_gradients
from fedft.training.runtime import (
    PROMPT,
    Runtime,
    evaluate_global,
    get_data,
    get_encoded,
    get_runtime,
    initial_prompt,
)
from fedft.transport import serde
from fedft.types import AggregationResult, ClientUpdate, LoraFactors
from server.secure_round import run_secure_round

logger = logging.getLogger(__name__)

QUERY = "query"
TRAIN = "train"
#: client metrics summed over a round's updates into metrics.jsonl (split learning).
SUMMED_CLIENT_METRICS = (
    "kept_samples",
    "split_frames_up",
    "split_frames_down",
    "split_bytes_up",
    "split_bytes_down",
)
#: what ``epsilon`` in metrics.jsonl is about: the released model (for split learning, the
#: client's parts and any server adapter), never the activations and gradients that cross the
#: cut, which no DP mechanism covers.
EPSILON_COVERS = "release"


class RoundFailed(RuntimeError):
    """Fewer replies than the configured minimum: the global model stays unchanged."""


def discover_clients(
    grid: Grid,
    *,
    num_clients: int,
    timeout_s: float = 600.0,
    bound: Mapping[int, int] | None = None,
) -> dict[int, int]:
    """Ask every connected node for its partition id: {client index: node id}.

    ``bound`` (node id -> client index, from the operator's registered node keys) overrides
    what nodes declare, so one node cannot take another's index (:mod:`fedft.replies`).
    """
    deadline = time.monotonic() + timeout_s
    node_ids: list[int] = list(grid.get_node_ids())
    while len(node_ids) < num_clients and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < num_clients:
        raise RuntimeError(
            f"only {len(node_ids)} of federation.num_clients={num_clients} clients connected "
            f"within {timeout_s:.0f} s; start more clients or lower federation.num_clients"
        )
    messages = [
        Message(content=RecordDict(), dst_node_id=nid, message_type=QUERY) for nid in node_ids
    ]
    claims: list[tuple[int, object]] = []
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if reply.has_error():
            logger.warning(
                "node %s did not answer the query: %s", reply.metadata.src_node_id, reply.error
            )
            continue
        info = reply.content.get("info")
        claimed = info.get("client_index") if isinstance(info, ConfigRecord) else None
        claims.append((reply.metadata.src_node_id, claimed))
    binding = bind_client_indices(claims, num_clients=num_clients, bound=bound)
    for node, reason in binding.ignored:
        logger.warning("node %s: %s; ignored", node, reason)
    missing = sorted(set(range(num_clients)) - set(binding.nodes))
    if missing:
        raise RuntimeError(f"no node serves client indices {missing}")
    return binding.nodes


def _client_config(cfg: RunConfig, *, rnd: int, idx: int, start: ClientStart) -> dict[str, Any]:
    return {
        "round": rnd,
        "client_index": idx,
        "rank": start.rank,
        "seed": cfg.seed * 1_000_003 + rnd * 10_007 + idx,
    }


def _public_init(cfg: RunConfig, runtime: Runtime, aggregator: Any, public: Any) -> None:
    """Fed-SB's shared B, A from the gradient on the server's public split (no client data,
    so no privacy budget is spent)."""
    grads = weight_gradients(
        runtime.model,
        list(runtime.shapes),
        batches(
            public,
            batch_size=cfg.federation.batch_size,
            steps=cfg.aggregation.fedsb_init_steps,
            seed=cfg.seed,
        ),
        device=runtime.device,
    )
    rank = builders.max_rank(cfg)
    aggregator.initialise_from_gradients(
        grads, rank=rank, lr=cfg.federation.lr, scaling=cfg.adapter.alpha / rank
    )


def run_federation(
    grid: Grid,
    cfg: RunConfig,
    out: Path,
    *,
    progress: bool = True,
    resume: bool = False,
    bound_nodes: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Run every round of ``cfg`` on ``grid``; write metrics, report, adapter, checkpoint.

    ``bound_nodes`` (node id -> client index) binds client indices to node identities.
    """
    out.mkdir(parents=True, exist_ok=True)
    if not resume:
        _set_aside_previous_run(out)
    t_start = time.monotonic()
    device = resolve_device(cfg.federation.device)
    fed = get_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(**builders.runtime_kwargs(cfg, num_labels=fed.num_labels), device=device)
    enc_key = (
        cfg.model.name,
        cfg.data.max_length,
        tuple(sorted(builders.data_kwargs(cfg).items())),
    )
    test = get_encoded(
        ("test", *enc_key),
        lambda: fed.test,
        runtime.tokenizer,
        task=cfg.model.task,
        max_length=cfg.data.max_length,
    )
    aggregator = builders.build_aggregator(cfg)
    if cfg.aggregation.algorithm == "fedsb":
        public = get_encoded(
            ("public", *enc_key),
            lambda: fed.public,
            runtime.tokenizer,
            task=cfg.model.task,
            max_length=cfg.data.max_length,
        )
        _public_init(cfg, runtime, aggregator, public)
    extras = dict(runtime.initial_extras)
    if cfg.adapter.method in ("prompt", "split"):  # the prompt and head: the only trainables
        extras[PROMPT] = initial_prompt(
            runtime, num_tokens=cfg.adapter.prompt_tokens, seed=cfg.seed
        )
    coord = Coordinator(
        aggregator=aggregator,
        shapes={} if cfg.adapter.method in ("prompt", "split") else runtime.shapes,
        rank_of=cfg.adapter.rank_of,
        alpha=cfg.adapter.alpha,
        extras=extras,
        seed=cfg.seed,
        max_rank=builders.max_rank(cfg),
    )
    first_round = 1
    ckpt_dir = out / "checkpoint"
    accountants: dict[int, str] = {}
    exhausted: set[int] = set()
    spent: dict[int, float] = {}
    if resume:
        state = load_checkpoint(ckpt_dir)
        coord.load_state_dict(state["coordinator"])
        first_round = int(state["round"]) + 1
        accountants.update({int(k): str(v) for k, v in state.get("accountants", {}).items()})
        exhausted.update(int(i) for i in state.get("exhausted", []))
        spent.update({int(k): float(v) for k, v in state.get("spent", {}).items()})
        logger.info("resuming after round %d", first_round - 1)
        _reconcile_metrics(out, round_=first_round - 1, row=state.get("row"))
    writer = MetricsWriter(out)
    eval_kw: dict[str, Any] = {"test": test, "batch_size": cfg.federation.eval_batch_size}
    last = before = evaluate_global(
        runtime,
        adapters=coord.global_adapters,
        base_delta=coord.dense_base_delta(),
        extras=coord.extras,
        **eval_kw,
    )
    if resume:  # the untuned model's figures are in the first run's round-0 line
        first = [r for r in read_metrics(out) if int(r["round"]) == 0]
        if first:
            before = {k: float(first[0][k]) for k in before if first[0].get(k) is not None}
    else:
        writer.write(
            **{
                "round": 0,
                **_metric_fields(before),
                "bytes_up": 0,
                "bytes_down": 0,
                "epsilon": None,
                "clients": 0,
                "wall_s": 0.0,
            }
        )
    nodes = discover_clients(
        grid,
        num_clients=cfg.federation.num_clients,
        timeout_s=cfg.federation.client_wait_s,
        bound=bound_nodes,
    )
    parts_up = aggregator.trainable
    # FFA's A and Fed-SB's B, A never change: a client that holds them gets only what trains
    frozen_id = _frozen_id(coord.global_adapters) if aggregator.trainable != "ab" else ""
    holds_frozen: set[int] = set()
    min_replies = cfg.federation.min_replies or 1
    # the largest FedAvg weight one client may claim (its n_k)
    max_examples = cfg.aggregation.max_examples or max(len(c) for c in fed.clients)
    timeout = cfg.federation.round_timeout_s or None

    bar = tqdm(
        range(first_round, cfg.federation.rounds + 1),
        desc=cfg.name,
        unit="round",
        disable=not progress,
        initial=first_round - 1,
        total=cfg.federation.rounds,
    )
    for rnd in bar:
        t_round = time.monotonic()
        decision = getattr(aggregator, "budget_decision", lambda: None)()
        if decision is not None and not decision.allowed:
            logger.warning("stopping before round %d: %s", rnd, decision.message)
            break
        able = [i for i in range(cfg.federation.num_clients) if i not in exhausted]
        if not able:
            logger.warning("no client can train within its privacy budget; stopping")
            break
        chosen = sorted(
            random.Random(cfg.seed * 7919 + rnd).sample(
                able, min(cfg.federation.clients_per_round, len(able))
            )
        )
        starts: dict[int, ClientStart] = {}
        messages, bytes_down = [], 0
        for idx in chosen:
            start = coord.start_for(idx)
            starts[idx] = start
            conf = _client_config(cfg, rnd=rnd, idx=idx, start=start)
            if idx in accountants:
                conf["accountant"] = accountants[idx]
            if frozen_id:
                conf["frozen_id"] = frozen_id
            content = serde.start_to_recorddict(
                adapters=start.adapters,
                parts=serde.start_parts(aggregator.trainable, holds_frozen=idx in holds_frozen),
                base_delta=start.base_delta,
                extras=start.extras,
                config=conf,
            )
            bytes_down += serde.recorddict_nbytes(content)
            messages.append(
                Message(
                    content=content, dst_node_id=nodes[idx], message_type=TRAIN, group_id=str(rnd)
                )
            )
        secure = None
        if cfg.aggregation.secure:  # the server sees only the weighted sum
            secure = run_secure_round(
                grid,
                messages,
                nodes=nodes,
                rnd=rnd,
                parts=parts_up,
                template=ClientUpdate(
                    client_id="template",
                    adapters=starts[chosen[0]].adapters,
                    num_examples=1,
                    extras=coord.extras,
                ),
                aggregator=aggregator,
                timeout=timeout,
                min_replies=min_replies,
                max_examples=max_examples,
            )
            bytes_down = secure.bytes_down
            replies = RoundReplies(
                bytes_up=secure.bytes_up,
                epsilon=secure.epsilon,
                accountants=secure.accountants,
                refused=secure.refused,
                rejected=secure.rejected,
            )
        else:
            replies = _collect(
                grid,
                messages,
                timeout,
                starts,
                nodes,
                parts_up,
                rnd,
                extras=coord.extras,
                max_norm=cfg.aggregation.max_update_norm or None,
                max_examples=max_examples,
            )
        holds_frozen.difference_update(replies.errored)  # e.g. a restarted client lost them
        if frozen_id:
            holds_frozen.update(int(u.client_id) for u in replies.updates)
        accountants.update(replies.accountants)
        exhausted.update(replies.refused)
        for idx, e in replies.epsilon.items():
            spent[idx] = e
        updates = replies.updates
        eps = list(spent.values())
        record: dict[str, Any] = {
            "round": rnd,
            "bytes_up": replies.bytes_up,
            "bytes_down": bytes_down,
            "clients": len(updates) if secure is None else secure.clients,
            "sampled": len(chosen),
            "refused": len(replies.refused),
            "rejected": len(replies.rejected),
        }
        if secure is not None and secure.suspects:
            record["secagg_suspects"] = secure.suspects
        for key in SUMMED_CLIENT_METRICS:  # split learning: pruning and wire traffic
            values = [float(u.metrics[key]) for u in updates if key in u.metrics]
            if values:
                record[key] = sum(values)
        if spent:
            record["epsilon_level"] = "sample"
            record["epsilon_covers"] = EPSILON_COVERS
            record["epsilon_clients"] = {str(k): v for k, v in sorted(spent.items())}
        if not updates and replies.refused and len(exhausted) == cfg.federation.num_clients:
            logger.warning("round %d: every client has spent its privacy budget; stopping", rnd)
            writer.write(
                **{
                    **record,
                    **_metric_fields(last),
                    "epsilon": max(eps, default=None),
                    "stopped": "every client has spent its privacy budget",
                    "wall_s": time.monotonic() - t_round,
                }
            )
            break
        if record["clients"] < min_replies or (secure is not None and secure.result is None):
            logger.error(
                "round %d: %d replies (federation.min_replies=%d)%s; model unchanged",
                rnd,
                record["clients"],
                min_replies,
                "" if secure is None else f", secure aggregation: {secure.failed}",
            )
            writer.write(
                **{
                    **record,
                    **_metric_fields(last),
                    "epsilon": max(eps, default=None),
                    "failed": True,
                    "wall_s": time.monotonic() - t_round,
                }
            )
            continue
        if secure is None:
            result = coord.aggregate(updates)
        else:  # a failed secure round (result None) was written as failed above
            assert secure.result is not None
            result = coord.apply(secure.result)
        if "epsilon_user" in result.metrics:
            eps = [float(result.metrics["epsilon_user"])]
            record["epsilon_level"] = "user"
            record["epsilon_covers"] = EPSILON_COVERS
        last = evaluate_global(
            runtime,
            adapters=coord.global_adapters,
            base_delta=coord.dense_base_delta(),
            extras=coord.extras,
            **eval_kw,
        )
        train_loss = [float(u.metrics["train_loss"]) for u in updates if "train_loss" in u.metrics]
        train_loss += [] if secure is None else secure.train_loss
        row = {
            **record,
            **_metric_fields(last),
            "epsilon": max(eps, default=None),
            "train_loss": sum(train_loss) / len(train_loss) if train_loss else None,
            **{f"agg_{k}": v for k, v in result.metrics.items()},
            "wall_s": time.monotonic() - t_round,
        }
        # checkpoint first (it carries the row): a kill between the two loses no line on resume
        save_checkpoint(
            ckpt_dir,
            {
                "round": rnd,
                "coordinator": coord.state_dict(),
                "config": cfg.to_dict(),
                "accountants": {str(k): v for k, v in accountants.items()},
                "exhausted": sorted(exhausted),
                "spent": {str(k): v for k, v in spent.items()},
                "row": json.dumps(row, default=str),
            },
        )
        writer.write(**row)
        bar.set_postfix(acc=f"{last['accuracy']:.3f}", loss=f"{last['loss']:.3f}")
    final = _finish(cfg, out, runtime, coord, before, last, t_start)
    return final


#: what a run writes into its output folder (a fresh run sets an earlier run's aside)
RUN_OUTPUTS = ("metrics.jsonl", "summary.json", "report.html", "adapter", "checkpoint")


def _set_aside_previous_run(out: Path) -> None:
    """Move an earlier run's outputs to ``OUT/previous/<time>/``: a fresh run loses nothing."""
    found = [p for p in out.iterdir() if p.name in RUN_OUTPUTS or p.name.startswith("plot_")]
    if not found:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = out / "previous" / stamp
    target.mkdir(parents=True, exist_ok=True)
    for p in found:
        os.replace(p, target / p.name)
    logger.warning("%s held an earlier run; moved its outputs to %s", out, target)


def _reconcile_metrics(out: Path, *, round_: int, row: str | None) -> None:
    """Make metrics.jsonl end exactly at the checkpoint's round before resuming.

    Lines of rounds after the checkpoint (written by a run killed later) are dropped; the
    checkpoint's own line is restored from the checkpoint if the kill came before it.
    """
    path = out / "metrics.jsonl"
    rows = [r for r in read_metrics(out) if int(r["round"]) <= round_] if path.exists() else []
    if row and all(int(r["round"]) != round_ for r in rows):
        rows.append(json.loads(row))
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _frozen_id(adapters: Mapping[str, LoraFactors]) -> str:
    """A fingerprint of the shared frozen factors (SHA-256 of their bytes)."""
    digest = hashlib.sha256()
    for name in sorted(adapters):
        f = adapters[name]
        digest.update(name.encode())
        for t in (f.a, f.b):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def _metric_fields(ev: Mapping[str, float]) -> dict[str, Any]:
    return {k: float(v) for k, v in ev.items()}


@dataclass
class RoundReplies:
    """What came back in one round."""

    updates: list[ClientUpdate] = field(default_factory=list)
    bytes_up: int = 0
    #: client index -> ε spent so far (sample-level DP)
    epsilon: dict[int, float] = field(default_factory=dict)
    #: client index -> its accountant state (JSON), mirrored into the checkpoint
    accountants: dict[int, str] = field(default_factory=dict)
    #: clients that refused to train because their budget is spent
    refused: list[int] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)
    #: clients whose reply was an error (crashed, could not decode the start, ...)
    errored: list[int] = field(default_factory=list)


def _collect(
    grid: Grid,
    messages: list[Message],
    timeout: float | None,
    starts: Mapping[int, ClientStart],
    nodes: Mapping[int, int],
    parts_up: Literal["ab", "b", "r"],
    rnd: int,
    *,
    extras: Mapping[str, Any],
    max_norm: float | None,
    max_examples: int,
) -> RoundReplies:
    """Send, wait, decode and validate: the updates that arrived in time and are sound."""
    index_of = {nid: idx for idx, nid in nodes.items()}
    out = RoundReplies()
    got: dict[int, ClientUpdate] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
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
        tag = reply.content.get(serde.ROUND_RECORD)
        if not isinstance(tag, ConfigRecord) or tag.get("round") != rnd:
            stale = None if not isinstance(tag, ConfigRecord) else tag.get("round")
            logger.warning(
                "round %d: dropping a reply of client %d trained for round %r (stale or replayed)",
                rnd,
                idx,
                stale,
            )
            out.rejected.append((idx, f"reply for round {stale!r}, not {rnd}"))
            continue
        privacy = reply.content.get(serde.PRIVACY_RECORD)
        if privacy is not None:
            checked = (
                parse_privacy_record(privacy)
                if isinstance(privacy, ConfigRecord)
                else "privacy record is not a ConfigRecord"
            )
            if isinstance(checked, str):
                logger.warning("round %d: rejected reply of client %d: %s", rnd, idx, checked)
                out.rejected.append((idx, checked))
                continue
            out.accountants[idx] = checked.accountant
            if checked.refused:
                logger.warning("round %d: client %d stopped: %s", rnd, idx, checked.message)
                out.refused.append(idx)
                continue
        try:
            update = serde.update_from_recorddict(
                reply.content,
                client_id=str(idx),
                parts=parts_up,
                reference=starts[idx].adapters,
            )
        except ValueError as exc:
            logger.warning("round %d: rejected update of client %d: %s", rnd, idx, exc)
            out.rejected.append((idx, str(exc)))
            continue
        problems = validate_update(
            update,
            expected=starts[idx].adapters,
            parts=parts_up,
            extras_expected=extras,
            max_norm=max_norm,
            max_examples=max_examples,
        )
        if problems:
            logger.warning(
                "round %d: rejected update of client %d: %s", rnd, idx, "; ".join(problems)
            )
            out.rejected.append((idx, "; ".join(problems)))
            continue
        if "epsilon" in update.metrics:
            bad_eps = check_epsilon(update.metrics["epsilon"])
            if bad_eps is not None:
                logger.warning("round %d: rejected update of client %d: %s", rnd, idx, bad_eps)
                out.rejected.append((idx, bad_eps))
                continue
            out.epsilon[idx] = float(update.metrics["epsilon"])
        got[idx] = update
    out.updates = [got[i] for i in sorted(got)]
    return out


def _finish(
    cfg: RunConfig,
    out: Path,
    runtime: Runtime,
    coord: Coordinator,
    before: Mapping[str, float],
    last: Mapping[str, float],
    t_start: float,
) -> dict[str, Any]:
    total = effective_delta(
        AggregationResult(adapters=coord.global_adapters, base_delta=coord.base_factors)
    )
    if PROMPT in coord.extras:
        peft_io.save_prompt_adapter(
            out / "adapter",
            base_model=runtime.model,
            base_model_source=cfg.model.name,
            prompt=coord.extras[PROMPT],
            extras={k: v for k, v in coord.extras.items() if k != PROMPT},
            task=cfg.model.task,
        )
    else:
        peft_io.save_peft_adapter(
            out / "adapter",
            base_model_source=cfg.model.name,
            deltas=total,
            extras=coord.extras,
            task=cfg.model.task,
            target_modules=runtime.target_modules,
        )
    rows = read_metrics(out)
    eps = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
    final = {
        "rounds": coord.round,
        "before": dict(before),
        "after": dict(last),
        "bytes_up": sum(int(r["bytes_up"]) for r in rows),
        "bytes_down": sum(int(r["bytes_down"]) for r in rows),
        "epsilon": max(eps) if eps else None,
        "failed_rounds": sum(1 for r in rows if r.get("failed")),
        "wall_s": time.monotonic() - t_start,
    }
    partition = get_data(**builders.data_kwargs(cfg)).summary.to_dict()  # memoised
    write_summary(out, final=final, config=cfg.to_dict(), partition=partition)
    write_report(out, title=f"fedft run {cfg.name!r}")
    logger.info("final %s", final)
    return final


def client_info(client_index: int) -> RecordDict:
    """The reply to the discovery query."""
    return RecordDict({"info": ConfigRecord({"client_index": client_index})})
