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
from collections.abc import Sequence
from pathlib import Path

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
    "run_federation (whole server)": ("strategy.py", "run_federation"),
    "load model + data on the server": ("runtime.py", "get_runtime"),
    "discover clients (query)": ("strategy.py", "discover_clients"),
    "wait for client replies (send_and_receive)": ("strategy.py", "_collect"),
    "encode start messages (serde)": ("serde.py", "start_to_recorddict"),
    "aggregate": ("coordinator.py", "aggregate"),
    "evaluate global model": ("runtime.py", "evaluate_global"),
    "checkpoint": ("checkpoint.py", "save_checkpoint"),
    "final adapter + report": ("strategy.py", "_finish"),
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


def run(*, size: Size = "default", doc: Path | None = DOC, model: str = "minilm") -> list[str]:
    """Run the profile; return its RATIO lines."""
    rounds, steps = {"smoke": (1, 2), "default": (2, 20), "full": (4, 20)}[size]
    client, server, top_c, top_s, rounds_s = profile(
        rounds=rounds, steps=steps, model=model, tag="default"
    )
    total_c = client["train_round (whole client call)"] or 1.0
    train = client["local training (train_steps)"]
    lines = [
        ratio_line(
            "profile_sim",
            f"client calls spend {train / total_c:.0%} of their time in train_steps; "
            f"server rounds {rounds_s:.1f} s, evaluation {server['evaluate global model']:.1f} s",
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
    )
    write_section(
        "profile_sim",
        title="7. Where a round's time goes (profile of the default simulation)",
        command=f"python -m bench.profile_sim{' --full' if size == 'full' else ''}",
        body=body,
        doc=doc,
    )
    return lines


READING = """**Reading.** See the fix subsection below for the biggest avoidable cost found."""


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.profile_sim [--full|--smoke]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    run(size="full" if "--full" in args else "smoke" if "--smoke" in args else "default")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
