"""``fedft simulate --ray-address``: the virtual clients run on an existing Ray cluster.

The end-to-end test starts its own one-node cluster (``ray start --head --block``) bound to
127.0.0.1 (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray otherwise replaces a loopback
``--node-ip-address`` with the machine's outward address and its servers listen on every
interface), with its own temp dir and free ports, and afterwards stops exactly the process
group it started (never ``ray stop``, which would stop every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_console import _console_lines, _fedft, _tiny_sets

from fedft.config import ConfigError, build_config

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).parent / "ray"
#: Ray's switch for single-machine mode: node address 127.0.0.1, servers on loopback only
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
CLUSTER_CPUS = 3  # not this machine's core count: the run must report the cluster's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ray_head(tmp_path):
    """(HOST:PORT, temp dir) of a fresh loopback Ray head; its processes stop afterwards."""
    if not RAY.exists():
        pytest.skip("the ray command line is not installed")
    port = _free_port()
    temp = Path("/tmp") / f"fedft-ray-{os.getpid()}-{port}"  # Ray's socket paths must be short
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--port={port}",
        f"--temp-dir={temp}",
        f"--num-cpus={CLUSTER_CPUS}",
        "--num-gpus=0",
        "--object-store-memory=100000000",
        "--include-dashboard=false",
        f"--ray-client-server-port={_free_port()}",
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        "--disable-usage-stats",
    ]
    log_path = tmp_path / "ray-head.log"
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        deadline = time.monotonic() + 300
        while "Ray runtime started" not in log_path.read_text():
            if proc.poll() is not None:
                pytest.skip(f"Ray cannot start here: {log_path.read_text()[-1500:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"ray start did not finish in 300 s: {log_path.read_text()[-1500:]}")
            time.sleep(1)
        yield f"127.0.0.1:{port}", temp
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # only the group this fixture started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(temp, ignore_errors=True)


def test_simulate_on_an_existing_ray_cluster(ray_head, tiny_bert_dir, tmp_path, monkeypatch):
    address, temp = ray_head
    out = tmp_path / "run"
    for key, value in LOOPBACK_ENV.items():
        monkeypatch.setenv(key, value)  # the driver's node address: 127.0.0.1, as the head's
    args = ["simulate", "simulations/quickstart.toml", "--out", str(out)]
    proc = _fedft(*args, "--ray-address", address, *_tiny_sets(tiny_bert_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2] and all(r["clients"] == 2 for r in rows[1:])
    # the console names the cluster it joined: the head's 3 CPUs, not this machine's own Ray
    lines = _console_lines(proc.stderr)
    cluster = [line for line in lines if line.startswith("Ray cluster at ")]
    assert cluster == [
        f"Ray cluster at {address}: 1 node(s), {CLUSTER_CPUS} CPUs, 0 GPUs; "
        f"{CLUSTER_CPUS} virtual client(s) at once (1 CPU each)"
    ], lines
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["federation"]["ray_address"] == address
    # the clients ran as actors of the test's cluster: their processes logged in its session
    workers = list(temp.glob("session_*/logs/worker-*"))
    assert workers, sorted(p.name for p in temp.glob("session_*/logs/*"))
    # and, being on this machine, wrote their output to the run's run.log
    assert "[actor " in (out / "run.log").read_text()


def test_an_unreachable_ray_address_is_one_line(tiny_bert_dir, tmp_path):
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    args = ["simulate", "simulations/quickstart.toml", "--out", str(tmp_path / "run")]
    proc = _fedft(*args, "--ray-address", address, *_tiny_sets(tiny_bert_dir), timeout=600)
    assert proc.returncode == 1
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text
    last = _console_lines(proc.stderr)[-1]
    expected = f"fedft simulate: no Ray cluster answers at federation.ray_address = {address!r}"
    assert last.startswith(expected), last
    assert f"ray start --head --port {address.rsplit(':', 1)[1]}" in last


@pytest.mark.parametrize(
    "value", ["ray://10.0.0.5:10001", "10.0.0.5", "10.0.0.5:0", "10.0.0.5:70000", ":6379"]
)
def test_a_malformed_ray_address_is_refused(value):
    with pytest.raises(ConfigError, match=r"federation\.ray_address = .* HOST:PORT"):
        build_config({"federation": {"ray_address": value}})


@pytest.mark.parametrize(
    "value", ["", "auto", "10.0.0.5:6379", "head.example.org:6379", "[::1]:6379"]
)
def test_ray_address_forms_accepted(value):
    assert build_config({"federation": {"ray_address": value}}).federation.ray_address == value


def test_the_flag_is_the_config_key_and_refused_before_any_work(tmp_path):
    proc = _fedft(
        "simulate",
        "simulations/quickstart.toml",
        "--out",
        str(tmp_path / "run"),
        "--ray-address",
        "ray://head:10001",
        timeout=300,
    )
    assert proc.returncode == 2
    assert "federation.ray_address = 'ray://head:10001' is not allowed" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the data, Ray or a model


def test_cluster_capacity_counts_per_node():
    from simulations.simulate import cluster_capacity

    nodes = [
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 2.0}},
        {"Alive": True, "Resources": {"CPU": 3.0}},  # a CPU-only node
        {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},  # gone
        {"Alive": True, "Resources": {}},  # a head that runs no tasks
    ]
    assert cluster_capacity(nodes, cpus=1, gpus=0.0) == 11
    assert cluster_capacity(nodes, cpus=2, gpus=0.0) == 4 + 1  # 3 CPUs hold one 2-CPU client
    assert cluster_capacity(nodes, cpus=1, gpus=0.5) == 4  # GPUs bound it; CPU node adds none
    assert cluster_capacity(nodes, cpus=4, gpus=0.25) == 2
    assert cluster_capacity(nodes, cpus=16, gpus=0.0) == 0


def test_an_actor_on_another_machine_keeps_its_output(tmp_path, monkeypatch):
    """ray_worker_setup on a node without the run's folder: no redirect, nothing created."""
    from fedft.console import RUN_LOG_ENV, ray_worker_setup

    elsewhere = tmp_path / "not-on-this-node" / "run.log"
    monkeypatch.setenv(RUN_LOG_ENV, str(elsewhere))
    before = os.fstat(2).st_ino
    ray_worker_setup()
    assert os.fstat(2).st_ino == before and not elsewhere.parent.exists()
