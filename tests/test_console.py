"""The console of ``fedft simulate``: fedft's own lines only; third-party logs in run.log."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedft.reporting.metrics import round_line

ROOT = Path(__file__).resolve().parents[1]

#: what third-party libraries print during a simulation when nobody routes it
THIRD_PARTY = re.compile(
    r"alembic|flwr|DEBUG|INFO|DEPRECATED|Warning|warnings\.warn|ClientAppActor|pid=|"
    r"Loading weights|ray|Traceback",
    re.IGNORECASE,
)


def _tiny_sets(model_dir: str) -> list[str]:
    sets = [
        f"model.name='{model_dir}'",
        "data.max_train_examples=120",
        "data.test_size=32",
        "data.public_size=8",
        "federation.num_clients=2",
        "federation.clients_per_round=2",
        "federation.rounds=2",
        "federation.local_steps=2",
        "federation.batch_size=8",
        "federation.device='cpu'",
        "adapter.rank=2",
    ]
    return [a for s in sets for a in ("--set", s)]


def _fedft(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("FEDFT_RUN_LOG", None)
    return subprocess.run(
        [sys.executable, "-m", "fedft.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def _console_lines(text: str) -> list[str]:
    """Console lines without the progress bar's redraws."""
    lines = []
    for raw in text.replace("\r", "\n").splitlines():
        line = raw.strip()
        if line and not re.search(r"\|[^|]*\|\s*\d+/\d+ \[", line) and "round/s" not in line:
            lines.append(line)
    return lines


def test_simulate_console_is_quiet_and_run_log_has_the_rest(tiny_bert_dir, tmp_path):
    out = tmp_path / "run"
    proc = _fedft(
        "simulate", "simulations/quickstart.toml", "--out", str(out), *_tiny_sets(tiny_bert_dir)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # stdout: the partition table, then the summary; stderr: what runs, the rounds
    lines = _console_lines(proc.stderr) + _console_lines(proc.stdout)[-2:]
    noisy = [line for line in lines if THIRD_PARTY.search(line.replace(tiny_bert_dir, "MODEL"))]
    assert not noisy, noisy
    # what runs, one line per round (0 = before training), the summary and the outputs
    assert lines[0].startswith("quickstart: model ") and "aggregation fedit" in lines[1]
    rounds = [line for line in lines if line.startswith("round ")]
    assert [r.split(":")[0] for r in rounds] == ["round 0", "round 1", "round 2"]
    assert "test accuracy" in lines[-2] and f"outputs in {out}/" in lines[-1]
    assert lines[2].startswith("data: 2 clients with")
    assert len(lines) == 3 + 3 + 2, lines
    log = (out / "run.log").read_text()
    # the third-party lines the console left out are in run.log, from the driver and actors
    assert "alembic" in log
    assert "DEPRECATED FEATURE" in log  # Flower's run_simulation banner
    assert "DEBUG flwr" in log
    assert "FutureWarning" in log
    assert re.search(r"\[actor \d+\]", log), "nothing from the Ray actors reached run.log"


@pytest.mark.slow
def test_verbose_shows_third_party_lines(tiny_bert_dir, tmp_path):
    proc = _fedft(
        "simulate",
        "simulations/quickstart.toml",
        "-v",
        "--out",
        str(tmp_path / "run"),
        *_tiny_sets(tiny_bert_dir),
        "--set",
        "federation.rounds=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEBUG flwr" in proc.stderr and "alembic" in proc.stderr


def test_a_run_that_fails_is_one_line_and_nonzero(tmp_path):
    missing = tmp_path / "no-such-model"
    out = tmp_path / "run"
    proc = _fedft(
        "simulate",
        "simulations/quickstart.toml",
        "--out",
        str(out),
        "--set",
        f"model.name='{missing}'",
    )
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    problem = [line for line in _console_lines(text) if "no-such-model" in line]
    assert problem and problem[-1].startswith("fedft"), text[-2000:]


def test_round_line_has_the_metric_traffic_and_epsilon():
    line = round_line(
        {
            "round": 3,
            "accuracy": 0.71234,
            "loss": 0.5,
            "clients": 5,
            "bytes_up": 1_234_567,
            "bytes_down": 2_000,
            "epsilon": 2.5,
            "wall_s": 8.14,
        }
    )
    assert line == (
        "round 3:  accuracy 0.7123  loss 0.5000  clients 5  up 1.2 MB  down 2.0 kB  eps 2.5  8.1 s"
    )


def test_console_filter_keeps_own_warnings_and_marked_lines(capsys):
    import io

    from fedft.console import setup_console

    stream = io.StringIO()
    try:
        setup_console(verbose=False, stream=stream)
        logging.getLogger("flwr").warning("third-party warning")
        logging.getLogger("alembic.runtime").info("setup plugin")
        logging.getLogger("fedft.x").info("own info")
        logging.getLogger("fedft.x").warning("own warning")
        logging.getLogger("server.strategy").info("a round", extra={"console": True})
        try:
            raise RuntimeError("boom")
        except RuntimeError as exc:
            logging.getLogger("server.app").error("the run failed", exc_info=exc)
    finally:
        logging.getLogger().handlers.clear()
        logging.captureWarnings(False)
    assert stream.getvalue().splitlines() == ["warning: own warning", "a round"]


@pytest.mark.parametrize("argv", [["simulate", "missing.toml"], ["simulate", "--bogus"]])
def test_user_mistakes_exit_nonzero_without_traceback(argv):
    proc = _fedft(*argv, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 3
