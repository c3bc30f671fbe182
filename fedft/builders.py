"""Builders: the only code below the entry points that reads a :class:`RunConfig`.

Each turns a config into plain keyword arguments (or built objects) for the library, so
nothing under them receives a config object (STYLE.md item 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedft.aggregation import get_aggregator
from fedft.aggregation.base import Aggregator
from fedft.aggregation.robust import make_robust
from fedft.aggregation.server_opt import ServerOptimizer
from fedft.config import RunConfig
from fedft.data.flower_partition import PartitionOptions
from fedft.privacy import CentralDP, plan_user_level

if TYPE_CHECKING:
    from fedft.reporting.tracking import Trackers


def data_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Arguments of :func:`fedft.data.build_federated_data`."""
    d = cfg.data
    return {
        "dataset": d.dataset,
        "task": cfg.model.task,
        "partition": d.partition,
        "alpha": d.alpha,
        "num_clients": cfg.federation.num_clients,
        "test_size": d.test_size,
        "public_size": d.public_size,
        "max_train_examples": d.max_train_examples,
        "seed": cfg.seed,
        "text_column": d.text_column,
        "label_column": d.label_column,
        "partition_options": PartitionOptions(
            classes_per_client=d.classes_per_client,
            class_assignment=d.class_assignment,
            shards_per_client=d.shards_per_client,
            shard_size=d.shard_size,
            partition_sizes=tuple(d.partition_sizes),
            group_size=d.group_size,
            group_mode=d.group_mode,
        ),
    }


def runtime_kwargs(cfg: RunConfig, *, num_labels: int) -> dict[str, Any]:
    """Arguments of :func:`fedft.training.runtime.get_runtime` (device resolved by caller)."""
    return {
        "model_name": cfg.model.name,
        "task": cfg.model.task,
        "num_labels": num_labels,
        "seed": cfg.seed,
        "target_modules": list(cfg.model.target_modules) or None,
        "load_in_4bit": cfg.model.load_in_4bit,
    }


def aggregator_options(cfg: RunConfig) -> dict[str, Any]:
    """Options of the chosen algorithm (only the ones it takes)."""
    a = cfg.aggregation
    if a.algorithm == "lora_fair":
        return {"fair_lambda": a.fair_lambda, "fair_steps": a.fair_steps, "fair_lr": a.fair_lr}
    return {}


def build_aggregator(cfg: RunConfig) -> Aggregator:
    """The configured aggregator, wrapped for robustness and user-level DP when asked.

    Wrappers compose around the algorithm (STYLE.md item 2); the coordinator gives them each
    round's reference adapters through ``set_reference``.
    """
    agg = get_aggregator(cfg.aggregation.algorithm, **aggregator_options(cfg))
    a = cfg.aggregation
    if a.robust != "off":
        options: dict[str, Any] = {
            "norm_bound": {"bound": a.norm_bound},
            "median": {},
            "trimmed_mean": {"trim_fraction": a.trim_fraction},
        }[a.robust]
        agg = make_robust(a.robust, agg, **options)
    if cfg.privacy.mode == "user":
        p = cfg.privacy
        agg = CentralDP(
            agg,
            clip_norm=p.max_grad_norm,
            noise_multiplier=user_noise_multiplier(cfg),
            expected_clients=cfg.federation.clients_per_round,
            num_clients=cfg.federation.num_clients,
            seed=None,  # fresh OS randomness: a known seed would let anyone remove the noise
            accountant=p.accountant,
            epsilon_budget=p.epsilon,
            delta=p.delta,
        )
    return agg


def build_server_opt(cfg: RunConfig, aggregator: Aggregator) -> ServerOptimizer | None:
    """The configured server optimizer over what ``aggregator``'s clients train, or None."""
    a = cfg.aggregation
    if a.server_opt == "none":
        return None
    return ServerOptimizer(
        kind=a.server_opt,
        parts=aggregator.trainable,
        lr=a.server_lr,
        momentum=a.server_momentum,
        beta1=a.server_beta1,
        beta2=a.server_beta2,
        tau=a.server_tau,
    )


def user_noise_multiplier(cfg: RunConfig) -> float:
    """σ for user-level DP: as set, or calibrated to (ε, δ) over the planned rounds."""
    p, f = cfg.privacy, cfg.federation
    if p.noise_multiplier > 0:
        return p.noise_multiplier
    return plan_user_level(
        epsilon=p.epsilon,
        delta=p.delta,
        clients_per_round=f.clients_per_round,
        num_clients=f.num_clients,
        rounds=f.rounds,
        accountant=p.accountant,
    ).noise_multiplier


@dataclass(frozen=True, kw_only=True)
class SampleDP:
    """Sample-level DP-SGD settings of one client (what changes the guarantee)."""

    epsilon: float
    delta: float
    max_grad_norm: float
    mechanism: str
    noise_multiplier: float  # 0 = calibrate from epsilon over the planned run
    planned_steps: int


def client_privacy(cfg: RunConfig, client_index: int, *, node_epsilon: float = 0.0) -> SampleDP:
    """The budget client ``client_index`` trains under: the run's, or stricter.

    A per-client override (``privacy.client_epsilon``) or the node's own budget
    (``fedft client --epsilon``) can only lower ε, never raise it.
    """
    p = cfg.privacy
    budgets = [p.epsilon, p.client_epsilon.get(str(client_index), p.epsilon)]
    if node_epsilon > 0:
        budgets.append(node_epsilon)
    return SampleDP(
        epsilon=min(budgets),
        delta=p.delta,
        max_grad_norm=p.max_grad_norm,
        mechanism=p.accountant,
        noise_multiplier=p.noise_multiplier,
        planned_steps=cfg.federation.rounds * steps_per_round(cfg),
    )


def client_sigma(cfg: RunConfig, client_index: int, num_examples: int) -> float:
    """The DP-SGD noise multiplier client ``client_index`` trains with under ``cfg``.

    As configured, else calibrated from its budget over the run's plan at its sampling rate
    batch / ``num_examples``, as the client itself does (what an analysis of the run needs).
    """
    from fedft.privacy.client import client_noise

    dp = client_privacy(cfg, client_index)
    sigma, _ = client_noise(
        epsilon=dp.epsilon,
        delta=dp.delta,
        mechanism=dp.mechanism,  # type: ignore[arg-type]
        noise_multiplier=dp.noise_multiplier,
        planned_steps=dp.planned_steps,
        num_examples=num_examples,
        batch_size=cfg.federation.batch_size,
    )
    return sigma


def steps_per_round(cfg: RunConfig) -> int:
    """DP-SGD steps one client takes per round.

    The local steps, plus, for split learning, SFPrompt's local-loss steps (they train the
    same parameters on the same examples).
    """
    extra = cfg.split.local_loss_steps if cfg.adapter.method == "split" else 0
    return cfg.federation.local_steps + extra


def max_rank(cfg: RunConfig) -> int:
    """The largest rank any client trains at."""
    return max(cfg.adapter.ranks) if cfg.adapter.ranks else cfg.adapter.rank


def trackers(cfg: RunConfig, out: Path) -> Trackers:
    """The experiment trackers of ``[tracking] report_to``, writing under ``out``."""
    from fedft.reporting.tracking import build_trackers

    return build_trackers(cfg.tracking.report_to, out, run_name=cfg.name, config=cfg.to_dict())
