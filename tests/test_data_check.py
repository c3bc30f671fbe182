"""Bad data input is refused before any work: exit 2, one line, by every command that runs.

The cases and the table of docs/errors.md come from ``scripts/gen_errors_doc.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedft.data.check import DataError, check_data
from scripts import gen_errors_doc as gen

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = (("server",), ("compare",), ("privacy", "plan"))


@pytest.fixture
def nothing_heavy_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every recipe that would start Ray, a SuperLink or a model fail loudly."""
    import server.deploy
    import simulations.compare
    import simulations.simulate

    def started(*args: object, **kwargs: object) -> None:
        raise AssertionError("a run started before the data was checked")

    monkeypatch.setattr(simulations.simulate, "simulate", started)
    monkeypatch.setattr(simulations.compare, "compare", started)
    monkeypatch.setattr(server.deploy, "run_server", started)


def test_errors_doc_table_is_what_the_cases_print_today(nothing_heavy_starts: None) -> None:
    doc = gen.DOC.read_text(encoding="utf-8")
    assert gen.updated(doc, gen.render()) == doc, "run: python scripts/gen_errors_doc.py"
    assert len(gen.CASES) >= 20
    assert "docs/errors.md" in (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.mark.parametrize("case", gen.CASES, ids=[c.what for c in gen.CASES])
def test_every_command_refuses_each_case_with_one_line_and_exit_2(
    case: gen.Case, nothing_heavy_starts: None
) -> None:
    code, err = gen.run_case(case, ("simulate",))
    assert code == 2 and err.startswith("fedft: data error: ") and "\n" not in err
    assert "Traceback" not in err
    for sub in COMMANDS:
        assert gen.run_case(case, sub) == (code, err), sub


def test_a_refusal_prints_one_line_and_starts_no_ray(tmp_path: Path) -> None:
    """The real command line in a fresh interpreter: one stderr line, exit 2, Ray not imported."""
    probe = (
        "import sys; from fedft.cli import main; code = main(sys.argv[1:]); "
        "assert 'ray' not in sys.modules, 'ray was imported'; sys.exit(code)"
    )
    argv = ["simulate", str(gen.CONFIG), "--set", "data.partition=natural"]
    argv += ["--set", "federation.num_clients=600"]
    proc = subprocess.run(
        [sys.executable, "-c", probe, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and "600 clients" in lines[0] and "federation" not in proc.stdout


def test_good_data_passes_and_is_the_runs_own_split() -> None:
    from fedft.data import build_federated_data

    kwargs = {
        "dataset": "rotten_tomatoes",
        "task": "classification",
        "partition": "dirichlet",
        "alpha": 2.0,
        "num_clients": 10,
        "test_size": 500,
        "public_size": 64,
        "max_train_examples": 0,
        "seed": 0,
    }
    fed = check_data(**kwargs)
    assert fed is build_federated_data(**kwargs)  # memoised: the run reuses it
    assert len(fed.clients) == 10 and min(len(c) for c in fed.clients) > 0


def test_unreadable_file_names_the_path(tmp_path: Path) -> None:
    folder = tmp_path / "data.csv"
    folder.mkdir()  # a folder with a data file's name
    with pytest.raises(DataError, match="data.csv"):
        check_data(
            dataset=str(folder), task="classification", partition="iid", alpha=1.0,
            num_clients=2, test_size=1, public_size=0, max_train_examples=0, seed=0,
        )  # fmt: skip
