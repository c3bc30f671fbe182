"""Benchmarks: each smallest setting runs and prints its ratio line; the helpers and the
references compute what they claim (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from bench import aggregation_cost as agg_bench
from bench import comm, md_table, peak_rss, write_section

ALGS = comm.ALGORITHMS


def test_write_section_replaces_in_place_and_keeps_order(tmp_path):
    doc = tmp_path / "b.md"
    write_section("quality", title="Q", command="c1", body="first", doc=doc)
    write_section("comm", title="C", command="c2", body="comm body", doc=doc)
    write_section("quality", title="Q", command="c3", body="second", doc=doc)
    text = doc.read_text()
    assert text.count("<!-- bench:quality -->") == 1
    assert "second" in text and "first" not in text
    assert text.index("bench:comm") < text.index("bench:quality")  # SECTIONS order
    assert "nproc=" in text and "Command: `c3`" in text


def test_write_section_keeps_a_hand_written_tail(tmp_path):
    doc = tmp_path / "b.md"
    write_section("comm", title="C", command="c", body="comm body", doc=doc)
    doc.write_text(doc.read_text() + "\n## 12. Written by hand\n\nkept text\n")
    write_section("sim_paths", title="S", command="c", body="paths body", doc=doc)
    write_section("comm", title="C", command="c", body="new comm body", doc=doc)
    text = doc.read_text()
    assert text.count("kept text") == 1 and text.rstrip().endswith("kept text")
    assert text.index("bench:comm") < text.index("bench:sim_paths") < text.index("## 12.")
    assert "new comm body" in text and "paths body" in text


def test_md_table_shape():
    t = md_table(["a", "b"], [["1", "2"], ["3", "4"]]).splitlines()
    assert len(t) == 4 and t[1] == "|---|---|"


def test_peak_rss_sees_a_large_allocation():
    with peak_rss() as mem:
        x = torch.ones(32 * 2**20 // 4 * 4)  # 128 MiB of float32, touched
        assert float(x[-1]) == 1.0
        del x
    assert mem.delta_mib > 100


@pytest.mark.parametrize("algorithm", ALGS)
def test_message_model_matches_the_real_coordinator(algorithm):
    """The shape model behind the 7B table sizes what the real server path sends."""
    shapes = {"l.q": (48, 32), "l.v": (48, 32)}
    extras = {"head": torch.zeros(2, 32)}
    k, r = 3, 4
    real = comm.real_round_bytes(
        algorithm,
        shapes=shapes,
        rank_of=lambda i: r,
        num_clients=k,
        chosen=[[0, 1, 2]] * 3,
        extras=extras,
    )
    for rnd, (up, down) in enumerate(real, start=1):
        p_up, p_down = comm.message_bytes(
            algorithm,
            shapes=shapes,
            rank=r,
            clients=k,
            rnd=rnd,
            extras=extras,
            first_visit=rnd == 1,
        )
        # only the varint widths of the per-client config values (index, seed) differ
        assert abs(up - k * p_up) <= 4 * k
        assert abs(down - k * p_down) <= 8 * k


def test_message_sizes_follow_what_each_algorithm_trains():
    shape = {"m": (256, 256)}
    up = {a: comm.message_bytes(a, shapes=shape, rank=8, clients=10, rnd=2)[0] for a in ALGS}
    assert up["fedsb"] < up["ffa"] < up["fedit"]  # r^2 < r*out < r*(in+out)
    assert up["fedit"] == up["flora"] == up["fedex"] == up["lora_fair"] == up["hetlora"]
    down = {
        rnd: comm.message_bytes("flora", shapes=shape, rank=8, clients=10, rnd=rnd)[1]
        for rnd in (1, 2, 3, 5)
    }
    assert down[1] < down[2] < down[3]  # the folded stack travels from round 2 on, growing
    # round 3 folds 160 ranks: 160 * 512 > 256 * 256, so the dense delta is sent from then on
    assert down[5] == down[3]
    later = comm.message_bytes("fedsb", shapes=shape, rank=8, clients=10, rnd=2)
    first = comm.message_bytes("fedsb", shapes=shape, rank=8, clients=10, rnd=1, first_visit=True)
    assert later[1] < first[1] / 10  # the frozen B, A travel only in a client's first round


@pytest.mark.parametrize("algorithm", ALGS)
def test_reference_implements_the_same_math(algorithm):
    """The research-code-style reference and ours agree (effective update / factors)."""
    from fedft.adapters import effective_delta

    agg, updates, states, w = agg_bench.make_inputs(
        algorithm, clients=4, rank=3, shape=(24, 16), fair_steps=0
    )
    ours = agg.aggregate(updates)
    ref = agg_bench.reference(algorithm, states, w, fair_steps=0)
    mod = agg_bench.MODULE
    if algorithm in ("flora",):
        ka, kb = agg_bench._ab_keys(states)
        torch.testing.assert_close(
            ref[kb] @ ref[ka], effective_delta(ours)[mod], rtol=1e-4, atol=1e-6
        )
    elif algorithm == "fedex":
        avg, residual = ref
        torch.testing.assert_close(
            residual,
            ours.base_delta[mod].delta(),
            rtol=1e-4,
            atol=1e-6,  # type: ignore[union-attr]
        )
    elif algorithm == "lora_fair":
        a_bar, b_bar = ref  # no correction steps: FedIT's averages
        torch.testing.assert_close(a_bar, ours.adapters[mod].a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(b_bar, ours.adapters[mod].b, rtol=1e-5, atol=1e-7)
    else:
        part = {"fedsb": "r", "ffa": "b"}.get(algorithm)
        for key, value in ref.items():
            name = "r" if key.endswith("lora_R.weight") else "a" if "lora_A" in key else "b"
            if part is None or name == part:
                got = getattr(ours.adapters[mod], name)
                torch.testing.assert_close(value, got, rtol=1e-5, atol=1e-7)


def test_comm_smoke(tmp_path, capsys):
    lines = comm.run(size="smoke", doc=tmp_path / "b.md")
    assert lines and lines[0].startswith("RATIO comm:")
    assert "RATIO comm:" in capsys.readouterr().out
    assert "Llama-2-7B" in (tmp_path / "b.md").read_text()


def test_aggregation_cost_smoke(tmp_path, capsys):
    lines = agg_bench.run(size="smoke", doc=tmp_path / "b.md")
    assert lines[0].startswith("RATIO aggregation_cost:")
    text = (tmp_path / "b.md").read_text()
    for alg in ALGS:
        assert f"| {alg} |" in text
    assert "RATIO aggregation_cost:" in capsys.readouterr().out


@pytest.mark.slow
def test_dp_overhead_smoke(tmp_path, capsys):
    from bench import dp_overhead

    lines = dp_overhead.run(size="smoke", doc=tmp_path / "b.md")
    assert lines[0].startswith("RATIO dp_overhead:")
    assert "hooks/plain" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sim_scale", "overhead", "quality", "profile_sim"])
def test_simulation_benchmarks_smoke(name, tiny_bert_dir, tmp_path, capsys):
    import importlib

    mod = importlib.import_module(f"bench.{name}")
    lines = mod.run(size="smoke", doc=tmp_path / "b.md", model=str(tiny_bert_dir))
    assert lines[0].startswith(f"RATIO {name}:")
    assert f"RATIO {name}:" in capsys.readouterr().out
    if name == "sim_scale":
        assert "loads 4 vs 2" in lines[0]  # reference loads per call, ours per worker
        rows = [r.split("|") for r in (tmp_path / "b.md").read_text().splitlines()]
        counted = [
            (r[3].strip(), r[-2].strip())
            for r in rows
            if r[1:2] and r[2].strip() in ("ours", "reference")
        ]
        assert counted == [("4", "4"), ("4", "4")]  # every client call counted in the workers


def test_secagg_round_smoke_runs_and_the_attack_row_completes(capsys):
    from bench import secagg_round

    lines = secagg_round.run(size="smoke", doc=None)
    assert lines and lines[0].startswith("RATIO secagg_round_10:")
    # the hostile-holder round completes after the change and names the liar
    _, _, outcome = secagg_round.one_round(10, 500, checked=True, liar=1)
    assert outcome == "completed, suspects [1]"


def test_config_partition_bench_smoke(capsys):
    """Old (from git) and new config / partition code run side by side; same splits."""
    from bench import config_partition

    lines = config_partition.run(size="smoke", doc=None)
    assert lines[0].startswith("RATIO config_partition: config fresh start after/before")
    out = capsys.readouterr().out
    assert "| partition 12,244 records: dirichlet alpha=2.0 |" in out


@pytest.mark.slow
def test_deploy_bench_smoke(tiny_bert_dir, tmp_path, capsys):
    """#20: the simulated, worker and per-message paths all run and every phase is read."""
    from bench import deploy

    lines = deploy.run(size="smoke", doc=tmp_path / "b.md", model=str(tiny_bert_dir))
    assert lines[0].startswith("RATIO deploy: deployed/simulated round wall time: resident")
    rows = [r.split("|")[1:-1] for r in (tmp_path / "b.md").read_text().splitlines()]
    phases = [[c.strip() for c in r] for r in rows if len(r) == len(deploy.HEADER)][2:]
    assert [r[0] for r in phases] == [p for p in deploy.PATHS for _ in (1, 2)]
    by_path = {(r[0], r[1]): r for r in phases}
    worker, per_message = deploy.PATHS[1], deploy.PATHS[2]
    col = {name: i for i, name in enumerate(deploy.HEADER)}
    for rnd in ("1", "2"):
        assert by_path[(worker, rnd)][col["hand-over s"]] != "-"  # measured with a worker
        assert by_path[(per_message, rnd)][col["hand-over s"]] == "-"  # none without
        assert float(by_path[(per_message, rnd)][col["model + data load s"]]) > 0  # reloads
        for path in deploy.PATHS:  # the server's exchange was timed on every path
            assert by_path[(path, rnd)][col["last reply -> server has all s"]] != "-"
    assert float(by_path[(worker, "2")][col["model + data load s"]]) < 0.05  # kept loaded
