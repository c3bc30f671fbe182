"""Flower's supported simulation path (``flwr run`` on a ``--simulation`` SuperLink) and
``fedft simulate`` (``run_simulation``) give the same run: the README's reason for keeping
``run_simulation`` rests on this comparison (``bench/sim_paths.py``)."""

from __future__ import annotations

import pytest

from bench import sim_paths


@pytest.mark.slow
def test_flwr_run_and_fedft_simulate_give_the_same_metrics(tiny_bert_dir, tmp_path):
    sets = sim_paths._sets(size="smoke", model=tiny_bert_dir)
    ours = sim_paths.run_fedft_simulate(sets, tmp_path / "sim")
    flwr = sim_paths.run_flwr(sets, tmp_path / "flwr")
    assert [r["round"] for r in ours.rows] == [0, 1]
    assert sim_paths._metric(flwr.rows) == sim_paths._metric(ours.rows)
    assert flwr.rows[1]["clients"] == ours.rows[1]["clients"] == 2
    assert ours.wall_s > 0 and flwr.wall_s > 0
