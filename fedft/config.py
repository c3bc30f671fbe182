"""The run configuration: frozen, typed, validated when built (pydantic).

This is the one place that parses config files. A TOML file plus ``--set dotted.key=value``
overrides become a :class:`RunConfig`; any unknown key, wrong type or impossible value raises
:class:`ConfigError` naming the exact key path, the value and what is allowed, before any work
starts. Every problem in the input is reported, one per line.

The sections are pydantic dataclasses: real ``dataclasses`` (frozen, keyword-only, usable with
``dataclasses.replace`` / ``asdict``) whose fields pydantic validates from their annotations
and ``Field`` constraints; rules between fields live in ``__post_init__`` and raise
:class:`Refusal`. The same field definitions give the JSON schema (:func:`json_schema`,
``fedft config schema``) and the documented TOML block in the README
(:func:`defaults_toml`, ``fedft config defaults``).

Nothing below the builders receives a config object: see ``fedft/builders.py``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

ALGORITHMS = ("fedit", "flora", "fedsb", "lora_fair", "hetlora", "ffa", "fedex")
#: aggregators whose result is a p_k-weighted mean of what clients upload (user-level DP and
#: secure aggregation need this).
LINEAR_ALGORITHMS = ("fedit", "fedsb", "ffa")
#: aggregators that accept clients of different ranks.
MIXED_RANK_ALGORITHMS = ("flora", "hetlora")
#: aggregators a server optimizer (aggregation.server_opt) is defined for.
SERVER_OPT_ALGORITHMS = ("fedit", "ffa", "fedsb")
#: why it is not defined for the others (docs/algorithms.md, Server optimizer).
SERVER_OPT_UNDEFINED = {
    "flora": "FLoRA folds each round's update into the frozen base and clients restart "
    "from a fresh LoRA, so there are no global adapters to take a step on",
    "fedex": "FedEx-LoRA folds the residual of each round into the frozen base, which has no "
    "optimizer state; a step on the adapters alone would move the two parts by different rules",
    "lora_fair": "LoRA-FAIR fits its correction of B to the product B A; moving A and B by "
    "momentum afterwards undoes that fit",
    "hetlora": "clients of rank r train only the first r components and the average mixes "
    "rescaled, zero-padded factors, so one coordinate's pseudo-gradient has no single meaning",
}

# Strict scalars: TOML/JSON types are taken as they are (no "5" -> 5, no 2.0 -> 2, no
# true -> 1); an integer is accepted where a number is expected.
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]
Str = Annotated[str, Strict()]
Bool = Annotated[bool, Strict()]

_SECTION = ConfigDict(extra="forbid")


class ConfigError(ValueError):
    """A bad configuration: the message names the key, the value and what is allowed."""


class Refusal(ValueError):
    """A rule between fields failed: ``key`` (relative to the section), value, what is allowed.

    Raised inside ``__post_init__``; :func:`build_config` prefixes the section's path.
    """

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key} = {value!r} is not allowed: {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class ModelConfig:
    """Which pretrained model, for which task."""

    name: Str = Field(
        default="minilm", description='"minilm" | "smollm2-135m" | a local folder | a hub id'
    )
    task: Literal["classification", "causal_lm"] = Field(
        default="classification", description="sequence classification or instruction tuning"
    )
    target_modules: list[Str] = Field(
        default_factory=list,
        description="module names (suffixes) that get adapters; [] = the model family's "
        "default (query/value for BERT, q_proj/v_proj for Llama)",
    )
    load_in_4bit: Bool = Field(
        default=False,
        description="QLoRA: frozen base weights in 4 bits (NF4, bitsandbytes); adapters fp32",
    )

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise Refusal("name", self.name, "a non-empty model name or path")


#: how fedft itself splits examples over clients (``fedft.data.partition``).
OwnPartition = Literal["iid", "dirichlet", "natural"]
#: Flower Datasets' partitioners fedft runs under their own names
#: (``fedft.data.flower_partition``).
LibraryPartition = Literal[
    "pathological",
    "shard",
    "inner_dirichlet",
    "linear",
    "square",
    "exponential",
    "size",
    "natural_id",
    "grouped_natural",
]
#: every ``data.partition`` name: the one definition the data modules derive theirs from.
PartitionMethod = Literal[OwnPartition, LibraryPartition]


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class DataConfig:
    """Dataset, partitioning and tokenisation."""

    dataset: Str = Field(
        default="rotten_tomatoes",
        description='"rotten_tomatoes" | "chatterbot" | a local .csv/.jsonl file',
    )
    partition: PartitionMethod = Field(
        default="dirichlet",
        description="how training examples are split over clients: iid, dirichlet (label "
        "skew), natural (whole groups: movie / category) are fedft's; the others are Flower "
        "Datasets' partitioners of the same name (docs/partitioners.md)",
    )
    alpha: Float = Field(
        default=0.5, gt=0, description="Dirichlet concentration (smaller = more label skew)"
    )
    max_length: Int = Field(default=64, ge=8, le=4096, description="tokens per example")
    test_size: Int = Field(
        default=500, ge=1, description="held-out global test examples (never seen by a client)"
    )
    public_size: Int = Field(
        default=64, ge=0, description="the server's public examples (Fed-SB init); in no client"
    )
    max_train_examples: Int = Field(
        default=0, ge=0, description="cap on all clients' training examples together (0 = all)"
    )
    text_column: Str = Field(default="text", description="text column of a local file")
    label_column: Str = Field(
        default="label", description="label (or, for causal_lm, answer) column of a local file"
    )
    classes_per_client: Int = Field(
        default=2, ge=1, description='partition = "pathological": labels per client'
    )
    class_assignment: Literal["random", "deterministic", "first-deterministic"] = Field(
        default="random", description='partition = "pathological": how labels go to clients'
    )
    shards_per_client: Int = Field(
        default=2,
        ge=0,
        description='partition = "shard": shards per client (0 = from shard_size)',
    )
    shard_size: Int = Field(
        default=0,
        ge=0,
        description='partition = "shard": examples per shard (0 = from shards_per_client)',
    )
    partition_sizes: list[Annotated[int, Strict(), Field(ge=1)]] = Field(
        default_factory=list,
        description='partition = "size" / "inner_dirichlet": examples per client, one per '
        "client ([] = equal sizes)",
    )
    group_size: Int = Field(
        default=2, ge=1, description='partition = "grouped_natural": groups per client'
    )
    group_mode: Literal["allow-smaller", "allow-bigger", "drop-reminder", "strict"] = Field(
        default="allow-smaller",
        description='partition = "grouped_natural": what happens to the groups left over',
    )

    def __post_init__(self) -> None:
        if self.shards_per_client == 0 and self.shard_size == 0:
            raise Refusal(
                "shards_per_client",
                0,
                "a number of shards per client >= 1, or a data.shard_size >= 1 to derive it",
            )


def _is_ray_address(value: str) -> bool:
    """Empty, "auto", or HOST:PORT (a bracketed IPv6 host allowed), port in 1..65535."""
    if value in ("", "auto"):
        return True
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536) and not any(
        c in host for c in "/ []"
    )


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class FederationConfig:
    """Rounds, clients and local training knobs."""

    num_clients: Int = Field(default=10, ge=1, description="clients holding data")
    clients_per_round: Int = Field(default=5, ge=1, description="clients sampled each round")
    rounds: Int = Field(default=5, ge=1, description="federated rounds")
    local_steps: Int = Field(default=20, ge=1, description="optimiser steps per client per round")
    batch_size: Int = Field(default=16, ge=1, description="training batch (examples)")
    eval_batch_size: Int = Field(default=64, ge=1, description="evaluation batch (examples)")
    lr: Float = Field(default=5e-4, gt=0, lt=10, description="client learning rate")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto = CUDA when present, else CPU"
    )
    gpus_per_client: Float = Field(
        default=0.0, ge=0, le=1, description="simulation: fraction of a GPU per virtual client"
    )
    cpus_per_client: Int = Field(
        default=1, ge=1, description="simulation: whole CPUs per virtual client"
    )
    ray_address: Str = Field(
        default="",
        description="simulation: HOST:PORT of an existing Ray cluster (`ray start --head`) "
        'that runs the virtual clients; "auto" = the cluster this machine joined; '
        '"" = a Ray instance of the run\'s own (fedft simulate --ray-address)',
    )
    min_replies: Int = Field(
        default=0,
        ge=0,
        description="fewest replies a round needs; fewer and the round fails, the model "
        "unchanged (0 = 1)",
    )
    round_timeout_s: Float = Field(
        default=0.0, ge=0, description="seconds to wait for replies in a round (0 = no limit)"
    )
    client_wait_s: Float = Field(
        default=600.0,
        gt=0,
        description="deployment: seconds the server waits for num_clients clients to connect "
        "before the run fails (fedft server --wait-clients)",
    )

    def __post_init__(self) -> None:
        if self.clients_per_round > self.num_clients:
            raise Refusal(
                "clients_per_round",
                self.clients_per_round,
                f"at most federation.num_clients ({self.num_clients})",
            )
        if self.min_replies > self.clients_per_round:
            raise Refusal(
                "min_replies",
                self.min_replies,
                f"0..federation.clients_per_round ({self.clients_per_round})",
            )
        if not _is_ray_address(self.ray_address):
            raise Refusal(
                "ray_address",
                self.ray_address,
                'HOST:PORT of a Ray head (e.g. "10.0.0.5:6379", what `ray start --head` '
                'prints), "auto", or "" for a Ray instance of the run\'s own',
            )


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class AdapterConfig:
    """What clients train: LoRA (one rank or per-client ranks), soft prompts, or split."""

    method: Literal["lora", "prompt", "split"] = Field(
        default="lora", description="LoRA adapters, soft prompts, or split learning"
    )
    rank: Int = Field(default=8, ge=1, description="LoRA rank of every client")
    ranks: list[Annotated[int, Strict(), Field(ge=1)]] = Field(
        default_factory=list,
        description="per-client ranks, e.g. [16, 8, 4], assigned to clients in turn "
        "(overrides rank)",
    )
    alpha: Float = Field(default=16.0, gt=0, description="LoRA scaling = alpha / rank")
    dropout: Float = Field(default=0.0, ge=0, lt=1, description="LoRA dropout")
    prompt_tokens: Int = Field(
        default=8, ge=1, description="soft prompt length (method = prompt, and prompts in split)"
    )

    def rank_of(self, client_index: int) -> int:
        """The rank client ``client_index`` trains at."""
        return self.ranks[client_index % len(self.ranks)] if self.ranks else self.rank


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class AggregationConfig:
    """Server-side aggregation and its options."""

    algorithm: Literal["fedit", "flora", "fedsb", "lora_fair", "hetlora", "ffa", "fedex"] = Field(
        default="fedit", description="how the server combines client adapters"
    )
    fair_lambda: Float = Field(
        default=0.01, ge=0, description="LoRA-FAIR: weight of the regulariser on the correction"
    )
    fair_steps: Int = Field(
        default=200, ge=0, description="LoRA-FAIR: optimisation steps of the server correction"
    )
    fair_lr: Float = Field(default=0.01, gt=0, description="LoRA-FAIR: step size of the correction")
    fedsb_init: Literal["public"] = Field(
        default="public",
        description="Fed-SB: the init gradient comes from the server's public split",
    )
    fedsb_init_steps: Int = Field(
        default=4, ge=1, description="Fed-SB: gradient steps of the initialisation"
    )
    robust: Literal["off", "norm_bound", "median", "trimmed_mean"] = Field(
        default="off", description="robust aggregation around a linear algorithm"
    )
    norm_bound: Float = Field(
        default=10.0,
        gt=0,
        description='robust = "norm_bound": updates are scaled down to this norm',
    )
    trim_fraction: Float = Field(
        default=0.1, ge=0, lt=0.5, description='robust = "trimmed_mean": fraction cut at each end'
    )
    max_update_norm: Float = Field(
        default=0.0, ge=0, description="reject an update whose L2 norm exceeds this (0 = no bound)"
    )
    max_examples: Int = Field(
        default=0,
        ge=0,
        description="largest example count (FedAvg weight) one client may claim "
        "(0 = the largest partition of the run's split; set it when clients bring their data)",
    )
    secure: Bool = Field(
        default=False, description="secure aggregation: the server sees only the sum"
    )
    server_opt: Literal["none", "avgm", "adam", "yogi"] = Field(
        default="none",
        description="server optimizer on each round's aggregate as a pseudo-gradient "
        "(FedAvgM / FedAdam / FedYogi); fedit, ffa, fedsb only",
    )
    server_lr: Float = Field(
        default=1.0,
        gt=0,
        lt=100,
        description="server_opt: server learning rate η (avgm: 1 with momentum 0 is FedAvg; "
        "adam/yogi move each number by about η per round: try 1e-3 to 1e-2 on LoRA)",
    )
    server_momentum: Float = Field(
        default=0.9, ge=0, lt=1, description='server_opt = "avgm": momentum μ'
    )
    server_beta1: Float = Field(
        default=0.9, ge=0, lt=1, description='server_opt = "adam" / "yogi": β₁'
    )
    server_beta2: Float = Field(
        default=0.99, ge=0, lt=1, description='server_opt = "adam" / "yogi": β₂'
    )
    server_tau: Float = Field(
        default=1e-3, gt=0, description='server_opt = "adam" / "yogi": adaptivity floor τ'
    )

    def __post_init__(self) -> None:
        if self.secure and self.robust == "norm_bound":
            raise Refusal(
                "robust",
                "norm_bound",
                "under secure aggregation the server sees only the sum, so it cannot check "
                "that each client clipped to norm_bound (one client could send any vector); "
                "use secure with privacy.mode = 'user' (whose sum is checked against "
                "clients x clip) or norm_bound without secure",
            )
        if self.secure and self.max_update_norm > 0:
            raise Refusal(
                "max_update_norm",
                self.max_update_norm,
                "the server checks each update's norm, which secure aggregation hides: use 0 "
                "with secure (or privacy.mode = 'user' to bound each client's contribution)",
            )


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class PrivacyConfig:
    """The privacy guarantee: every knob here changes it, and it is logged with results."""

    mode: Literal["off", "sample", "user"] = Field(
        default="off",
        description="sample = DP-SGD on each client; user = clip + noise on the server",
    )
    epsilon: Float = Field(default=3.0, gt=0, description="the budget ε at privacy.delta")
    delta: Float = Field(default=1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee")
    max_grad_norm: Float = Field(
        default=1.0, gt=0, description="clipping norm (per sample, or per client update for user)"
    )
    accountant: Literal["prv", "rdp", "gdp"] = Field(
        default="prv",
        description='how spent ε is computed ("gdp" is refused: it can underestimate ε)',
    )
    client_epsilon: dict[str, Annotated[float, Strict(), Field(gt=0)]] = Field(
        default_factory=dict,
        description='stricter per-client budgets: client index -> ε, e.g. { "3" = 1.0 }',
    )
    noise_multiplier: Float = Field(
        default=0.0,
        ge=0,
        description="set σ directly instead of calibrating it from ε (0 = calibrate)",
    )

    def __post_init__(self) -> None:
        if self.accountant == "gdp":
            raise Refusal(
                "accountant",
                "gdp",
                "'prv' or 'rdp': the GDP (central limit) approximation underestimates epsilon "
                "for few steps, so noise calibrated or rounds admitted with it can run over "
                "the budget",
            )
        for client, eps in self.client_epsilon.items():
            if not client.isdigit():
                raise Refusal(f"client_epsilon.{client}", eps, "keys are client indices")


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class SplitConfig:
    """Split learning (adapter.method = "split") and the SFPrompt pipeline."""

    front_layers: Int = Field(
        default=1, ge=1, description="transformer blocks on the client before the server's body"
    )
    back_layers: Int = Field(
        default=1, ge=0, description="transformer blocks on the client after the server's body"
    )
    server: Str = Field(
        default="", description='"" = start a split server on loopback for the run; else HOST:PORT'
    )
    wire_dtype: Literal["fp32", "bf16", "fp16"] = Field(
        default="bf16", description="tensors across the cut (fp16 with a per-tensor scale)"
    )
    micro_batches_in_flight: Int = Field(
        default=2, ge=1, description="micro-batches a client sends before awaiting replies"
    )
    train_back: Bool = Field(
        default=True,
        description="the client's back blocks train too (their weights travel in the update "
        "like the head); false = only the soft prompt and the head train (SFPrompt's "
        "original), which leaves a frozen sentence encoder such as MiniLM at the majority class",
    )
    local_loss_steps: Int = Field(
        default=0, ge=0, description="SFPrompt: local-loss steps before split training"
    )
    keep_fraction: Float = Field(
        default=1.0, gt=0, le=1, description="SFPrompt: EL2N pruning keeps this fraction"
    )
    privatize: Literal["off", "dx"] = Field(
        default="off",
        description='"dx" = d_χ-privacy noise on the client token embeddings before the cut (SAP)',
    )
    dx_epsilon: Float = Field(
        default=100.0,
        gt=0,
        description="per-token d_χ ε (noise norm ~ hidden size / ε); not DP-SGD's ε",
    )
    cut_noise_std: Float = Field(
        default=0.0,
        ge=0,
        description="Gaussian noise (this std) on the activations sent across the cut; "
        "0 = none. Not a DP guarantee: nothing calibrates it to a sensitivity",
    )


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class AuditConfig:
    """After the run, the attacks that apply to its configuration, measured on its payloads."""

    enabled: Bool = Field(
        default=False,
        description="attack the run's payloads after it ends (split: cut inversion; lora / "
        "prompt: label and token inversion of one update) and add the results to "
        "summary.json and report.html",
    )
    examples: Int = Field(
        default=16, ge=1, le=1024, description="client 0's training examples attacked"
    )
    dlg_steps: Int = Field(
        default=30, ge=0, le=1000, description="gradient-inversion optimiser steps (0 = skip)"
    )


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class TrackingConfig:
    """Experiment trackers (Hugging Face Trainer's ``report_to`` names), local stores only."""

    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list,
        description='"tensorboard" (event files in OUT/tensorboard/), "mlflow" (SQLite store '
        "OUT/mlflow/mlflow.db); nothing goes online",
    )


@dataclass(frozen=True, kw_only=True, config=_SECTION)
class RunConfig:
    """A whole run. Build with :func:`load_config` or :func:`build_config`."""

    name: Str = Field(default="run", description="run name; outputs go to runs/<name>/ by default")
    seed: Int = Field(default=0, ge=0, description="seeds the split, the partition and the init")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    aggregation: AggregationConfig = Field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        algo = self.aggregation.algorithm
        if self.model.load_in_4bit and (
            algo in ("flora", "fedex", "fedsb") or self.adapter.method == "split"
        ):
            raise Refusal(
                "model.load_in_4bit",
                True,
                f"4-bit base weights are frozen and packed: {algo!r} / method "
                f"{self.adapter.method!r} needs to add a dense delta to them or take their "
                "full gradient (FLoRA, FedEx-LoRA fold into the base, Fed-SB initialises "
                "from it) or cuts the model (split); use fedit, ffa, lora_fair or hetlora "
                "with method 'lora' or 'prompt'",
            )
        if self.adapter.ranks and len(set(self.adapter.ranks)) > 1:
            if algo not in MIXED_RANK_ALGORITHMS:
                raise Refusal(
                    "adapter.ranks",
                    self.adapter.ranks,
                    f"clients of different ranks need aggregation.algorithm in "
                    f"{list(MIXED_RANK_ALGORITHMS)}; {algo!r} averages factors of one shape",
                )
        if self.privacy.mode == "user":
            if algo not in LINEAR_ALGORITHMS:
                raise Refusal(
                    "privacy.mode",
                    "user",
                    f"user-level DP adds noise to a weighted sum, so it needs a linear "
                    f"aggregator {list(LINEAR_ALGORITHMS)}; {algo!r} is not linear",
                )
        if self.aggregation.secure and algo not in LINEAR_ALGORITHMS:
            raise Refusal(
                "aggregation.secure",
                True,
                f"secure aggregation reveals only a sum, so it needs one of "
                f"{list(LINEAR_ALGORITHMS)}; {algo!r} needs each client's factors",
            )
        if self.aggregation.robust != "off" and algo not in LINEAR_ALGORITHMS:
            raise Refusal(
                "aggregation.robust",
                self.aggregation.robust,
                f"robust aggregation composes with {list(LINEAR_ALGORITHMS)}, not {algo!r}",
            )
        if self.privacy.mode == "user" and self.aggregation.robust != "off":
            raise Refusal(
                "aggregation.robust",
                self.aggregation.robust,
                "user-level DP already clips every update to privacy.max_grad_norm; a robust "
                "wrapper inside it would change its sensitivity bound: use 'off'",
            )
        if self.aggregation.secure and self.aggregation.robust in ("median", "trimmed_mean"):
            raise Refusal(
                "aggregation.robust",
                self.aggregation.robust,
                "a median or trimmed mean needs each update, which secure aggregation hides",
            )
        if self.aggregation.server_opt != "none":
            why = SERVER_OPT_UNDEFINED.get(algo)
            if why is not None:
                raise Refusal(
                    "aggregation.server_opt",
                    self.aggregation.server_opt,
                    f"'none' with {algo!r}: {why}; a server optimizer is defined for "
                    f"{list(SERVER_OPT_ALGORITHMS)}",
                )
            if self.adapter.method == "split":
                raise Refusal(
                    "aggregation.server_opt",
                    self.aggregation.server_opt,
                    "'none' with adapter.method = 'split': the split server trains its body "
                    "step by step, so an optimizer over the averaged client half alone would "
                    "move the two halves by different rules",
                )
        if self.adapter.method in ("prompt", "split") and algo != "fedit":
            raise Refusal(
                "aggregation.algorithm",
                algo,
                f"adapter.method = {self.adapter.method!r} trains soft prompts and client-side "
                "parts, which the server averages by p_k: use 'fedit' (the LoRA algorithms "
                "apply to method = 'lora')",
            )
        sizes = self.data.partition_sizes
        if sizes and len(sizes) != self.federation.num_clients:
            raise Refusal(
                "data.partition_sizes",
                sizes,
                f"one size per client: {self.federation.num_clients} sizes "
                "(federation.num_clients), or [] for equal sizes",
            )
        if self.adapter.method == "split" and self.privacy.mode == "user":
            raise Refusal(
                "privacy.mode",
                "user",
                "user-level DP protects what the server aggregates, but in split learning the "
                "hidden states and gradients that cross the cut every step carry each "
                "client's data with no DP at all, so no epsilon would describe what the split "
                "server sees: use privacy.mode = 'off' with split, or adapter.method = "
                "'prompt' or 'lora' with DP",
            )
        if self.split.privatize == "dx" and self.adapter.method != "split":
            raise Refusal(
                "split.privatize",
                "dx",
                "'off': d_χ noise protects the split cut; set adapter.method = 'split'",
            )
        if self.split.cut_noise_std > 0 and self.adapter.method != "split":
            raise Refusal(
                "split.cut_noise_std",
                self.split.cut_noise_std,
                "0: noise on the cut activations needs adapter.method = 'split'",
            )
        for client in self.privacy.client_epsilon:
            if int(client) >= self.federation.num_clients:
                raise Refusal(
                    f"privacy.client_epsilon.{client}",
                    self.privacy.client_epsilon[client],
                    f"client indices run from 0 to {self.federation.num_clients - 1}",
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-ready form (what summary.json records)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Canonical JSON (sorted keys) of :meth:`to_dict`."""
        return json.dumps(self.to_dict(), sort_keys=True)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "federation": FederationConfig,
    "adapter": AdapterConfig,
    "aggregation": AggregationConfig,
    "privacy": PrivacyConfig,
    "split": SplitConfig,
    "tracking": TrackingConfig,
    "audit": AuditConfig,
}

_ADAPTER: TypeAdapter[RunConfig] = TypeAdapter(RunConfig)


# --- what is allowed, in words (errors and docs share it) -------------------------------


def _strip(tp: Any) -> tuple[Any, list[Any]]:
    """Annotation without ``Annotated`` wrappers, and the constraints they carried."""
    metadata: list[Any] = []
    while get_origin(tp) is Annotated:
        tp, *extra = get_args(tp)
        metadata.extend(extra)
    flat: list[Any] = []
    for m in metadata:  # Field(ge=...) inside Annotated arrives as a FieldInfo
        flat.extend(getattr(m, "metadata", [m]))
    return tp, flat


def _field_info(cls: type, name: str) -> tuple[Any, list[Any], str]:
    """Annotation, ``Field`` constraints and description of field ``name`` of ``cls``."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)  # type: ignore[arg-type]
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    info = field.default
    metadata = list(getattr(info, "metadata", []))
    return hint, metadata, str(getattr(info, "description", "") or "")


def _annotation_at(loc: Sequence[str | int]) -> tuple[Any, list[Any], str] | None:
    """What the value at key path ``loc`` must be: (annotation, constraints, description)."""
    cls: Any = RunConfig
    found: tuple[Any, list[Any], str] | None = None
    for part in loc:
        if isinstance(cls, type) and dataclasses.is_dataclass(cls):
            names = {f.name for f in dataclasses.fields(cls)}
            if not isinstance(part, str) or part not in names:
                return None
            found = _field_info(cls, part)
            cls = found[0]
            continue
        if found is None:
            return None
        base, _ = _strip(found[0])
        if get_origin(base) not in (list, dict):
            return None
        item = get_args(base)[-1]  # an item of a list, a value of a table
        found = (item, [], found[2])
        cls = item
    return found


def _bounds(metadata: Sequence[Any]) -> str:
    lo = hi = ""
    for m in metadata:
        if isinstance(m, annotated_types.Ge):
            lo = f">= {m.ge}"
        elif isinstance(m, annotated_types.Gt):
            lo = f"> {m.gt}"
        elif isinstance(m, annotated_types.Le):
            hi = f"<= {m.le}"
        elif isinstance(m, annotated_types.Lt):
            hi = f"< {m.lt}"
    return f"{lo} and {hi}" if lo and hi else lo or hi


def _plural(text: str) -> str:
    for one, many in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings")):
        if text.startswith(one):
            return many + text[len(one) :]
    return text


def allowed_text(tp: Any, metadata: Sequence[Any] = (), *, quote: Any = repr) -> str:
    """What a value of annotation ``tp`` (with ``Field`` constraints) may be, in words."""
    tp, inner = _strip(tp)
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(quote(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_plural(allowed_text(get_args(tp)[0], quote=quote))}"
    if origin is dict:
        return f"a table of {_plural(allowed_text(get_args(tp)[1], quote=quote))}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    word = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp)
    )
    bounds = _bounds([*inner, *metadata])
    return f"{word} {bounds}" if bounds else word


# --- errors -----------------------------------------------------------------------------


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(error: Any) -> str:
    """One pydantic error as ``key = value is not allowed: what is allowed``."""
    loc: tuple[str | int, ...] = tuple(error["loc"])
    kind, value = error["type"], error["input"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        section = SECTIONS.get(str(loc[0])) if len(loc) > 1 else None
        if section is not None:
            known = sorted(f.name for f in dataclasses.fields(section))  # type: ignore[arg-type]
            return f"unknown key {_dotted(loc)!r}; known keys here: {', '.join(known)}"
        known = ["name", "seed", *sorted(SECTIONS)]
        return f"unknown key {_dotted(loc)!r}; known top-level keys: {', '.join(known)}"
    refusal = error.get("ctx", {}).get("error")
    if kind == "value_error" and isinstance(refusal, Refusal):
        key = _dotted((*loc, refusal.key)) if loc else refusal.key
        return f"{key} = {refusal.value!r} is not allowed: {refusal.allowed}"
    key = _dotted(loc)
    if kind in ("dataclass_type", "dataclass_exact_type") and len(loc) == 1:
        return f"{key} = {value!r} is not allowed: a [{key}] table"
    spec = _annotation_at(loc)
    if spec is None:
        return f"{key} = {value!r} is not allowed: {error['msg']}"
    hint, metadata, description = spec
    if _strip(hint)[0] is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # shown as the config holds it
    allowed = allowed_text(hint, metadata)
    if description and not description.startswith('"'):
        allowed += f" ({description})"
    return f"{key} = {value!r} is not allowed: {allowed}"


def _config_error(exc: ValidationError) -> ConfigError:
    problems = [_describe(e) for e in exc.errors()]
    if len(problems) == 1:
        return ConfigError(problems[0])
    return ConfigError(f"{len(problems)} problems:\n  " + "\n  ".join(problems))


# --- building ---------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    """A ``--set`` value: TOML (numbers, booleans, arrays, quoted strings) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(table: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested dict (a copy is returned)."""
    out = json.loads(json.dumps(table))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"--set {item!r} is not allowed: write --set section.key=value, "
                "e.g. --set federation.rounds=2"
            )
        dotted, text = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set {item!r}: the key is empty")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p!r} is a value, not a section")
        node[parts[-1]] = _parse_value(text.strip())
    return out


def build_config(table: Mapping[str, Any]) -> RunConfig:
    """Validate a nested dict (parsed TOML or JSON) into a :class:`RunConfig`."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"config = {table!r} is not allowed: a table of sections")
    try:
        return _ADAPTER.validate_python(dict(table))
    except ValidationError as exc:
        raise _config_error(exc) from None


def load_table(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A TOML file (or nothing) with overrides applied, not yet validated (see build_config)."""
    table: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a TOML file path")
        try:
            table = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    return apply_overrides(table, overrides)


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML file (or the defaults when ``path`` is None), apply overrides, validate."""
    return build_config(load_table(path, overrides))


def config_from_json(text: str) -> RunConfig:
    """Rebuild a config from :meth:`RunConfig.to_json` (how it travels in Flower's run config)."""
    return build_config(json.loads(text))


# --- documentation generated from the fields --------------------------------------------


def json_schema() -> dict[str, Any]:
    """JSON schema of the run configuration (what ``fedft config schema`` prints)."""
    schema = _ADAPTER.json_schema()
    schema["title"] = "fedft run configuration"
    return schema


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
            return f"{value:g}".replace("e-0", "e-")
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return str(value)


def _doc_lines(cls: type, instance: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in SECTIONS:
            continue
        hint, metadata, description = _field_info(cls, f.name)
        allowed = allowed_text(hint, metadata, quote=json.dumps)
        comment = description
        if not description.startswith('"'):
            comment = f"{description}; {allowed}" if description else allowed
        lines.append(f"{f.name} = {_toml_value(getattr(instance, f.name))}  # {comment}")
    width = max(line.index("  # ") for line in lines)
    return [f"{(k := line.split('  # ', 1))[0]:<{width}}  # {k[1]}" for line in lines]


def defaults_toml() -> str:
    """Every key with its default and what is allowed, as TOML (the README's config block)."""
    cfg = RunConfig()
    out = _doc_lines(RunConfig, cfg)
    for name, cls in SECTIONS.items():
        out += ["", f"[{name}]", *_doc_lines(cls, getattr(cfg, name))]
    return "\n".join(out) + "\n"
