"""Framework overhead: a simulated federation doing N local steps vs a plain loop doing N.

Both sides train MiniLM + LoRA (rank 8, query/value, head) with the same AdamW loop
(``fedft.training.local.train_steps``), batch size, lr and data (the plain loop trains on the
union of the clients' examples). The federation runs on Flower's Simulation Engine with 2
Ray workers; the plain loop in this process. Measured one after the other in one run.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import DOC, Size, md_table, ratio_line, write_section
from bench.simrun import config, run_sim, train_central

logger = logging.getLogger(__name__)


def _overrides(*, rounds: int, steps: int, model: str) -> list[str]:
    return [
        f"model.name='{model}'",
        "federation.num_clients=10",
        "federation.clients_per_round=5",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "federation.batch_size=8",
        "federation.device='cpu'",
        "data.test_size=32",
    ]


def run(*, size: Size = "default", doc: Path | None = DOC, model: str = "minilm") -> list[str]:
    """Run the overhead benchmark; return its RATIO lines."""
    rounds, steps = {"smoke": (1, 2), "default": (2, 20), "full": (4, 40)}[size]
    cfg = config(_overrides(rounds=rounds, steps=steps, model=model))
    n = rounds * cfg.federation.clients_per_round * steps
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        fed = run_sim(cfg, Path(tmp))
    plain = train_central(cfg, steps=n)
    per_round_eval = plain.eval_s  # the server evaluates the same test set once per round
    rounds_ratio = fed.rounds_s / plain.train_s
    rounds_ratio_noeval = (fed.rounds_s - rounds * per_round_eval) / plain.train_s
    e2e_ratio = fed.wall_s / plain.total_s
    lines = [
        ratio_line(
            "overhead",
            f"federation/plain for N={n} steps: rounds {rounds_ratio:.2f} "
            f"({rounds_ratio_noeval:.2f} without per-round evaluation), end to end "
            f"{e2e_ratio:.2f}; target <= 1.2",
        )
    ]
    rows = [
        [
            "federation (Simulation Engine)",
            f"{fed.wall_s:.1f}",
            f"{fed.rounds_s:.1f}",
            f"{fed.rounds_s / n * 1e3:.0f}",
        ],
        [
            "plain loop (one process)",
            f"{plain.total_s:.1f}",
            f"{plain.train_s:.1f}",
            f"{plain.train_s / n * 1e3:.0f}",
        ],
        ["ratio", f"{e2e_ratio:.2f}", f"{rounds_ratio:.2f}", ""],
    ]
    body = (
        f"N = {n} local steps: {rounds} rounds x 5 clients x {steps} steps of batch 8 "
        f"(10 Dirichlet-{cfg.data.alpha:g} clients); the plain loop takes {n} steps of batch 8 "
        f"on the union of the same clients' {plain.examples} examples. *training s*: the "
        "federation's round wall times (metrics.jsonl: send, train, receive, aggregate, "
        "evaluate on 32 test examples, checkpoint) vs the plain loop's steps; *end to end*: "
        "`run_simulation` (Ray start, server load, discovery, rounds, report) vs load + "
        "tokenise + train + evaluate. "
        f"Per-round evaluation costs {per_round_eval:.1f} s (measured in the plain run); "
        f"without it the training-time ratio is {rounds_ratio_noeval:.2f}.\n\n"
        + md_table(["side", "end to end s", "training s", "ms per step"], rows)
        + "\n\n"
        + READING
    )
    write_section(
        "overhead",
        title="4. Framework overhead",
        command=f"python -m bench.overhead{' --full' if size == 'full' else ''}",
        body=body,
        doc=doc,
    )
    return lines


READING = """**Reading.** The round ratio compares the time spent in rounds with the time of the
same number of optimiser steps in one process: what remains is Flower's messaging, (de)serialising
adapters, attaching/detaching the peft adapter per client, aggregation, the per-round
evaluation and the checkpoint. The end-to-end ratio adds the fixed costs of a simulation
(starting Ray and its workers, loading the model in every worker and on the server), which
only amortise over longer runs (`--full` runs 4 rounds of 40 steps).
"""


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.overhead [--full|--smoke]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    run(size="full" if "--full" in args else "smoke" if "--smoke" in args else "default")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
