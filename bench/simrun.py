"""Run a real simulation (Flower's Simulation Engine) with an instrumented ClientApp.

The ClientApp here is ``client.app``'s own, with a Flower mod around its train handler:

- load counting: after each call the worker process writes ``<dir>/<pid>.json`` with
  ``fedft.models.load_count()`` of that process; the run's total is the sum over files
  (each worker's count is cumulative, so the last write per process is its total);
- ``reload_each_call``: the reference pattern, loading the base model inside every client
  call (the process-wide runtime cache is emptied first, so ``get_runtime`` reloads);
- ``profile_dir``: cProfile of every client call, dumped per process.
"""

from __future__ import annotations

import cProfile
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import TreeRssSampler, sim_env
from fedft.config import RunConfig, load_config

logger = logging.getLogger(__name__)

QUICKSTART = str(Path(__file__).resolve().parent.parent / "simulations" / "quickstart.toml")


@dataclass(frozen=True)
class SimResult:
    """What one instrumented simulation measured."""

    wall_s: float  #: run_simulation end to end (Ray start included)
    rounds_s: float  #: sum of the rounds' wall_s from metrics.jsonl
    peak_mib: float  #: peak summed RSS of this process and its descendants
    client_loads: int  #: base-model loads summed over client worker processes
    client_calls: int
    worker_processes: int
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


def config(overrides: list[str]) -> RunConfig:
    """The quickstart config with ``--set``-style overrides."""
    return load_config(QUICKSTART, overrides)


def _client_app(
    cfg: RunConfig, count_dir: str, *, reload_each_call: bool, profile_dir: str | None
) -> Any:
    from client.app import make_client_app

    mod = _Instrument(count_dir, reload_each_call=reload_each_call, profile_dir=profile_dir)
    return make_client_app(cfg, mods=[mod])


class _Instrument:
    """A Flower mod around the real train handler: load counts, optional reloads, profiles."""

    def __init__(self, count_dir: str, *, reload_each_call: bool, profile_dir: str | None):
        self.count_dir, self.reload_each_call, self.profile_dir = (
            count_dir,
            reload_each_call,
            profile_dir,
        )

    def __call__(self, msg: Any, context: Any, call_next: Any) -> Any:
        if msg.metadata.message_type != "train":
            return call_next(msg, context)
        # per-process state lives in the imported module, which persists across calls
        from bench import simrun
        from fedft import models
        from fedft.training import runtime

        if self.reload_each_call:
            with runtime._LOCK:
                runtime._RUNTIMES.clear()
        pid = os.getpid()
        prof = simrun._PROFILES.setdefault(pid, cProfile.Profile()) if self.profile_dir else None
        if prof is not None:
            prof.enable()
        try:
            reply = call_next(msg, context)
        finally:
            if prof is not None:
                prof.disable()
                prof.dump_stats(str(Path(self.profile_dir) / f"{pid}.prof"))  # type: ignore[arg-type]
        simrun._CALLS[pid] = simrun._CALLS.get(pid, 0) + 1
        (Path(self.count_dir) / f"{pid}.json").write_text(
            json.dumps({"loads": models.load_count(), "calls": simrun._CALLS[pid]})
        )
        return reply


_PROFILES: dict[int, cProfile.Profile] = {}
_CALLS: dict[int, int] = {}


def run_sim(
    cfg: RunConfig,
    out: Path,
    *,
    reload_each_call: bool = False,
    profile_dir: Path | None = None,
    server_profile: Path | None = None,
) -> SimResult:
    """Simulate ``cfg`` with the instrumented ClientApp; write outputs under ``out``."""
    sim_env()
    import ray
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from server.federation import run_federation
    from simulations.simulate import backend_config

    out.mkdir(parents=True, exist_ok=True)
    count_dir = out / "loads"
    count_dir.mkdir(exist_ok=True)
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    errors: list[BaseException] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        prof = cProfile.Profile() if server_profile is not None else None
        if prof is not None:
            prof.enable()
        try:
            run_federation(grid, cfg, out / "run", progress=False)
        except BaseException as exc:
            errors.append(exc)
            raise
        finally:
            if prof is not None:
                prof.disable()
                prof.dump_stats(str(server_profile))

    client = _client_app(
        cfg,
        str(count_dir),
        reload_each_call=reload_each_call,
        profile_dir=None if profile_dir is None else str(profile_dir),
    )
    t0 = time.perf_counter()
    with TreeRssSampler() as mem:
        try:
            run_simulation(
                server_app=server,
                client_app=client,
                num_supernodes=cfg.federation.num_clients,
                backend_config=backend_config(cfg),  # type: ignore[arg-type]
            )
        finally:
            if ray.is_initialized():
                ray.shutdown()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"simulation failed: {errors[0]!r}") from errors[0]
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines() if x]
    summary = json.loads((out / "run" / "summary.json").read_text())["final"]
    counts = [json.loads(p.read_text()) for p in count_dir.glob("*.json")]
    return SimResult(
        wall_s=wall,
        rounds_s=sum(float(r.get("wall_s") or 0.0) for r in rows),
        peak_mib=mem.peak_mib,
        client_loads=sum(int(c["loads"]) for c in counts),
        client_calls=sum(int(c["calls"]) for c in counts),
        worker_processes=len(counts),
        metrics=rows,
        summary=summary,
    )


@dataclass(frozen=True)
class CentralResult:
    """A plain single-process LoRA run on the union of the clients' data."""

    total_s: float  #: model load + tokenisation + training + evaluation
    train_s: float  #: the training steps only
    eval_s: float
    steps: int
    examples: int
    accuracy: float
    loss: float


def train_central(cfg: RunConfig, *, steps: int) -> CentralResult:
    """Train LoRA like one client would, but on every client's examples, in this process.

    Same base model, tokenizer, LoRA rank/alpha/targets, trainable head, batch size, lr and
    AdamW loop (``fedft.training.local.train_steps``) as the federation; evaluated on the
    same held-out test set.
    """
    from fedft import builders
    from fedft.adapters import peft_io
    from fedft.data import Records, build_federated_data
    from fedft.data.encode import batches, encode, eval_batches
    from fedft.models import default_target_modules, head_parameter_names, load_base_model
    from fedft.training.local import evaluate, resolve_device, train_steps

    t0 = time.perf_counter()
    fed = build_federated_data(**builders.data_kwargs(cfg))
    model, tok = load_base_model(
        cfg.model.name, task=cfg.model.task, num_labels=fed.num_labels, seed=cfg.seed
    )
    device = resolve_device(cfg.federation.device)
    model.to(device)  # type: ignore[arg-type]
    union = Records(
        text=[t for c in fed.clients for t in c.text],
        target=[y for c in fed.clients for y in c.target],  # type: ignore[arg-type]
        group=[g for c in fed.clients for g in c.group],
        label_names=fed.clients[0].label_names,
    )
    kw = {"task": cfg.model.task, "max_length": cfg.data.max_length}
    train, test = encode(union, tok, **kw), encode(fed.test, tok, **kw)  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = peft_io.attach_lora(
        model,
        target_modules=list(cfg.model.target_modules) or default_target_modules(model),
        rank=cfg.adapter.rank,
        alpha=cfg.adapter.alpha,
        dropout=cfg.adapter.dropout,
        extras=head_parameter_names(model, cfg.model.task),
        seed=cfg.seed,
    )
    t1 = time.perf_counter()
    train_steps(
        peft_model,
        batches(train, batch_size=cfg.federation.batch_size, steps=steps, seed=cfg.seed),
        lr=cfg.federation.lr,
        device=device,
    )
    t2 = time.perf_counter()
    ev = evaluate(
        peft_model,
        eval_batches(test, batch_size=cfg.federation.eval_batch_size, by_length=True),
        task=cfg.model.task,
        device=device,
    )
    t3 = time.perf_counter()
    return CentralResult(
        total_s=t3 - t0,
        train_s=t2 - t1,
        eval_s=t3 - t2,
        steps=steps,
        examples=len(train),
        accuracy=float(ev["accuracy"]),
        loss=float(ev["loss"]),
    )
