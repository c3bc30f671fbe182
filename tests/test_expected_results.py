"""Expected results as regression tests: one small seeded recipe per aggregation algorithm.

Each recipe runs the real server rounds (``server.federation.run_federation``) and the real
client code on the in-process grid of ``tests/local_grid.py`` (no Ray): a 1-layer, hidden-32
BERT (``tests/tiny_models.save_tiny_bert``) learns a synthetic sentiment task (every snippet
holds four cue words of its class among four neutral ones), 3 clients with Dirichlet(1.0)
label skew, all clients every round. The final test accuracy must fall in the band recorded
below and every round's ``agg_error`` under the algorithm's bound, so a change that silently
breaks learning or aggregation fails CI: an aggregator that hands back the old global model
stays at the untrained accuracy with ``agg_error`` 1
(``test_a_stale_aggregator_falls_out_of_the_band``).

How the bands were measured: ``python tests/test_expected_results.py`` runs every recipe at
seeds 0-4 and prints the final accuracy and the largest agg_error per seed (2026-12-02, CPU,
torch 1 thread; 35 runs, 59 s of CPU). Final accuracy per seed 0/1/2/3/4:

    fedit      0.995 0.995 0.985 0.925 0.985    max agg_error 0.175-0.509
    lora_fair  0.995 0.995 0.990 0.920 0.990    max agg_error 0.160-0.499
    fedex      1.000 0.980 0.990 0.965 0.990    max agg_error <= 1.1e-7
    flora      0.985 0.990 0.975 0.920 0.980    max agg_error <= 4.7e-8
    hetlora    1.000 0.990 0.980 0.835 1.000    max agg_error 0.277-0.725
    ffa        0.985 0.975 0.985 0.680 0.995    max agg_error <= 1.8e-7
    fedsb      1.000 0.990 0.965 0.840 0.980    max agg_error <= 2.0e-7

The test runs seed 0 (untrained accuracy 0.475; majority class of its test set 0.525).
``low`` is the smallest final accuracy over the five seeds minus 0.05 (room for a legitimate
change of float or data order), but never below 0.675 = majority + 0.15 (ffa's seed 3,
0.680, would otherwise put it there), where a model that does not learn cannot reach.
``max_error``: 1e-5 for the exact algorithms; for the inexact ones the largest value over
the five seeds plus half of it, capped at 0.95 (a stale aggregator gives exactly 1.0).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # local_grid, tiny_models: run as a script too

from local_grid import LocalGrid  # noqa: E402
from tiny_models import save_tiny_bert  # noqa: E402


@dataclass(frozen=True)
class Recipe:
    """One algorithm's settings and its recorded band (see the module docstring)."""

    sets: dict[str, Any]
    low: float  # final test accuracy must be >= low
    max_error: float  # every round's agg_error must be <= max_error


COMMON = {
    "data.max_train_examples": 600,
    "data.test_size": 200,
    "data.public_size": 16,
    "data.partition": "'dirichlet'",
    "data.alpha": 1.0,
    "data.max_length": 16,
    "federation.num_clients": 3,
    "federation.clients_per_round": 3,
    "federation.local_steps": 10,
    "federation.batch_size": 16,
    "federation.device": "'cpu'",
    "federation.eval_batch_size": 200,
}
FACTORS = {"federation.rounds": 4, "federation.lr": 0.03, "adapter.rank": 4}
MIXED = {**FACTORS, "adapter.ranks": "[2, 4, 8]"}
ONE_FACTOR = {"federation.rounds": 5, "federation.lr": 0.1, "adapter.rank": 16}

RECIPES: dict[str, Recipe] = {
    "fedit": Recipe(FACTORS, low=0.875, max_error=0.76),
    "lora_fair": Recipe(FACTORS, low=0.87, max_error=0.75),
    "fedex": Recipe(FACTORS, low=0.915, max_error=1e-5),
    "flora": Recipe(MIXED, low=0.87, max_error=1e-5),
    "hetlora": Recipe(MIXED, low=0.785, max_error=0.95),
    "ffa": Recipe(ONE_FACTOR, low=0.675, max_error=1e-5),
    "fedsb": Recipe(ONE_FACTOR, low=0.79, max_error=1e-5),
}

POSITIVE = ("good", "great", "fine", "superb", "lovely")
NEGATIVE = ("bad", "awful", "poor", "dull", "boring")
NEUTRAL = tuple("the movie film plot actor scene story time music end start".split())


def write_cues_csv(path: Path, *, examples: int = 1200) -> Path:
    """The synthetic task: six neutral words and two cue words of the label, shuffled."""
    rng = random.Random(0)
    lines = ["text,label"]
    for i in range(examples):
        label = i % 2
        words = rng.choices(NEUTRAL, k=4) + rng.choices(POSITIVE if label else NEGATIVE, k=4)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{'pos' if label else 'neg'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_recipe(algorithm: str, *, model: Path, data: Path, out: Path, seed: int = 0) -> list[dict]:
    """Run ``algorithm``'s recipe once; return its metrics.jsonl rows."""
    import torch

    from fedft.config import load_config
    from fedft.training import runtime
    from server.federation import run_federation

    sets = {
        **COMMON,
        **RECIPES[algorithm].sets,
        "model.name": f"'{model}'",
        "data.dataset": f"'{data}'",
        "aggregation.algorithm": f"'{algorithm}'",
        "seed": seed,
    }
    cfg = load_config(None, [f"{k}={v}" for k, v in sets.items()])
    # in process the clients train the server's cached model object, whose head keeps the
    # last client's values after a run: start every recipe from the saved model
    runtime._RUNTIMES.clear()
    runtime._ENCODED.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only wait for each other
    try:
        run_federation(LocalGrid(cfg), cfg, out, progress=False)
    finally:
        torch.set_num_threads(threads)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    root = tmp_path_factory.mktemp("expected")
    model = Path(save_tiny_bert(root / "tiny1", layers=1, max_positions=64, dropout=False))
    yield model, write_cues_csv(root / "cues.csv")


def _check(algorithm: str, rows: list[dict]) -> None:
    recipe = RECIPES[algorithm]
    final = rows[-1]["accuracy"]
    errors = [r["agg_error"] for r in rows[1:]]
    assert final >= recipe.low, f"{algorithm}: final accuracy {final} below its band {recipe.low}"
    assert max(errors) <= recipe.max_error, f"{algorithm}: agg_error {errors}"


@pytest.mark.parametrize("algorithm", list(RECIPES))
def test_recipe_lands_in_its_band(algorithm: str, task, tmp_path: Path) -> None:
    model, data = task
    rows = run_recipe(algorithm, model=model, data=data, out=tmp_path / algorithm)
    assert rows[0]["accuracy"] < RECIPES[algorithm].low - 0.15  # it had to learn
    assert len(rows) == 1 + RECIPES[algorithm].sets["federation.rounds"]
    _check(algorithm, rows)


def test_a_stale_aggregator_falls_out_of_the_band(
    task, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FedIT that hands back the global model it started the round from fails the check."""
    from fedft.aggregation.fedavg import FedIT
    from fedft.types import AggregationResult

    seen: dict[str, Any] = {}

    def remember(self, global_adapters, *, extras=None):  # noqa: ANN001, ANN202
        seen["adapters"], seen["extras"] = dict(global_adapters), dict(extras or {})

    def stale(self, updates):  # noqa: ANN001, ANN202
        return AggregationResult(adapters=seen["adapters"], extras=seen["extras"])

    monkeypatch.setattr(FedIT, "set_reference", remember)
    monkeypatch.setattr(FedIT, "aggregate", stale)
    model, data = task
    rows = run_recipe("fedit", model=model, data=data, out=tmp_path / "stale")
    assert [r["agg_error"] for r in rows[1:]] == pytest.approx([1.0] * 4, abs=1e-9)
    with pytest.raises(AssertionError, match="below its band"):
        _check("fedit", rows)


def _measure(seeds: range) -> None:
    """Print every recipe's final accuracy and largest agg_error per seed (the bands' source)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = Path(save_tiny_bert(root / "tiny1", layers=1, max_positions=64, dropout=False))
        data = write_cues_csv(root / "cues.csv")
        for algorithm in RECIPES:
            for seed in seeds:
                rows = run_recipe(
                    algorithm, model=model, data=data, out=root / f"{algorithm}-{seed}", seed=seed
                )
                errors = [r["agg_error"] for r in rows[1:]]
                print(
                    f"{algorithm:9s} seed {seed}: accuracy {rows[0]['accuracy']:.3f} -> "
                    f"{rows[-1]['accuracy']:.3f}, max agg_error {max(errors):.3g}",
                    flush=True,
                )


if __name__ == "__main__":
    _measure(range(5))


@pytest.mark.slow
def test_quickstart_leaves_the_majority_class(tmp_path: Path) -> None:
    """The real recipe: ``make simulate``'s config (MiniLM, 10 Dirichlet-2.0 clients, FedIT).

    Measured once on 2026-12-02 with ``fedft simulate simulations/quickstart.toml`` (seed 0,
    deterministic: the README's table again): accuracy per round 0.584 0.584 0.586 0.584
    0.774 0.710 (majority class 0.584), agg_error 0.348 0.401 0.243 0.135 0.118 0.107,
    3,079 s at load 19-35 (185 s on a quiet machine). Bands: the best round must leave the
    majority class by 0.1 and the last stay >= 0.65; agg_error between 0.05 and 0.6 in every
    round (FedIT is inexact here; an aggregator that returned the old global gives 1.0).
    """
    from fedft.config import load_config
    from simulations.simulate import simulate

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "simulations" / "quickstart.toml", ["federation.device='cpu'"])
    simulate(cfg, tmp_path / "quickstart", progress=False)
    rows = [
        json.loads(line)
        for line in (tmp_path / "quickstart" / "metrics.jsonl").read_text().splitlines()
    ]
    accuracy = [r["accuracy"] for r in rows[1:]]
    assert len(accuracy) == 6
    assert max(accuracy) >= 0.684 and accuracy[-1] >= 0.65, accuracy
    errors = [r["agg_error"] for r in rows[1:]]
    assert all(0.05 <= e <= 0.6 for e in errors), errors
