"""The run configuration: frozen, typed, validated when built.

This is the one place that parses config files. A TOML file plus ``--set dotted.key=value``
overrides become a :class:`RunConfig`; any unknown key, wrong type or impossible value raises
:class:`ConfigError` naming the key, the value and what is allowed, before any work starts.
Nothing below the builders receives a config object: see ``as_kwargs`` helpers in the
modules that consume a section.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

ALGORITHMS = ("fedit", "flora", "fedsb", "lora_fair", "hetlora", "ffa", "fedex")
#: aggregators whose result is a p_k-weighted mean of what clients upload (user-level DP and
#: secure aggregation need this).
LINEAR_ALGORITHMS = ("fedit", "fedsb", "ffa")
#: aggregators that accept clients of different ranks.
MIXED_RANK_ALGORITHMS = ("flora", "hetlora")


class ConfigError(ValueError):
    """A bad configuration value: the message names the key, the value and what is allowed."""


def _fail(key: str, value: Any, allowed: str) -> typing.NoReturn:
    raise ConfigError(f"{key} = {value!r} is not allowed: {allowed}")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which pretrained model, for which task."""

    name: str = "minilm"
    task: Literal["classification", "causal_lm"] = "classification"
    #: module names (suffixes) that get adapters; empty = the model family's default.
    target_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.name.strip():
            _fail("model.name", self.name, '"minilm", "smollm2-135m", a local folder or a hub id')


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Dataset, partitioning and tokenisation."""

    dataset: str = "rotten_tomatoes"
    partition: Literal["iid", "dirichlet", "natural"] = "dirichlet"
    alpha: float = 0.5
    max_length: int = 64
    #: held-out global test examples (never seen by a client).
    test_size: int = 500
    #: public examples held by the server (Fed-SB init); not in any client or the test set.
    public_size: int = 64
    #: cap on training examples over all clients (0 = all).
    max_train_examples: int = 0
    text_column: str = "text"
    label_column: str = "label"

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            _fail("data.alpha", self.alpha, "the Dirichlet concentration must be > 0")
        if not 8 <= self.max_length <= 4096:
            _fail("data.max_length", self.max_length, "an integer from 8 to 4096")
        if self.test_size < 1:
            _fail("data.test_size", self.test_size, "at least 1 held-out example")
        if self.public_size < 0 or self.max_train_examples < 0:
            key = "data.public_size" if self.public_size < 0 else "data.max_train_examples"
            _fail(key, getattr(self, key.split(".")[1]), "an integer >= 0")


@dataclass(frozen=True, kw_only=True)
class FederationConfig:
    """Rounds, clients and local training knobs."""

    num_clients: int = 10
    clients_per_round: int = 5
    rounds: int = 5
    local_steps: int = 20
    batch_size: int = 16
    eval_batch_size: int = 64
    lr: float = 5e-4
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus_per_client: float = 0.0
    cpus_per_client: int = 1
    #: fewest replies a round needs; fewer and the round fails, the model unchanged (0 = 1).
    min_replies: int = 0
    #: seconds to wait for replies in a round (0 = no limit).
    round_timeout_s: float = 0.0

    def __post_init__(self) -> None:
        positive = ("num_clients", "clients_per_round", "rounds", "local_steps", "batch_size")
        for key in (*positive, "eval_batch_size", "cpus_per_client"):
            if getattr(self, key) < 1:
                _fail(f"federation.{key}", getattr(self, key), "an integer >= 1")
        if self.clients_per_round > self.num_clients:
            _fail(
                "federation.clients_per_round",
                self.clients_per_round,
                f"at most federation.num_clients ({self.num_clients})",
            )
        if not 0 < self.lr < 10:
            _fail("federation.lr", self.lr, "a learning rate in (0, 10)")
        if not 0 <= self.gpus_per_client <= 1:
            _fail("federation.gpus_per_client", self.gpus_per_client, "a fraction in [0, 1]")
        if not 0 <= self.min_replies <= self.clients_per_round:
            _fail(
                "federation.min_replies",
                self.min_replies,
                f"0..federation.clients_per_round ({self.clients_per_round})",
            )
        if self.round_timeout_s < 0:
            _fail("federation.round_timeout_s", self.round_timeout_s, "seconds >= 0")


@dataclass(frozen=True, kw_only=True)
class AdapterConfig:
    """What clients train: LoRA (one rank or per-client ranks), soft prompts, or split."""

    method: Literal["lora", "prompt", "split"] = "lora"
    rank: int = 8
    #: per-client ranks, assigned to clients in turn (client k gets ranks[k % len]).
    ranks: list[int] = field(default_factory=list)
    alpha: float = 16.0
    dropout: float = 0.0
    #: soft prompt length (method = "prompt", or prompts inside split learning).
    prompt_tokens: int = 8

    def __post_init__(self) -> None:
        if self.rank < 1:
            _fail("adapter.rank", self.rank, "an integer >= 1")
        if any(r < 1 for r in self.ranks):
            _fail("adapter.ranks", self.ranks, "a list of integers >= 1")
        if self.alpha <= 0:
            _fail("adapter.alpha", self.alpha, "a number > 0")
        if not 0 <= self.dropout < 1:
            _fail("adapter.dropout", self.dropout, "a probability in [0, 1)")
        if self.prompt_tokens < 1:
            _fail("adapter.prompt_tokens", self.prompt_tokens, "an integer >= 1")

    def rank_of(self, client_index: int) -> int:
        """The rank client ``client_index`` trains at."""
        return self.ranks[client_index % len(self.ranks)] if self.ranks else self.rank


@dataclass(frozen=True, kw_only=True)
class AggregationConfig:
    """Server-side aggregation and its options."""

    algorithm: Literal["fedit", "flora", "fedsb", "lora_fair", "hetlora", "ffa", "fedex"] = "fedit"
    #: LoRA-FAIR: regulariser weight and optimisation steps of the server correction.
    fair_lambda: float = 0.01
    fair_steps: int = 200
    fair_lr: float = 0.01
    #: Fed-SB: where the init gradient comes from ("public": the server's public split).
    fedsb_init: Literal["public"] = "public"
    fedsb_init_steps: int = 4
    #: robust aggregation around a linear aggregator.
    robust: Literal["off", "norm_bound", "median", "trimmed_mean"] = "off"
    norm_bound: float = 10.0
    trim_fraction: float = 0.1
    #: reject updates whose whole norm exceeds this (0 = no bound).
    max_update_norm: float = 0.0
    secure: bool = False

    def __post_init__(self) -> None:
        if self.fair_lambda < 0:
            _fail("aggregation.fair_lambda", self.fair_lambda, "a number >= 0")
        if self.fair_steps < 0 or self.fedsb_init_steps < 1:
            key = "fair_steps" if self.fair_steps < 0 else "fedsb_init_steps"
            _fail(f"aggregation.{key}", getattr(self, key), "a non-negative integer")
        if not 0 <= self.trim_fraction < 0.5:
            _fail("aggregation.trim_fraction", self.trim_fraction, "a fraction in [0, 0.5)")
        if self.norm_bound <= 0 or self.max_update_norm < 0:
            _fail("aggregation.norm_bound", self.norm_bound, "a positive norm")


@dataclass(frozen=True, kw_only=True)
class PrivacyConfig:
    """The privacy guarantee: every knob here changes it, and it is logged with results."""

    mode: Literal["off", "sample", "user"] = "off"
    epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv", "gdp"] = "prv"
    #: per-client budgets stricter than the run's: client index (as a string) -> epsilon.
    client_epsilon: dict[str, float] = field(default_factory=dict)
    #: set the noise directly instead of calibrating it from epsilon (0 = calibrate).
    noise_multiplier: float = 0.0

    def __post_init__(self) -> None:
        if self.epsilon <= 0:
            _fail("privacy.epsilon", self.epsilon, "a budget > 0 (e.g. 3.0)")
        if not 0 < self.delta < 1:
            _fail("privacy.delta", self.delta, "a probability in (0, 1), e.g. 1e-5")
        if self.max_grad_norm <= 0:
            _fail("privacy.max_grad_norm", self.max_grad_norm, "a clipping norm > 0")
        if self.noise_multiplier < 0:
            _fail("privacy.noise_multiplier", self.noise_multiplier, "a number >= 0")
        for client, eps in self.client_epsilon.items():
            if not client.isdigit():
                _fail(f"privacy.client_epsilon.{client}", eps, "keys are client indices")
            if not 0 < eps:
                _fail(f"privacy.client_epsilon.{client}", eps, "a budget > 0")


@dataclass(frozen=True, kw_only=True)
class SplitConfig:
    """Split learning (adapter.method = "split") and the SFPrompt pipeline."""

    #: transformer blocks kept on the client before / after the server's body.
    front_layers: int = 1
    back_layers: int = 1
    #: "" = start a split server on loopback for the run; else host:port of one.
    server: str = ""
    wire_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    micro_batches_in_flight: int = 2
    #: SFPrompt: local-loss steps before split training, and the EL2N keep fraction.
    local_loss_steps: int = 0
    keep_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.front_layers < 1 or self.back_layers < 0:
            _fail("split.front_layers", self.front_layers, "front >= 1, back >= 0 blocks")
        if not 0 < self.keep_fraction <= 1:
            _fail("split.keep_fraction", self.keep_fraction, "a fraction in (0, 1]")
        if self.micro_batches_in_flight < 1:
            _fail("split.micro_batches_in_flight", self.micro_batches_in_flight, ">= 1")


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """A whole run. Build with :func:`load_config`."""

    name: str = "run"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    split: SplitConfig = field(default_factory=SplitConfig)

    def __post_init__(self) -> None:
        algo = self.aggregation.algorithm
        if self.adapter.ranks and len(set(self.adapter.ranks)) > 1:
            if algo not in MIXED_RANK_ALGORITHMS:
                _fail(
                    "adapter.ranks",
                    self.adapter.ranks,
                    f"clients of different ranks need aggregation.algorithm in "
                    f"{list(MIXED_RANK_ALGORITHMS)}; {algo!r} averages factors of one shape",
                )
        if self.privacy.mode == "user":
            if algo not in LINEAR_ALGORITHMS:
                _fail(
                    "privacy.mode",
                    "user",
                    f"user-level DP adds noise to a weighted sum, so it needs a linear "
                    f"aggregator {list(LINEAR_ALGORITHMS)}; {algo!r} is not linear",
                )
        if self.aggregation.secure and algo not in LINEAR_ALGORITHMS:
            _fail(
                "aggregation.secure",
                True,
                f"secure aggregation reveals only a sum, so it needs one of "
                f"{list(LINEAR_ALGORITHMS)}; {algo!r} needs each client's factors",
            )
        if self.aggregation.robust != "off" and algo not in LINEAR_ALGORITHMS:
            _fail(
                "aggregation.robust",
                self.aggregation.robust,
                f"robust aggregation composes with {list(LINEAR_ALGORITHMS)}, not {algo!r}",
            )
        if self.privacy.mode == "user" and self.aggregation.robust != "off":
            _fail(
                "aggregation.robust",
                self.aggregation.robust,
                "user-level DP already clips every update to privacy.max_grad_norm; a robust "
                "wrapper inside it would change its sensitivity bound: use 'off'",
            )
        if self.aggregation.secure and self.aggregation.robust in ("median", "trimmed_mean"):
            _fail(
                "aggregation.robust",
                self.aggregation.robust,
                "a median or trimmed mean needs each update, which secure aggregation hides",
            )
        if self.adapter.method in ("prompt", "split") and algo != "fedit":
            _fail(
                "aggregation.algorithm",
                algo,
                f"adapter.method = {self.adapter.method!r} trains soft prompts and client-side "
                "parts, which the server averages by p_k: use 'fedit' (the LoRA algorithms "
                "apply to method = 'lora')",
            )
        if self.adapter.method == "split" and self.privacy.mode == "sample":
            _fail(
                "privacy.mode",
                "sample",
                "sample-level DP-SGD is not implemented for adapter.method = 'split': clipping "
                "the prompt's per-sample gradients needs per-sample cut gradients from the split "
                "server, and the activations sent across the cut are not covered by DP-SGD on "
                "the client's weights; use privacy.mode = 'off' or 'user', or method = 'prompt'",
            )
        for client in self.privacy.client_epsilon:
            if int(client) >= self.federation.num_clients:
                _fail(
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


# --- building ---------------------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[str(f.type)]
    for f in dataclasses.fields(RunConfig)
    if f.name not in ("name", "seed")
}


def _allowed(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, str(tp).replace("typing.", "")
    )


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the right type."""
    origin = get_origin(tp)
    if origin is Literal:
        if value not in get_args(tp):
            _fail(key, value, _allowed(tp))
        return value
    if origin in (types.UnionType, typing.Union):
        for option in get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
        _fail(key, value, " or ".join(_allowed(a) for a in get_args(tp)))
    if origin is list:
        (item,) = get_args(tp)
        if not isinstance(value, list):
            _fail(key, value, f"a list of {_allowed(item)}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        _, item = get_args(tp)
        if not isinstance(value, Mapping):
            _fail(key, value, f"a table of {_allowed(item)}")
        return {str(k): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            _fail(key, value, "true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(key, value, "an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(key, value, "a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(key, value, "a string")
        return value
    if tp is type(None):
        if value is not None:
            _fail(key, value, "nothing")
        return None
    raise TypeError(f"unsupported annotation {tp} for {key}")


def _build(cls: type, table: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown key {dotted!r}; known keys here: {known}")
        kwargs[key] = _coerce(dotted, value, hints[key])
    return cls(**kwargs)


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
    """Validate a nested dict (parsed TOML) into a :class:`RunConfig`."""
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("name", "seed"):
            kwargs[key] = _coerce(key, value, str if key == "name" else int)
        elif key in _SECTIONS:
            if not isinstance(value, Mapping):
                _fail(key, value, f"a [{key}] table")
            kwargs[key] = _build(_SECTIONS[key], value, f"{key}.")
        else:
            known = ", ".join(["name", "seed", *sorted(_SECTIONS)])
            raise ConfigError(f"unknown key {key!r}; known top-level keys: {known}")
    try:
        return RunConfig(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:  # pragma: no cover - defensive
        raise ConfigError(str(exc)) from exc


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML file (or the defaults when ``path`` is None), apply overrides, validate."""
    table: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist; pass a TOML file path")
        try:
            table = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML ({exc})") from exc
    return build_config(apply_overrides(table, overrides))


def config_from_json(text: str) -> RunConfig:
    """Rebuild a config from :meth:`RunConfig.to_json` (how it travels in Flower's run config)."""
    return build_config(json.loads(text))
