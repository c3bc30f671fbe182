"""One local round on a client: the server's start in, a typed :class:`RoundOutcome` out.

:func:`train_round` reads as the round does: decode the start (using the shared frozen
factors this node already holds) -> load the base model and this client's data (cached
per worker process, ``fedft.training.runtime``) -> refuse a run off the node's own terms
(:class:`fedft.privacy.client.NodePolicy`) -> under sample-level DP, read the client's own
ledger, refuse when the round would exceed its budget, write the round's steps ahead ->
train (LoRA, soft prompt, or split learning) -> release only what DP covers, report ε.
:func:`encode_reply` is the one place the outcome becomes a Flower reply; the plain round
(``client/app.py``) and the secure round (``client/secure_round.py``) both start from the
same outcome.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from flwr.app import ConfigRecord, Context, RecordDict
from torch import nn

from client.split_round import client_tls_from_node_config, run_split_round
from fedft import builders
from fedft.aggregation import AGGREGATORS
from fedft.builders import SampleDP
from fedft.config import RunConfig
from fedft.data import Records, load_records
from fedft.data.encode import Encoded
from fedft.privacy import train_private
from fedft.privacy.client import NodePolicy, RoundPrivacy, node_refusal, prepare_round
from fedft.privacy.client_ledger import ClientLedger, read_ledger, write_ledger
from fedft.privacy.release import released_metrics, released_num_examples
from fedft.replies import PrivacyReply
from fedft.split.dp import SplitPrivacy
from fedft.training.coordinator import ClientStart
from fedft.training.local import resolve_device
from fedft.training.runtime import (
    Runtime,
    get_data,
    get_encoded,
    get_runtime,
    run_lora_round,
    run_prompt_round,
)
from fedft.transport import records, serde
from fedft.types import ClientUpdate, LoraFactors

logger = logging.getLogger(__name__)

PrivateTrain = Callable[[nn.Module], dict[str, float]]

LEDGER_STATE = "fedft.ledger"
"""Key of this client's privacy ledger (JSON) in ``context.state`` (without a ledger file)."""
FROZEN_STATE = "fedft.frozen"
"""Key of the shared frozen factors (FFA's A, Fed-SB's B and A) in ``context.state``."""


@dataclass(frozen=True)
class RoundOutcome:
    """What one local round produced.

    Attributes:
        round: the round the server started.
        start: what the client started from (adapters, base delta, extras, rank).
        update: the trained update (only what DP releases), or None when the client
            refused (budget spent, or the run is off its node's terms).
        privacy: the client's privacy report (refused or not; never its ledger), None
            without sample-level DP and without a refusal.
    """

    round: int
    start: ClientStart
    update: ClientUpdate | None
    privacy: PrivacyReply | None = None


def client_index(context: Context) -> int:
    """This node's client index: ``partition-id`` in its node config."""
    try:
        return int(context.node_config[records.PARTITION_KEY])
    except KeyError as exc:
        raise RuntimeError(
            f"the node config has no {records.PARTITION_KEY!r}; start the client with "
            f"`fedft client --partition N` (or set node-config {records.PARTITION_KEY}=N)"
        ) from exc


def train_round(cfg: RunConfig, content: RecordDict, context: Context) -> RoundOutcome:
    """One local round for this node, from the server's start message to the outcome."""
    start, conf = receive_start(content, context)
    idx = client_index(context)
    if int(conf["client_index"]) != idx:
        raise RuntimeError(f"message for client {conf['client_index']} reached client {idx}")
    rnd = int(conf["round"])
    runtime, data = load(cfg, idx, context)
    policy = node_policy(context)
    p = cfg.privacy
    refusal = node_refusal(policy, mode=p.mode, delta=p.delta, accountant=p.accountant)
    if refusal is not None:
        return _refusal(idx, rnd, start, refusal)
    job = Training(cfg, runtime, idx, start, data, int(conf["seed"]), context.node_config)
    if p.mode != "sample":
        update = train(job)
        return RoundOutcome(round=rnd, start=start, update=_released(update, mode=p.mode))
    dp = builders.client_privacy(cfg, idx, node_epsilon=policy.epsilon if policy else 0.0)
    privacy = prepare_round(
        epsilon=dp.epsilon,
        delta=dp.delta,
        mechanism=dp.mechanism,  # type: ignore[arg-type]
        noise_multiplier=dp.noise_multiplier,
        planned_steps=dp.planned_steps,
        num_examples=len(data),
        batch_size=cfg.federation.batch_size,
        local_steps=builders.steps_per_round(cfg),
        ledger=load_ledger(context),  # the client's own; never the server's word
    )
    if not privacy.decision.allowed:
        return _refusal(idx, rnd, start, privacy.decision.message)
    # write-ahead: the round's steps are on this client's disk before it trains, so a
    # crash (of this client or of the server) cannot make it forget them
    store_ledger(context, privacy.spent_if_run(builders.steps_per_round(cfg)))
    update = train(dataclasses.replace(job, privacy=privacy, dp=dp))
    eps = privacy.accountant.epsilon(p.delta)
    update = dataclasses.replace(update, metrics={**update.metrics, "epsilon": eps})
    report = PrivacyReply(refused=False, message="")
    return RoundOutcome(
        round=rnd, start=start, update=_released(update, mode=p.mode), privacy=report
    )


def _refusal(idx: int, rnd: int, start: ClientStart, message: str) -> RoundOutcome:
    """The outcome of a client that will not train this round (and says why)."""
    logger.warning("client %d refuses round %d: %s", idx, rnd, message)
    report = PrivacyReply(refused=True, message=message)
    return RoundOutcome(round=rnd, start=start, update=None, privacy=report)


def _released(update: ClientUpdate, *, mode: str) -> ClientUpdate:
    """Under DP only what the mechanism covers leaves this client (metrics, counts)."""
    return dataclasses.replace(
        update,
        metrics=released_metrics(update.metrics, mode=mode),
        num_examples=released_num_examples(update.num_examples, mode=mode),
    )


def encode_reply(outcome: RoundOutcome, *, parts: serde.Parts) -> RecordDict:
    """The reply to the server: the update (or only the refusal), the round tag, privacy."""
    if outcome.update is None:
        assert outcome.privacy is not None  # only a client under DP refuses
        return RecordDict(
            {
                serde.PRIVACY_RECORD: records.privacy_to_record(outcome.privacy),
                serde.ROUND_RECORD: records.round_tag(outcome.round),
            }
        )
    content = serde.update_to_recorddict(outcome.update, parts=parts)
    content[serde.ROUND_RECORD] = records.round_tag(outcome.round)  # replay check
    if outcome.privacy is not None:
        content[serde.PRIVACY_RECORD] = records.privacy_to_record(outcome.privacy)
    return content


def receive_start(content: RecordDict, context: Context) -> tuple[ClientStart, dict[str, Any]]:
    """Decode the server's start (with the frozen factors this node holds): start, config."""
    frozen = _cached_frozen(context, content)
    try:
        adapters, base_delta, extras, conf = serde.start_from_recorddict(content, reference=frozen)
    except serde.SerdeError as exc:
        raise RuntimeError(
            f"cannot rebuild the shared frozen factors ({exc}); the server resends them in full"
        ) from exc
    _cache_frozen(context, content, adapters)
    start = ClientStart(
        adapters=adapters, base_delta=base_delta, extras=extras, rank=int(conf["rank"])
    )
    return start, conf


def load(cfg: RunConfig, idx: int, context: Context) -> tuple[Runtime, Encoded]:
    """The worker's base model and this client's encoded data (both cached per process)."""
    fed = get_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(
        **builders.runtime_kwargs(cfg, num_labels=fed.num_labels),
        device=resolve_device(cfg.federation.device),
    )
    data_key = tuple(sorted(builders.data_kwargs(cfg).items()))
    own_path = str(context.node_config.get(records.DATA_KEY, ""))  # an edge client's own file
    data = get_encoded(
        ("client", idx, own_path, cfg.model.name, cfg.data.max_length, data_key),
        (lambda: _own_records(cfg, own_path, fed.label_names))
        if own_path
        else (lambda: fed.clients[idx]),
        runtime.tokenizer,
        task=cfg.model.task,
        max_length=cfg.data.max_length,
    )
    return runtime, data


@dataclass(frozen=True)
class Training:
    """What one local round trains from.

    Attributes:
        cfg: the run's configuration.
        runtime: the worker's cached base model and tokenizer.
        idx: this client's index.
        start: the server's start (adapters, base delta, extras, rank).
        data: this client's encoded examples.
        seed: the round's seed (batch order; never DP noise).
        node_config: this node's Flower node config (split mTLS paths when deployed).
        privacy: sample-level DP: the round's noise and the client's accountant (else None).
        dp: sample-level DP: the client's budget and clip (else None).
    """

    cfg: RunConfig
    runtime: Runtime
    idx: int
    start: ClientStart
    data: Encoded
    seed: int
    node_config: Mapping[str, Any]
    privacy: RoundPrivacy | None = None
    dp: SampleDP | None = None


def train(job: Training) -> ClientUpdate:
    """Train this client's part (LoRA, soft prompt, or split learning) from ``job.start``.

    Under sample-level DP (``job.privacy`` and ``job.dp`` set) the training is DP-SGD with
    the client's own accountant, on both sides of the cut for split learning.
    """
    cfg = job.cfg
    if cfg.adapter.method == "split":
        return _train_split(job)
    f = cfg.federation
    common: dict[str, Any] = {"client_id": str(job.idx), "start": job.start, "data": job.data}
    common.update(steps=f.local_steps, batch_size=f.batch_size, lr=f.lr, seed=job.seed)
    common.update(private_train=_private_trainer(job))
    if cfg.adapter.method == "prompt":
        return run_prompt_round(job.runtime, **common)
    return run_lora_round(
        job.runtime,
        trainable=AGGREGATORS[cfg.aggregation.algorithm].trainable,
        alpha=cfg.adapter.alpha,
        dropout=cfg.adapter.dropout,
        **common,
    )


def _train_split(job: Training) -> ClientUpdate:
    """One split-learning round against the split server (SFPrompt), DP when asked."""
    cfg, privacy, dp = job.cfg, job.privacy, job.dp
    if not cfg.split.server:
        raise RuntimeError("split.server is empty: set it to the split server's host:port")
    s, f = cfg.split, cfg.federation
    split_dp = None
    if privacy is not None and dp is not None:
        split_dp = SplitPrivacy(
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            accountant=privacy.accountant,
            delta=dp.delta,
            epsilon_budget=dp.epsilon,
            seed=None,  # fresh OS randomness: a known seed would let anyone remove noise
        )
    return run_split_round(
        job.runtime,
        client_id=str(job.idx),
        start=job.start,
        data=job.data,
        steps=f.local_steps,
        batch_size=f.batch_size,
        lr=f.lr,
        seed=job.seed,
        server_address=s.server,
        model_id=cfg.model.name,
        front_layers=s.front_layers,
        back_layers=s.back_layers,
        wire_dtype=s.wire_dtype,
        in_flight=s.micro_batches_in_flight,
        local_loss_steps=s.local_loss_steps,
        keep_fraction=s.keep_fraction,
        tls=client_tls_from_node_config(job.node_config),  # split mTLS (deployment)
        dp=split_dp,
        dx_epsilon=s.dx_epsilon if s.privatize == "dx" else None,
        cut_noise_std=s.cut_noise_std,
    )


def _private_trainer(job: Training) -> PrivateTrain | None:
    """DP-SGD on the client's trainable parameters with its own accountant (None: no DP)."""
    privacy, dp, f = job.privacy, job.dp, job.cfg.federation
    if privacy is None or dp is None:
        return None

    def private_train(model: nn.Module) -> dict[str, float]:
        return train_private(
            model,
            job.data,
            steps=f.local_steps,
            batch_size=f.batch_size,
            lr=f.lr,
            noise_multiplier=privacy.noise_multiplier,
            max_grad_norm=dp.max_grad_norm,
            accountant=privacy.accountant,
            seed=None,  # fresh OS randomness: a known seed would let anyone remove noise
            device=job.runtime.device,
            delta=dp.delta,
            epsilon_budget=dp.epsilon,
            optimizer="adamw",
        )

    return private_train


def _own_records(cfg: RunConfig, path: str, label_names: tuple[str, ...]) -> Records:
    """A deployed client's own CSV/JSONL (``fedft client --data PATH``).

    Its labels must be the run's: the server evaluates on the configured dataset's test set.
    """
    recs = load_records(
        path,
        task=cfg.model.task,
        text_column=cfg.data.text_column,
        label_column=cfg.data.label_column,
    )
    if cfg.model.task == "classification" and label_names and recs.label_names:
        unknown = sorted(set(recs.label_names) - set(label_names))
        if unknown:
            raise ValueError(
                f"{path}: labels {unknown} are not among the run's labels {list(label_names)}"
            )
        index = {name: i for i, name in enumerate(label_names)}
        target = [index[recs.label_names[int(t)]] for t in recs.target]
        recs = Records(text=recs.text, target=target, group=recs.group, label_names=label_names)
    return recs


def _frozen_id(content: RecordDict) -> str:
    record = content.get(serde.CONFIG)
    value = record.get("frozen_id", "") if isinstance(record, ConfigRecord) else ""
    return str(value)


def _cached_frozen(context: Context, content: RecordDict) -> dict[str, LoraFactors] | None:
    """The frozen factors this node already holds for the server's ``frozen_id``, if any."""
    fid = _frozen_id(content)
    meta = context.state.get(f"{FROZEN_STATE}.meta")
    if not fid or not isinstance(meta, ConfigRecord) or meta.get("id") != fid:
        return None
    parts = str(meta["parts"])
    scalings = {k: float(v) for k, v in meta.items() if k not in ("id", "parts")}  # type: ignore[arg-type]
    record = context.state[FROZEN_STATE]
    return serde.adapters_from_record(record, parts=parts, scalings=scalings)  # type: ignore[arg-type]


def _cache_frozen(context: Context, content: RecordDict, adapters: dict[str, LoraFactors]) -> None:
    """Keep the round's factors so the next rounds need only the trained part."""
    fid = _frozen_id(content)
    meta = context.state.get(f"{FROZEN_STATE}.meta")
    if not fid or (isinstance(meta, ConfigRecord) and meta.get("id") == fid):
        return  # nothing frozen, or already held: the frozen factors never change
    parts: Literal["abr", "ab"] = "abr" if any(f.r is not None for f in adapters.values()) else "ab"
    context.state[FROZEN_STATE] = serde.adapters_to_record(adapters, parts=parts)
    meta = serde.scalings_to_config(adapters)
    meta["id"] = fid
    meta["parts"] = parts
    context.state[f"{FROZEN_STATE}.meta"] = meta


def node_policy(context: Context) -> NodePolicy | None:
    """The node's own budget and what it agrees to, from its node config (None: no budget)."""
    epsilon = float(context.node_config.get(records.EPSILON_KEY, 0.0))
    if epsilon <= 0:
        return None
    return NodePolicy(
        epsilon=epsilon,
        delta=float(context.node_config.get(records.DELTA_KEY, 1e-5)),
        accountant=str(context.node_config.get(records.ACCOUNTANT_KEY, "prv")),  # type: ignore[arg-type]
    )


def _ledger_path(context: Context) -> Path | None:
    path = str(context.node_config.get(records.LEDGER_KEY, ""))
    return Path(path) if path else None


def load_ledger(context: Context) -> ClientLedger:
    """This client's ledger: its file when it has one (deployment), else its node state."""
    path = _ledger_path(context)
    if path is not None:
        return read_ledger(path)
    record = context.state.get(LEDGER_STATE)
    return ClientLedger() if record is None else ClientLedger.from_json(str(record["json"]))  # type: ignore[index]


def store_ledger(context: Context, ledger: ClientLedger) -> None:
    """Keep ``ledger`` (it must extend the stored one: a ledger never forgets steps)."""
    path = _ledger_path(context)
    if path is not None:
        write_ledger(path, ledger)  # refuses to forget: the new ledger must extend the file's
        return
    old = load_ledger(context)
    if not ledger.extends(old):
        raise RuntimeError("refusing to replace the privacy ledger by one that forgets steps")
    context.state[LEDGER_STATE] = ConfigRecord({"json": ledger.to_json()})
