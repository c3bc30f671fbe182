"""Quality: federated LoRA on the default non-IID task vs centralised LoRA, same data and steps.

Federated: ``simulations/quickstart.toml`` (MiniLM, Rotten Tomatoes fresh vs rotten, 10
clients with Dirichlet(2.0) label skew, 5 per round, FedIT). Centralised: the same LoRA,
head, batch size, lr and AdamW loop on the union of the 10 clients' examples, for as many
optimiser steps as the federation took in total (rounds x clients per round x local
steps). Both are evaluated on the same held-out test set.
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


def _overrides(*, rounds: int, steps: int, model: str, test_size: int) -> list[str]:
    return [
        f"model.name='{model}'",
        f"federation.rounds={rounds}",
        f"federation.local_steps={steps}",
        "federation.device='cpu'",
        f"data.test_size={test_size}",
    ]


def run(*, size: Size = "default", doc: Path | None = DOC, model: str = "minilm") -> list[str]:
    """Run the quality benchmark; return its RATIO lines."""
    rounds, steps, test_size = {
        "smoke": (1, 2, 32),
        "default": (4, 10, 500),
        "full": (8, 20, 500),
    }[size]
    cfg = config(_overrides(rounds=rounds, steps=steps, model=model, test_size=test_size))
    n = rounds * cfg.federation.clients_per_round * steps
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        fed = run_sim(cfg, Path(tmp))
    central = train_central(cfg, steps=n)
    fed_acc = float(fed.summary["after"]["accuracy"])
    before = float(fed.summary["before"]["accuracy"])
    ratio = fed_acc / central.accuracy
    lines = [
        ratio_line(
            "quality",
            f"federated/centralised test accuracy = {fed_acc:.4f}/{central.accuracy:.4f} = "
            f"{ratio:.3f} after {n} steps; target >= 0.95",
        )
    ]
    rows = [
        ["before training", f"{before:.4f}", ""],
        [
            f"federated FedIT ({rounds} rounds x 5 clients x {steps} steps)",
            f"{fed_acc:.4f}",
            f"{float(fed.summary['after']['loss']):.4f}",
        ],
        [f"centralised ({n} steps)", f"{central.accuracy:.4f}", f"{central.loss:.4f}"],
        ["ratio federated / centralised", f"{ratio:.3f}", ""],
    ]
    body = (
        f"MiniLM + LoRA r=8 (query/value) + head, batch {cfg.federation.batch_size}, lr "
        f"{cfg.federation.lr}, {n} optimiser steps on each side, test set of {test_size} "
        f"examples; the clients hold {central.examples} training examples in all.\n\n"
        + md_table(["run", "test accuracy", "test loss"], rows)
        + "\n\n"
        + READING
    )
    write_section(
        "quality",
        title="6. Quality: federated vs centralised LoRA",
        command=f"python -m bench.quality{' --full' if size == 'full' else ''}",
        body=body,
        doc=doc,
    )
    return lines


READING = """**Reading.** With Dirichlet(0.5) label skew each client's local steps pull towards its
own label mix; FedIT averages A and B separately (inexact for the product BA). The
centralised run sees the same examples, shuffled together, for the same number of steps,
so the ratio isolates the cost of federating (client drift + factor averaging + only 5 of
10 clients per round).
"""


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.quality [--full|--smoke]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    run(size="full" if "--full" in args else "smoke" if "--smoke" in args else "default")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
