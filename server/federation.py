"""A whole federated run on the server: build -> (resume) -> rounds -> final outputs.

:func:`run_federation` is the recipe the ServerApp runs: build the base model, the test set,
the aggregator and the coordinator (:func:`build`); resume from the checkpoint or write the
untuned model's round-0 line; find which node serves which client
(:func:`discover_clients`); run the rounds (``server.rounds.run_round``, one pipeline of
named steps); write the final adapter, summary and report (:func:`finish`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor
from tqdm.auto import tqdm

from fedft import builders
from fedft.adapters import peft_io
from fedft.adapters.math import effective_delta
from fedft.aggregation.base import Aggregator
from fedft.checkpoint import load_checkpoint
from fedft.config import RunConfig
from fedft.data import FederatedData
from fedft.data.datasets import Records
from fedft.data.encode import batches
from fedft.privacy.ledger import PrivacyLedger
from fedft.replies import bind_client_indices
from fedft.reporting.metrics import MetricsWriter, read_metrics, write_summary
from fedft.reporting.report import write_report
from fedft.split.partition import back_parameter_names
from fedft.training.coordinator import Coordinator
from fedft.training.local import resolve_device, weight_gradients
from fedft.training.runtime import (
    PROMPT,
    Runtime,
    get_data,
    get_encoded,
    get_runtime,
    initial_prompt,
)
from fedft.transport.records import claimed_index
from fedft.types import AggregationResult
from server.rounds import (
    Federation,
    Outcome,
    evaluate,
    excluded_from_state,
    frozen_fingerprint,
    metric_fields,
    run_round,
)

logger = logging.getLogger(__name__)


def back_extras(runtime: Runtime, *, back_layers: int) -> dict[str, Tensor]:
    """The client's back blocks (``split.train_back``) as extras: their base weights, which
    every client trains and the server averages by p_k like the head."""
    names = back_parameter_names(runtime.model, back_layers=back_layers)
    return peft_io.get_extras(runtime.model, names)


QUERY = "query"
"""Flower message type of the discovery query (client/app.py registers the action)."""

#: what a run writes into its output folder (a fresh run sets an earlier run's aside)
RUN_OUTPUTS = (
    "metrics.jsonl",
    "summary.json",
    "report.html",
    "adapter",
    "checkpoint",
    ".checkpoint.old",  # the previous checkpoint when a kill interrupted the last swap
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
    fed = build(grid, cfg, out)
    first_round = _resume(fed, out) + 1 if resume else 1
    tracking = builders.trackers(cfg, out)  # [tracking] report_to: every row as it is written
    fed.writer.on_row = tracking.log_round
    before = _round_zero(fed, out, resumed=resume)
    fed.nodes = discover_clients(
        grid,
        num_clients=cfg.federation.num_clients,
        timeout_s=cfg.federation.client_wait_s,
        bound=bound_nodes,
    )
    fed.frozen_id = frozen_fingerprint(fed.coord)
    for rnd in (bar := _rounds_bar(cfg, first_round, progress)):
        outcome = run_round(fed, rnd)
        if outcome is Outcome.STOP:
            break
        if outcome is Outcome.DONE:
            bar.set_postfix(acc=f"{fed.last['accuracy']:.3f}", loss=f"{fed.last['loss']:.3f}")
    final = finish(cfg, out, fed.runtime, fed.coord, before, fed.last, t_start)
    tracking.close(final)
    return final


def build(grid: Grid, cfg: RunConfig, out: Path) -> Federation:
    """The base model, the test set, the aggregator and the coordinator of a fresh run."""
    fed_data = get_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(
        **builders.runtime_kwargs(cfg, num_labels=fed_data.num_labels),
        device=resolve_device(cfg.federation.device),
    )
    enc_key = (
        cfg.model.name,
        cfg.data.max_length,
        tuple(sorted(builders.data_kwargs(cfg).items())),
    )

    def encoded(split: str, records: Callable[[], Any]) -> Any:
        return get_encoded(
            (split, *enc_key),
            records,
            runtime.tokenizer,
            task=cfg.model.task,
            max_length=cfg.data.max_length,
        )

    test = encoded("test", lambda: fed_data.test)
    aggregator = builders.build_aggregator(cfg)
    if cfg.aggregation.algorithm == "fedsb":
        _public_init(cfg, runtime, aggregator, encoded("public", lambda: fed_data.public))
    extras = dict(runtime.initial_extras)
    dense_only = cfg.adapter.method in ("prompt", "split")  # the prompt and head train
    if dense_only:
        extras[PROMPT] = initial_prompt(
            runtime, num_tokens=cfg.adapter.prompt_tokens, seed=cfg.seed
        )
    if cfg.adapter.method == "split" and cfg.split.train_back:
        extras.update(back_extras(runtime, back_layers=cfg.split.back_layers))
    coord = Coordinator(
        aggregator=aggregator,
        shapes={} if dense_only else runtime.shapes,
        rank_of=cfg.adapter.rank_of,
        alpha=cfg.adapter.alpha,
        extras=extras,
        seed=cfg.seed,
        max_rank=builders.max_rank(cfg),
        server_opt=builders.build_server_opt(cfg, aggregator),
    )
    return Federation(
        cfg=cfg,
        grid=grid,
        runtime=runtime,
        coord=coord,
        test=test,
        nodes={},
        ledger=PrivacyLedger(),
        # the largest FedAvg weight one client may claim (its n_k)
        max_examples=cfg.aggregation.max_examples or max(len(c) for c in fed_data.clients),
        writer=MetricsWriter(out),
        ckpt_dir=out / "checkpoint",
        last={},
    )


def _public_init(cfg: RunConfig, runtime: Runtime, aggregator: Aggregator, public: Any) -> None:
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
    aggregator.initialise_from_gradients(  # type: ignore[attr-defined]
        grads, rank=rank, lr=cfg.federation.lr, scaling=cfg.adapter.alpha / rank
    )


def _resume(fed: Federation, out: Path) -> int:
    """Restore the coordinator, the ledger and the excluded clients from the checkpoint;
    the round it holds."""
    state = load_checkpoint(fed.ckpt_dir)
    fed.coord.load_state_dict(state["coordinator"])
    fed.ledger.load_state_dict(state)
    fed.excluded = excluded_from_state(
        state.get("excluded"), num_clients=fed.cfg.federation.num_clients
    )
    if fed.excluded:
        logger.warning(
            "clients %s stay excluded (convicted before the resume)", sorted(fed.excluded)
        )
    done = int(state["round"])
    logger.info("resuming after round %d", done)
    _reconcile_metrics(out, round_=done, row=state.get("row"))
    fed.writer = MetricsWriter(out)  # after the reconcile: it knows the last round written
    return done


def _round_zero(fed: Federation, out: Path, *, resumed: bool) -> dict[str, float]:
    """Evaluate the global model before the (next) round; write the untuned model's line."""
    fed.last = evaluate(fed)
    before = dict(fed.last)
    if resumed:  # the untuned model's figures are in the first run's round-0 line
        first = [r for r in read_metrics(out) if int(r["round"]) == 0]
        if first:
            before = {k: float(first[0][k]) for k in before if first[0].get(k) is not None}
        return before
    fed.writer.write(
        **{
            "round": 0,
            **metric_fields(before),
            "bytes_up": 0,
            "bytes_down": 0,
            "epsilon": None,
            "clients": 0,
            "wall_s": 0.0,
        }
    )
    return before


def _rounds_bar(cfg: RunConfig, first_round: int, progress: bool) -> Any:
    """The rounds still to run, behind a progress bar."""
    return tqdm(
        range(first_round, cfg.federation.rounds + 1),
        desc=cfg.name,
        unit="round",
        disable=not progress,
        initial=first_round - 1,
        total=cfg.federation.rounds,
    )


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

    A node that does not answer is asked again until ``timeout_s``: after a crash the
    SuperLink still lists a killed client's node until its heartbeat expires, and the
    restarted client can connect only then (a resumed run must wait for it, not fail).
    """
    # with a binding, wait for the nodes bound to indices 0..n-1, not for any n nodes (an
    # extra registered node connecting early must not start discovery without them)
    needed = None if bound is None else {n for n, i in bound.items() if 0 <= i < num_clients}
    deadline = time.monotonic() + timeout_s
    claims: dict[int, object] = {}  # node id -> the index it declared
    while True:
        left = max(deadline - time.monotonic(), 0.0)
        node_ids = _wait_for_nodes(grid, num_clients=num_clients, timeout_s=left, needed=needed)
        claims.update(_query(grid, [n for n in node_ids if n not in claims], timeout_s=left))
        binding = bind_client_indices(list(claims.items()), num_clients=num_clients, bound=bound)
        missing = sorted(set(range(num_clients)) - set(binding.nodes))
        if not missing:
            break
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"no node serves client indices {missing} within {timeout_s:.0f} s; start "
                "those clients (fedft client --partition N) or lower federation.num_clients"
            )
        logger.info("client indices %s not served yet; asking again", missing)
        time.sleep(DISCOVERY_RETRY_S)
    for node, reason in binding.ignored:
        logger.warning("node %s: %s; ignored", node, reason)
    return binding.nodes


#: seconds between two discovery queries while some client index is not served.
DISCOVERY_RETRY_S = 2.0


def _query(grid: Grid, node_ids: list[int], *, timeout_s: float) -> dict[int, object]:
    """{node id: the index it declares} of the nodes that answered the discovery query."""
    if not node_ids:
        return {}
    messages = [
        Message(content=RecordDict(), dst_node_id=nid, message_type=QUERY) for nid in node_ids
    ]
    claims: dict[int, object] = {}
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        if reply.has_error():
            logger.warning(
                "node %s did not answer the query: %s", reply.metadata.src_node_id, reply.error
            )
            continue
        claims[reply.metadata.src_node_id] = claimed_index(reply.content)
    return claims


def _wait_for_nodes(
    grid: Grid, *, num_clients: int, timeout_s: float, needed: set[int] | None = None
) -> list[int]:
    """The connected nodes' ids, once ``num_clients`` are there, or, given ``needed``, once
    every node in it is (or raise after the timeout)."""

    def ready(ids: list[int]) -> bool:
        return len(ids) >= num_clients if needed is None else needed <= set(ids)

    deadline = time.monotonic() + timeout_s
    node_ids: list[int] = list(grid.get_node_ids())
    while not ready(node_ids) and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < num_clients:
        raise RuntimeError(
            f"only {len(node_ids)} of federation.num_clients={num_clients} clients connected "
            f"within {timeout_s:.0f} s; start more clients or lower federation.num_clients"
        )
    return node_ids


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


def finish(
    cfg: RunConfig,
    out: Path,
    runtime: Runtime,
    coord: Coordinator,
    before: Mapping[str, float],
    last: Mapping[str, float],
    t_start: float,
) -> dict[str, Any]:
    """Write the final adapter (PEFT's format), summary.json and the report; the summary."""
    _save_adapter(cfg, out, runtime, coord)
    rows = read_metrics(out)
    eps = [r["epsilon"] for r in rows if r.get("epsilon") is not None]
    final = {
        "rounds": coord.round,
        "before": dict(before),
        "after": dict(last),
        # null under user-level DP: the bytes count the (secret) cohorts
        "bytes_up": _total(rows, "bytes_up"),
        "bytes_down": _total(rows, "bytes_down"),
        "epsilon": max(eps) if eps else None,
        "failed_rounds": sum(1 for r in rows if r.get("failed")),
        "wall_s": time.monotonic() - t_start,
    }
    dx = [r["dx_epsilon"] for r in rows if r.get("dx_epsilon") is not None]
    if dx:  # split's d_χ ε, under its own name (never DP-SGD's epsilon)
        final["dx_epsilon"] = max(dx)
    fed = get_data(**builders.data_kwargs(cfg))  # memoised
    audit = _audit(cfg, fed, coord) if cfg.audit.enabled else None
    write_summary(
        out, final=final, config=cfg.to_dict(), partition=fed.summary.to_dict(), audit=audit
    )
    write_report(out, title=f"fedft run {cfg.name!r}")
    logger.info("final %s", final)
    return final


def _audit(cfg: RunConfig, fed: FederatedData, coord: Coordinator) -> dict[str, Any]:
    """``[audit]``: the attacks on this run's payloads (fedft.attacks.audit), timed."""
    from fedft.attacks.audit import audit_run, headline

    public = Records(  # text the server holds: the public and the test split
        text=fed.public.text + fed.test.text,
        target=[*fed.public.target, *fed.test.target],  # type: ignore[arg-type]
        group=fed.public.group + fed.test.group,
        label_names=fed.public.label_names,
    )
    audit = audit_run(
        cfg,
        victims=fed.clients[0],
        public=public,
        num_labels=fed.num_labels,
        prompt=coord.extras.get(PROMPT),
    )
    logger.info("audit: %s", headline(audit), extra={"console": True})
    return audit


def _save_adapter(cfg: RunConfig, out: Path, runtime: Runtime, coord: Coordinator) -> None:
    """The global model's trained part under ``out/adapter``, loadable with peft."""
    if PROMPT in coord.extras:
        peft_io.save_prompt_adapter(
            out / "adapter",
            base_model=runtime.model,
            base_model_source=cfg.model.name,
            prompt=coord.extras[PROMPT],
            extras={k: v for k, v in coord.extras.items() if k != PROMPT},
            task=cfg.model.task,
        )
        return
    total = effective_delta(
        AggregationResult(adapters=coord.global_adapters, base_delta=coord.base_factors)
    )
    peft_io.save_peft_adapter(
        out / "adapter",
        base_model_source=cfg.model.name,
        deltas=total,
        extras=coord.extras,
        task=cfg.model.task,
        target_modules=runtime.target_modules,
        fan_in_fan_out=runtime.fan_in_fan_out,
    )


def _total(rows: list[dict[str, Any]], key: str) -> int | None:
    """Σ ``key`` over the rounds, or None when a round's value is withheld (user-level DP)."""
    values = [r.get(key) for r in rows[1:]]
    if any(v is None for v in values):
        return None
    return sum(int(v) for v in values if v is not None)
