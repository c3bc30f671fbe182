"""The Flower ClientApp: decode the server's start, train one local round, send the update.

The base model and the client's encoded data are cached per worker process
(``fedft.training.runtime``) and reused across the virtual clients the worker serves.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Literal

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from client.deploy import ACCOUNTANT_KEY, DELTA_KEY, EPSILON_KEY, LEDGER_KEY
from client.split_round import client_tls_from_node_config, run_split_round
from fedft import builders
from fedft.aggregation import AGGREGATORS
from fedft.config import RunConfig
from fedft.data import Records, load_records
from fedft.privacy import train_private
from fedft.privacy.client import NodePolicy, RoundPrivacy, node_refusal, prepare_round
from fedft.privacy.client_ledger import ClientLedger, read_ledger, write_ledger
from fedft.privacy.release import released_metrics, released_num_examples
from fedft.split.dp import SplitPrivacy
from fedft.training.coordinator import ClientStart
from fedft.training.local import resolve_device
from fedft.training.runtime import (
    get_data,
    get_encoded,
    get_runtime,
    run_lora_round,
    run_prompt_round,
)
from fedft.transport import serde
from fedft.transport.flower_config import read_run_config
from fedft.types import LoraFactors

logger = logging.getLogger(__name__)


def client_index(context: Context) -> int:
    """This node's client index: ``partition-id`` in its node config."""
    try:
        return int(context.node_config["partition-id"])
    except KeyError as exc:
        raise RuntimeError(
            "the node config has no 'partition-id'; start the client with "
            "`fedft client --partition N` (or set node-config partition-id=N)"
        ) from exc


def train_round(cfg: RunConfig, content: RecordDict, context: Context) -> RecordDict:
    """One local round for this node, from the server's message content to the reply."""
    frozen = _cached_frozen(context, content)
    try:
        adapters, base_delta, extras, conf = serde.start_from_recorddict(content, reference=frozen)
    except serde.SerdeError as exc:
        raise RuntimeError(
            f"cannot rebuild the shared frozen factors ({exc}); the server resends them in full"
        ) from exc
    _cache_frozen(context, content, adapters)
    idx = client_index(context)
    if int(conf["client_index"]) != idx:
        raise RuntimeError(f"message for client {conf['client_index']} reached client {idx}")
    fed = get_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(
        **builders.runtime_kwargs(cfg, num_labels=fed.num_labels),
        device=resolve_device(cfg.federation.device),
    )
    data_key = tuple(sorted(builders.data_kwargs(cfg).items()))
    own_path = str(context.node_config.get("data-path", ""))  # an edge client's own file
    data = get_encoded(
        ("client", idx, own_path, cfg.model.name, cfg.data.max_length, data_key),
        (lambda: _own_records(cfg, own_path, fed.label_names))
        if own_path
        else (lambda: fed.clients[idx]),
        runtime.tokenizer,
        task=cfg.model.task,
        max_length=cfg.data.max_length,
    )
    trainable = AGGREGATORS[cfg.aggregation.algorithm].trainable
    start = ClientStart(
        adapters=adapters, base_delta=base_delta, extras=extras, rank=int(conf["rank"])
    )
    private_train = None
    privacy: RoundPrivacy | None = None
    policy = node_policy(context)
    refusal = node_refusal(
        policy, mode=cfg.privacy.mode, delta=cfg.privacy.delta, accountant=cfg.privacy.accountant
    )
    if refusal is not None:
        return _refuse(idx, int(conf["round"]), refusal)
    if cfg.privacy.mode == "sample":
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
            ledger=_load_ledger(context),  # the client's own; never the server's word
        )
        if not privacy.decision.allowed:
            return _refuse(idx, int(conf["round"]), privacy.decision.message)
        # write-ahead: the round's steps are on this client's disk before it trains, so a
        # crash (of this client or of the server) cannot make it forget them
        _store_ledger(context, privacy.spent_if_run(builders.steps_per_round(cfg)))
        rp = privacy

        def private_train(model: Any) -> dict[str, float]:
            return train_private(
                model,
                data,
                steps=cfg.federation.local_steps,
                batch_size=cfg.federation.batch_size,
                lr=cfg.federation.lr,
                noise_multiplier=rp.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                accountant=rp.accountant,
                seed=None,  # fresh OS randomness: a known seed would let anyone remove noise
                device=runtime.device,
                delta=dp.delta,
                epsilon_budget=dp.epsilon,
                optimizer="adamw",
            )

    common: dict[str, Any] = {
        "client_id": str(idx),
        "start": start,
        "data": data,
        "steps": cfg.federation.local_steps,
        "batch_size": cfg.federation.batch_size,
        "lr": cfg.federation.lr,
        "seed": int(conf["seed"]),
        "private_train": private_train,
    }
    if cfg.adapter.method == "prompt":
        update = run_prompt_round(runtime, **common)
    elif cfg.adapter.method == "split":
        if not cfg.split.server:
            raise RuntimeError("split.server is empty: set it to the split server's host:port")
        update = run_split_round(
            runtime,
            client_id=str(idx),
            start=start,
            data=data,
            server_address=cfg.split.server,
            model_id=cfg.model.name,
            front_layers=cfg.split.front_layers,
            back_layers=cfg.split.back_layers,
            wire_dtype=cfg.split.wire_dtype,
            in_flight=cfg.split.micro_batches_in_flight,
            local_loss_steps=cfg.split.local_loss_steps,
            keep_fraction=cfg.split.keep_fraction,
            steps=cfg.federation.local_steps,
            batch_size=cfg.federation.batch_size,
            lr=cfg.federation.lr,
            seed=int(conf["seed"]),
            tls=client_tls_from_node_config(context.node_config),  # split mTLS (deployment)
            dp=None
            if privacy is None
            else SplitPrivacy(
                noise_multiplier=privacy.noise_multiplier,
                max_grad_norm=dp.max_grad_norm,
                accountant=privacy.accountant,
                delta=dp.delta,
                epsilon_budget=dp.epsilon,
                seed=None,  # fresh OS randomness: a known seed would let anyone remove noise
            ),
        )
    else:
        update = run_lora_round(
            runtime,
            trainable=trainable,
            alpha=cfg.adapter.alpha,
            dropout=cfg.adapter.dropout,
            **common,
        )
    if privacy is not None:
        eps = privacy.accountant.epsilon(cfg.privacy.delta)
        update = dataclasses.replace(update, metrics={**update.metrics, "epsilon": eps})
    mode = cfg.privacy.mode  # under DP only what the mechanism covers leaves this client
    update = dataclasses.replace(
        update,
        metrics=released_metrics(update.metrics, mode=mode),
        num_examples=released_num_examples(update.num_examples, mode=mode),
    )
    content = serde.update_to_recorddict(update, parts=trainable)
    content[serde.ROUND_RECORD] = ConfigRecord({"round": int(conf["round"])})  # replay check
    if privacy is not None:
        content[serde.PRIVACY_RECORD] = ConfigRecord({"refused": False})
    return content


def _refuse(idx: int, rnd: int, message: str) -> RecordDict:
    """The reply of a client that will not train this round (and says why)."""
    logger.warning("client %d refuses round %d: %s", idx, rnd, message)
    return RecordDict(
        {
            serde.PRIVACY_RECORD: ConfigRecord({"refused": True, "message": message}),
            serde.ROUND_RECORD: ConfigRecord({"round": rnd}),
        }
    )


_STATE_KEY = "fedft.ledger"


def _own_records(cfg: RunConfig, path: str, label_names: tuple[str, ...]) -> Records:
    """A deployed client's own CSV/JSONL (``fedft client --data PATH``).

    Its labels must be the run's: the server evaluates on the configured dataset's test set.
    """
    records = load_records(
        path,
        task=cfg.model.task,
        text_column=cfg.data.text_column,
        label_column=cfg.data.label_column,
    )
    if cfg.model.task == "classification" and label_names and records.label_names:
        unknown = sorted(set(records.label_names) - set(label_names))
        if unknown:
            raise ValueError(
                f"{path}: labels {unknown} are not among the run's labels {list(label_names)}"
            )
        index = {name: i for i, name in enumerate(label_names)}
        target = [index[records.label_names[int(t)]] for t in records.target]
        records = Records(
            text=records.text, target=target, group=records.group, label_names=label_names
        )
    return records


_FROZEN_KEY = "fedft.frozen"  # FFA's shared A / Fed-SB's shared B and A, sent once


def _frozen_id(content: RecordDict) -> str:
    record = content.get(serde.CONFIG)
    value = record.get("frozen_id", "") if isinstance(record, ConfigRecord) else ""
    return str(value)


def _cached_frozen(context: Context, content: RecordDict) -> dict[str, LoraFactors] | None:
    """The frozen factors this node already holds for the server's ``frozen_id``, if any."""
    fid = _frozen_id(content)
    meta = context.state.get(f"{_FROZEN_KEY}.meta")
    if not fid or not isinstance(meta, ConfigRecord) or meta.get("id") != fid:
        return None
    parts = str(meta["parts"])
    scalings = {k: float(v) for k, v in meta.items() if k not in ("id", "parts")}  # type: ignore[arg-type]
    record = context.state[_FROZEN_KEY]
    return serde.adapters_from_record(record, parts=parts, scalings=scalings)  # type: ignore[arg-type]


def _cache_frozen(context: Context, content: RecordDict, adapters: dict[str, LoraFactors]) -> None:
    """Keep the round's factors so the next rounds need only the trained part."""
    fid = _frozen_id(content)
    meta = context.state.get(f"{_FROZEN_KEY}.meta")
    if not fid or (isinstance(meta, ConfigRecord) and meta.get("id") == fid):
        return  # nothing frozen, or already held: the frozen factors never change
    parts: Literal["abr", "ab"] = "abr" if any(f.r is not None for f in adapters.values()) else "ab"
    context.state[_FROZEN_KEY] = serde.adapters_to_record(adapters, parts=parts)
    meta = serde.scalings_to_config(adapters)
    meta["id"] = fid
    meta["parts"] = parts
    context.state[f"{_FROZEN_KEY}.meta"] = meta


def node_policy(context: Context) -> NodePolicy | None:
    """The node's own budget and what it agrees to, from its node config (None: no budget)."""
    epsilon = float(context.node_config.get(EPSILON_KEY, 0.0))
    if epsilon <= 0:
        return None
    return NodePolicy(
        epsilon=epsilon,
        delta=float(context.node_config.get(DELTA_KEY, 1e-5)),
        accountant=str(context.node_config.get(ACCOUNTANT_KEY, "prv")),  # type: ignore[arg-type]
    )


def _ledger_path(context: Context) -> Path | None:
    path = str(context.node_config.get(LEDGER_KEY, ""))
    return Path(path) if path else None


def _load_ledger(context: Context) -> ClientLedger:
    """This client's ledger: its file when it has one (deployment), else its node state."""
    path = _ledger_path(context)
    if path is not None:
        return read_ledger(path)
    record = context.state.get(_STATE_KEY)
    return ClientLedger() if record is None else ClientLedger.from_json(str(record["json"]))  # type: ignore[index]


def _store_ledger(context: Context, ledger: ClientLedger) -> None:
    path = _ledger_path(context)
    if path is not None:
        write_ledger(path, ledger)  # refuses to forget: the new ledger must extend the file's
        return
    old = _load_ledger(context)
    if not ledger.extends(old):
        raise RuntimeError("refusing to replace the privacy ledger by one that forgets steps")
    context.state[_STATE_KEY] = ConfigRecord({"json": ledger.to_json()})


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """A ClientApp for ``cfg`` (or, deployed, the config in Flower's run config)."""
    app = ClientApp()

    def _config(context: Context) -> RunConfig:
        return cfg if cfg is not None else read_run_config(context.run_config)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        info: dict[str, Any] = {"client_index": client_index(context)}
        return Message(content=RecordDict({"info": ConfigRecord(info)}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content=train_round(_config(context), msg.content, context), reply_to=msg)

    @app.train("secagg")
    def secagg(msg: Message, context: Context) -> Message:
        from client.secure_round import handle

        return Message(content=handle(_config(context), msg.content, context), reply_to=msg)

    return app


app = make_client_app()
