"""Profile the default simulation: where does a round's time go?

Runs ``simulations/quickstart.toml`` (MiniLM, 10 clients, 5 per round, 20 local steps of
batch 16; fewer rounds) with cProfile on both sides: around ``run_federation`` in the
ServerApp thread, and around every ``train_round`` in the client worker processes
(:mod:`bench.simrun`). Prints and writes the time of the main stages (cumulative time of
the named functions, summed over processes) and the top functions by own time.
"""

from __future__ import annotations

import logging
import pstats
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import DOC, Size, md_table, ratio_line, write_section
from bench.simrun import config, run_sim

logger = logging.getLogger(__name__)

#: stage label -> (file suffix, function name) whose cumulative time is the stage's time.
CLIENT_STAGES = {
    "train_round (whole client call)": ("client/app.py", "train_round"),
    "decode start message (serde)": ("serde.py", "start_from_recorddict"),
    "first-call loads (model, data, tokenise)": ("runtime.py", "get_runtime"),
    "attach LoRA (peft get_peft_model)": ("peft_io.py", "attach_lora"),
    "set factors + extras": ("peft_io.py", "set_factors"),
    "local training (train_steps)": ("local.py", "train_steps"),
    "  of which forward": ("module.py", "_call_impl"),
    "  of which backward": ("_tensor.py", "backward"),
    "  of which optimizer step": ("optimizer.py", "wrapper"),
    "detach LoRA": ("peft_io.py", "detach_lora"),
    "encode reply (serde)": ("serde.py", "update_to_recorddict"),
}
SERVER_STAGES = {
    "run_federation (whole server)": ("federation.py", "run_federation"),
    "load model + data on the server": ("runtime.py", "get_runtime"),
    "discover clients (query)": ("federation.py", "discover_clients"),
    "wait for client replies (send_and_receive)": ("collect.py", "collect_plain"),
    "encode start messages (serde)": ("serde.py", "start_to_recorddict"),
    "aggregate": ("coordinator.py", "aggregate"),
    "evaluate global model": ("runtime.py", "evaluate_global"),
    "checkpoint": ("checkpoint.py", "save_checkpoint"),
    "final adapter + report": ("federation.py", "finish"),
}


def stage_times(stats: pstats.Stats, stages: dict[str, tuple[str, str]]) -> dict[str, float]:
    """Cumulative seconds of each stage's function (max over matching entries)."""
    raw = stats.stats  # type: ignore[attr-defined]
    out = {}
    for label, (suffix, func) in stages.items():
        times = [
            ct
            for (file, _line, name), (_cc, _nc, _tt, ct, _callers) in raw.items()
            if name == func and file.endswith(suffix)
        ]
        out[label] = max(times, default=0.0)
    return out


def top_own(stats: pstats.Stats, n: int) -> list[list[str]]:
    """The ``n`` functions with the most own (exclusive) time."""
    raw = stats.stats  # type: ignore[attr-defined]
    items = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:n]
    rows = []
    for (file, line, name), (_cc, nc, tt, ct, _callers) in items:
        short = "/".join(Path(file).parts[-2:]) if file != "~" else "builtin"
        rows.append([f"`{name}` ({short}:{line})", str(nc), f"{tt:.2f}", f"{ct:.2f}"])
    return rows


def profile(
    *, rounds: int, steps: int, model: str, tag: str
) -> tuple[dict, dict, list, list, float]:
    """Run once; return client stages, server stages, top rows and the rounds' wall time."""
    cfg = config(
        [
            f"model.name='{model}'",
            f"federation.rounds={rounds}",
            f"federation.local_steps={steps}",
            "federation.device='cpu'",
        ]
    )
    with tempfile.TemporaryDirectory(prefix=f"bench-profile-{tag}-") as tmp:
        out = Path(tmp)
        res = run_sim(
            cfg, out / "sim", profile_dir=out / "client", server_profile=out / "server.prof"
        )
        client = pstats.Stats(*[str(p) for p in sorted((out / "client").glob("*.prof"))])
        server = pstats.Stats(str(out / "server.prof"))
    return (
        stage_times(client, CLIENT_STAGES),
        stage_times(server, SERVER_STAGES),
        top_own(client, 12),
        top_own(server, 8),
        res.rounds_s,
    )


def eval_order_cost(*, model: str, test_size: int, repeats: int) -> dict[str, Any]:
    """The server's global evaluation with batches in dataset order vs ordered by length.

    Same model, test set and batch size; the two orders run interleaved, best of
    ``repeats``. Returns both times, widths (padded tokens per example) and metrics.
    """
    import torch

    from fedft import builders
    from fedft.data import build_federated_data
    from fedft.data.encode import encode, eval_batches
    from fedft.models import load_base_model
    from fedft.training.local import evaluate

    cfg = config([f"model.name='{model}'", f"data.test_size={test_size}"])
    fed = build_federated_data(**builders.data_kwargs(cfg))
    net, tok = load_base_model(
        cfg.model.name, task=cfg.model.task, num_labels=fed.num_labels, seed=cfg.seed
    )
    test = encode(fed.test, tok, task=cfg.model.task, max_length=cfg.data.max_length)  # type: ignore[arg-type]
    bs, cpu = cfg.federation.eval_batch_size, torch.device("cpu")
    best = {False: float("inf"), True: float("inf")}
    metrics: dict[bool, dict[str, float]] = {}
    for _ in range(max(repeats, 1)):
        for by_length in (False, True):
            t0 = time.perf_counter()
            metrics[by_length] = evaluate(
                net,
                eval_batches(test, batch_size=bs, by_length=by_length),
                task=cfg.model.task,
                device=cpu,
            )
            best[by_length] = min(best[by_length], time.perf_counter() - t0)
    width = {
        o: sum(int(b["input_ids"].numel()) for b in eval_batches(test, batch_size=bs, by_length=o))
        / len(test)
        for o in (False, True)
    }
    return {"examples": len(test), "batch": bs, "time": best, "width": width, "metrics": metrics}


def run(*, size: Size = "default", doc: Path | None = DOC, model: str = "minilm") -> list[str]:
    """Run the profile; return its RATIO lines."""
    rounds, steps = {"smoke": (1, 2), "default": (2, 20), "full": (4, 20)}[size]
    client, server, top_c, top_s, rounds_s = profile(
        rounds=rounds, steps=steps, model=model, tag="default"
    )
    fix = eval_order_cost(
        model=model, test_size=32 if size == "smoke" else 500, repeats=1 if size == "smoke" else 3
    )
    t_in, t_len = fix["time"][False], fix["time"][True]
    total_c = client["train_round (whole client call)"] or 1.0
    train = client["local training (train_steps)"]
    lines = [
        ratio_line(
            "profile_sim",
            f"client calls spend {train / total_c:.0%} of their time in train_steps; "
            f"server rounds {rounds_s:.1f} s, evaluation {server['evaluate global model']:.1f} s; "
            f"evaluation batches by length {t_in / t_len:.2f}x faster than in dataset order",
        )
    ]
    crow = [[k, f"{v:.2f}", f"{v / total_c:.1%}"] for k, v in client.items()]
    total_s = server["run_federation (whole server)"] or 1.0
    srow = [[k, f"{v:.2f}", f"{v / total_s:.1%}"] for k, v in server.items()]
    body = (
        f"`simulations/quickstart.toml` with {rounds} rounds of 5 clients x {steps} local "
        "steps of batch 16 (test set 500), cProfile in the ServerApp and around every client "
        "call in the 2 Ray workers (cProfile adds overhead to Python-heavy code; torch "
        "kernels are not slowed). Client times are summed over the "
        f"{rounds * 5} client calls.\n\n**Client side** (seconds, share of the client "
        "calls):\n\n"
        + md_table(["stage", "s", "share"], crow)
        + "\n\n**Server side** (seconds, share of `run_federation`):\n\n"
        + md_table(["stage", "s", "share"], srow)
        + "\n\n**Top client functions by own time:**\n\n"
        + md_table(["function", "calls", "own s", "cumulative s"], top_c)
        + "\n\n**Top server functions by own time:**\n\n"
        + md_table(["function", "calls", "own s", "cumulative s"], top_s)
        + "\n\n"
        + READING
        + "\n\n"
        + _fix_section(fix)
    )
    write_section(
        "profile_sim",
        title="7. Where a round's time goes (profile of the default simulation)",
        command=f"python -m bench.profile_sim{' --full' if size == 'full' else ''}",
        body=body,
        doc=doc,
    )
    return lines


READING = """**Reading.** A client call is almost all forward and backward passes of the
local steps: decoding, attaching and detaching the adapter and encoding the reply are below
1 % together, so no client-side cost is avoidable short of a cheaper model. On the server,
after waiting for the clients (their training), the largest share is evaluating the global
model on the test set after every round, which the clients wait for: that is the cost
fixed below. Discovery (the first query, which starts the workers and loads the model in
each) is paid once per run."""


def _fix_section(fix: dict[str, Any]) -> str:
    t_in, t_len = fix["time"][False], fix["time"][True]
    m_in, m_len = fix["metrics"][False], fix["metrics"][True]
    rows = [
        [
            "dataset order (before)",
            f"{fix['width'][False]:.1f}",
            f"{t_in:.2f}",
            f"{m_in['accuracy']:.4f}",
            f"{m_in['loss']:.6f}",
        ],
        [
            "ordered by length (after)",
            f"{fix['width'][True]:.1f}",
            f"{t_len:.2f}",
            f"{m_len['accuracy']:.4f}",
            f"{m_len['loss']:.6f}",
        ],
    ]
    return (
        "### 7b. The fix: evaluation batches ordered by length (before/after)\n\n"
        f"The global evaluation ({fix['examples']} test examples, batch {fix['batch']}) cut "
        "each batch after its longest sequence, but batches held examples in dataset "
        "order, so most batches held one of the longest snippets and were padded to its "
        "length. `eval_batches(..., by_length=True)` (what the server's evaluation "
        "uses now) groups examples of similar length; metrics are sums over examples, so "
        "they do not change. Untrained MiniLM, same process, the two orders interleaved, best "
        "of 3:\n\n"
        + md_table(["batches", "tokens per example", "evaluation s", "accuracy", "loss"], rows)
        + f"\n\n**{t_in / t_len:.2f}x faster evaluation** with the same accuracy and loss."
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.profile_sim [--full|--smoke]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    run(size="full" if "--full" in args else "smoke" if "--smoke" in args else "default")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
