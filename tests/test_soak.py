"""Soak: 100 simulated clients, 20 rounds, 20% random dropouts per round (slow).

Every client is sampled every round; each (round, client) crashes with probability 0.2
from a seeded hash (tests/test_faults_apps.py). The run must complete with a metrics line
for every round, each counting exactly the clients that did not drop. Wall time and the
peak resident memory of this process and its children (Ray workers) are printed for
docs/results.md.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psutil
import pytest
from test_faults_apps import dropped, fault_client_app, metrics_rows, run_sim, tiny_config

ROUNDS = 20
CLIENTS = 100
DROP = 0.2


class _PeakRss:
    """Samples the summed RSS of this process and all its descendants every 0.5 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(0.5)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_soak_100_clients_20_rounds_20pct_dropouts(tiny_bert_dir: str, tmp_path: Path) -> None:
    cfg = tiny_config(
        tiny_bert_dir,
        **{
            "data.max_train_examples": 400,
            "federation.num_clients": CLIENTS,
            "federation.clients_per_round": CLIENTS,
            "federation.rounds": ROUNDS,
            "federation.local_steps": 1,
            "federation.min_replies": 50,
        },
    )
    out = tmp_path / "run"
    t0 = time.monotonic()
    with _PeakRss() as mem:
        summary = run_sim(cfg, out, fault_client_app(cfg, drop_rate=DROP, drop_seed=7))
    wall = time.monotonic() - t0
    rows = metrics_rows(out)
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    expected = [
        sum(not dropped(7, rnd, i, DROP) for i in range(CLIENTS)) for rnd in range(1, ROUNDS + 1)
    ]
    assert [r["clients"] for r in rows[1:]] == expected
    assert all(not r.get("failed") for r in rows[1:])
    assert summary["rounds"] == ROUNDS and summary["failed_rounds"] == 0
    round_s = [r["wall_s"] for r in rows[1:]]
    print(
        f"soak: {CLIENTS} clients x {ROUNDS} rounds, dropouts per round "
        f"{[CLIENTS - e for e in expected]}, wall {wall:.0f} s, rounds "
        f"{sum(round_s):.0f} s (max {max(round_s):.1f} s), peak RSS {mem.peak / 2**30:.2f} GiB, "
        f"accuracy {rows[0]['accuracy']:.3f} -> {rows[-1]['accuracy']:.3f}"
    )
