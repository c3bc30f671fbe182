"""Deployment on loopback with real processes: `fedft server` (Flower SuperLink + ServerApp)
and `fedft client` (Flower SuperNodes), TLS and node authentication on.

One deployed run (module fixture) serves the default checks: three authenticated TLS clients
finish two rounds and write the run's files, while a client with an unregistered node key
and a plaintext client try to join the same SuperLink and are refused. The slow tests kill
the server after round 1 and resume (the final adapter must equal the uninterrupted run's),
and kill a client mid-round (the run still completes with the others).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedft.certs import make_node_keypair, write_deployment_certs, write_file
from fedft.privacy import epsilon_of
from server.deploy import free_port

ROOT = Path(__file__).resolve().parent.parent
RUN_TIMEOUT_S = 900
#: start-up (model, data, SuperLink, key registration) on a busy 2-core machine took > 120 s
SUBMIT_TIMEOUT_S = 300


def _config(path: Path, model_dir: str, *, privacy: tuple[str, ...] = (), **federation) -> Path:
    fed = {
        "num_clients": 3,
        "clients_per_round": 3,
        "rounds": 2,
        "local_steps": 2,
        "batch_size": 8,
        "device": '"cpu"',
        **federation,
    }
    path.write_text(
        "\n".join(
            [
                'name = "deploy-test"',
                "seed = 0",
                "[model]",
                f"name = {json.dumps(model_dir)}",
                "[data]",
                "max_train_examples = 120",
                "test_size = 32",
                "public_size = 8",
                "[federation]",
                *[f"{k} = {v}" for k, v in fed.items()],
                "[adapter]",
                "rank = 4",
                *(["[privacy]", *privacy] if privacy else []),
            ]
        )
        + "\n"
    )
    return path


@dataclass
class Proc:
    """A `python -m fedft.cli ...` child in its own session; stopped by its PID."""

    name: str
    proc: subprocess.Popen
    log: Path

    @classmethod
    def start(
        cls, name: str, args: list[str], logs: Path, *, env: dict[str, str] | None = None
    ) -> Proc:
        log = logs / f"{name}.log"
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedft.cli", *args],
                cwd=ROOT,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=env,
            )
        return cls(name, proc, log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout} s:\n{self.text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _code_within(p: Proc, timeout: float) -> int | None:
    """``p``'s exit code, or None if it still runs after ``timeout`` seconds."""
    try:
        return p.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _server(name: str, cfg: Path, out: Path, port: int, certs: Path, logs: Path, *extra: str):
    return Proc.start(
        name,
        [
            "server",
            str(cfg),
            "--out",
            str(out),
            "--certs",
            str(certs),
            "--address",
            f"127.0.0.1:{port}",
            *extra,
        ],
        logs,
    )


def _client(cfg: Path, port: int, certs: Path, logs: Path, name: str, i: int, *extra: str):
    return Proc.start(
        name,
        [
            "client",
            str(cfg),
            "--partition",
            str(i),
            "--certs",
            str(certs),
            "--server",
            f"127.0.0.1:{port}",
            *extra,
        ],
        logs,
    )


def _clients(cfg: Path, port: int, certs: Path, logs: Path, tag: str, *extra: str) -> list[Proc]:
    return [_client(cfg, port, certs, logs, f"{tag}-client-{i}", i, *extra) for i in range(3)]


def _submitted(server: Proc) -> bool:
    if server.proc.poll() is not None:
        pytest.fail(f"{server.name} exited early:\n{server.text()[-3000:]}")
    return "submitted" in server.text()


def test_run_config_file_round_trips_through_flowers_parser(tmp_path):
    from flwr.common.config import parse_config_args

    from fedft.config import load_config
    from fedft.transport.flower_config import read_run_config
    from server.app import bound_nodes
    from server.deploy import write_run_config

    cfg = load_config(None, ["name='quote \" and \\ back'", "federation.rounds=7"])
    path = write_run_config(
        tmp_path / "rc.toml", cfg, out=tmp_path / "o", resume=True, nodes={"123": 0, "45": 2}
    )
    parsed = parse_config_args([str(path)])  # what `flwr run --run-config FILE` does
    assert read_run_config(parsed) == cfg
    assert parsed["fedft-out"] == str((tmp_path / "o").resolve())
    assert parsed["fedft-resume"] is True
    assert bound_nodes(parsed["fedft-nodes"]) == {123: 0, 45: 2}  # what the ServerApp reads
    assert bound_nodes("") is None  # no node authentication: no binding


def test_launch_commands_and_plans(pki, tmp_path):
    from flwr.common.config import parse_config_args

    from client.deploy import ClientPlan, node_config, supernode_argv
    from server.deploy import DeployError, ServerPlan, ServerTls, superlink_argv

    certs, rogue = pki
    tls = ServerTls.from_dir(certs)
    plan = ServerPlan(out=tmp_path, address="127.0.0.1:9", tls=tls, node_keys=(rogue,))
    argv = superlink_argv(plan, tmp_path, port=7)
    assert "--enable-supernode-auth" in argv and "--insecure" not in argv
    # the SuperLink (Control API included) listens on the loopback interface only
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "7"
    assert argv[argv.index("--ssl-certfile") + 1] == str(tls.cert.resolve())
    insecure = superlink_argv(ServerPlan(out=tmp_path, address="0.0.0.0:9"), tmp_path, port=7)
    assert insecure[insecure.index("--host") + 1] == "127.0.0.1"
    assert "--insecure" in insecure and "--enable-supernode-auth" not in insecure
    with pytest.raises(DeployError, match="node public keys"):
        ServerPlan(out=tmp_path, tls=tls)  # TLS means node auth: keys are required
    with pytest.raises(DeployError, match="no checkpoint"):
        ServerPlan(out=tmp_path, resume=True)
    with pytest.raises(ValueError, match="HOST:PORT"):
        ServerPlan(out=tmp_path, address="nohost")

    data = tmp_path / "my data.csv"
    data.write_text("text,label\nok,1\n")
    client = ClientPlan(
        partition=2,
        server="127.0.0.1:9",
        root_cert=tls.ca_cert,
        node_key=certs / "client-2.key",
        data_path=data,
        epsilon=2.5,
        ledger=tmp_path / "ledger.json",
    )
    assert parse_config_args([node_config(client)]) == {
        "partition-id": 2,
        "data-path": str(data.resolve()),
        "epsilon": 2.5,
        # TLS on: the split channel gets the CA even without a split certificate, so a
        # split round refuses plaintext (tests/test_split_fail_closed.py)
        "split-ca": str(tls.ca_cert.resolve()),
        "delta": 1e-5,
        "accountant": "prv",
        "ledger": str((tmp_path / "ledger.json").resolve()),
    }
    argv = supernode_argv(client, runtime_port=5)
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(
        (certs / "client-2.key").resolve()
    )
    assert "--insecure" not in argv
    with pytest.raises(DeployError, match="needs TLS"):
        ClientPlan(partition=0, server="h:1", node_key=certs / "client-0.key")
    with pytest.raises(DeployError, match="budget"):
        ClientPlan(partition=0, server="h:1", epsilon=0.0)
    with pytest.raises(DeployError, match="--accountant"):
        ClientPlan(partition=0, server="h:1", epsilon=1.0, accountant="gdp")


def test_node_keys_bind_client_indices_across_restarts(tmp_path):
    from server.deploy import DeployError, bind_node_keys

    keys = []
    for name in ("client-0.pub", "client-1.pub", "extra.pub"):
        keys.append(write_file(tmp_path / name, make_node_keypair()[1], private=False))
    state = tmp_path / "state"
    state.mkdir()
    assert bind_node_keys(keys, ["11", "12", "13"], state) == {"11": 0, "12": 1}
    # a restarted SuperLink answers "already registered": the saved ids keep the binding
    assert bind_node_keys(keys, ["known", "known", "known"], state) == {"11": 0, "12": 1}
    with pytest.raises(DeployError, match="node id"):
        bind_node_keys(keys, ["known"] * 3, tmp_path / "fresh-state")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    # client-3 is a registered node (its key is in the server's --certs) that no run of 3
    # clients needs: the deployed run uses it as a hostile insider
    paths = write_deployment_certs(root / "certs", clients=4)
    rogue_private, rogue_public = make_node_keypair()  # never registered with the server
    rogue = write_file(root / "rogue.key", rogue_private, private=True)
    write_file(root / "rogue.pub", rogue_public, private=False)
    return paths.ca_cert.parent, rogue


@dataclass
class Deployed:
    out: Path
    cfg: Path
    server_code: int
    rogue: Proc
    rogue_code: int
    plain: Proc
    plain_code: int
    superlink_log: str
    attack: dict[str, object]
    clients: list[Proc]
    client_codes: list[int | None]


@pytest.fixture(scope="module")
def deployed(tiny_bert_dir, pki, tmp_path_factory):
    certs, rogue_key = pki
    work = tmp_path_factory.mktemp("deploy")
    cfg = _config(work / "run.toml", tiny_bert_dir)
    out, port = work / "run", free_port()
    server = _server("server", cfg, out, port, certs, work)
    procs = [server]
    try:
        _wait_for(lambda: _submitted(server), SUBMIT_TIMEOUT_S, "the run to be submitted")
        attack = _outsider_attack(work / "attacker", port=port, ca_cert=certs / "ca.crt")
        addr = ["--server", f"127.0.0.1:{port}", "--max-wait", "6"]
        # an insider: registered key client-3, declares client 0's index; it connects first
        slog = out / ".superlink" / "superlink.log"
        insider = Proc.start(
            "insider",
            ["client", str(cfg), "--partition", "0", "--certs", str(certs)]
            + ["--key", str(certs / "client-3.key"), "--server", f"127.0.0.1:{port}"],
            work,
        )
        procs.append(insider)
        _wait_for(
            lambda: slog.read_text(errors="replace").count("/v1/fleet/activate-node") >= 1,
            120,
            "the insider to connect",
        )
        clients = _clients(cfg, port, certs, work, "ok")
        # an unregistered node key (partition 0 is taken: were it admitted, the run would
        # see two nodes claiming client 0 and fail)
        rogue = Proc.start(
            "rogue",
            [
                "client",
                str(cfg),
                "--partition",
                "0",
                "--certs",
                str(certs),
                "--key",
                str(rogue_key),
                *addr,
            ],
            work,
        )
        plain = Proc.start(
            "plain", ["client", str(cfg), "--partition", "1", "--insecure", *addr], work
        )
        procs += [*clients, rogue, plain]
        rogue_code, plain_code = rogue.wait(120), plain.wait(120)
        server_code = server.wait(RUN_TIMEOUT_S)
        # one-shot clients (the default) end by themselves once the run is over
        client_codes = [_code_within(c, 120) for c in clients]
        log = (out / ".superlink" / "superlink.log").read_text(errors="replace")
        yield Deployed(
            out, cfg, server_code, rogue, rogue_code, plain, plain_code, log, attack,
            clients, client_codes,
        )  # fmt: skip
    finally:
        for p in reversed(procs):
            p.stop()


def _outsider_attack(home: Path, *, port: int, ca_cert: Path) -> dict[str, object]:
    """Play an outsider who holds only the public ``ca.crt`` and the server's address: with
    the ``flwr`` CLI, register their own node key, list the nodes and list the runs."""
    from server.deploy import CONNECTION, DeployError, FlwrCli, flower_env, write_connection

    home.mkdir(parents=True)
    shutil.copy(ca_cert, home / "ca.crt")
    _, public = make_node_keypair()
    key = write_file(home / "attacker.pub", public, private=False)
    write_connection(home, address=f"127.0.0.1:{port}", root_certificates=home / "ca.crt")
    cli = FlwrCli(flwr_home=home, env=flower_env(home))
    results: dict[str, object] = {}
    for name, args in {
        "register": ("supernode", "register", str(key), CONNECTION),
        "nodes": ("supernode", "ls", CONNECTION),
        "runs": ("ls", CONNECTION),
    }.items():
        try:
            results[name] = cli.call(*args, timeout_s=60)
        except DeployError as exc:  # no JSON at all: refused too
            results[name] = {"success": False, "error-message": str(exc)}
    return results


def test_outsider_cannot_use_the_control_api(deployed):
    """Attack: with only ca.crt, register a node key and list nodes and runs through the
    server's public address. The public address serves the Fleet API only: all refused."""
    for name, res in deployed.attack.items():
        assert res.get("success") is not True, (name, res)
    # the SuperLink saw exactly the operator's four registrations, none from the attacker
    assert deployed.superlink_log.count("POST /v1/control/register-node") == 4
    assert "Starting the SuperLink Control HTTP API on 127.0.0.1:" in deployed.superlink_log


def test_tls_auth_three_clients_two_rounds(deployed):
    assert deployed.server_code == 0, deployed.superlink_log[-3000:]
    assert "Uvicorn running on https://127.0.0.1" in deployed.superlink_log  # TLS on
    rows = _rows(deployed.out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["clients"] == 3
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        assert r["epsilon"] is None
        for key in ("loss", "accuracy", "wall_s"):
            assert isinstance(r[key], float)
    summary = json.loads((deployed.out / "summary.json").read_text())
    assert summary["config"]["federation"]["rounds"] == 2
    assert (deployed.out / "adapter" / "adapter_model.safetensors").is_file()
    assert (deployed.out / "checkpoint" / "state.json").is_file()
    # the SuperLink's state (every client update) and the checkpoint: owner only
    for private in (deployed.out / ".superlink", deployed.out / "checkpoint"):
        assert private.stat().st_mode & 0o777 == 0o700, private
    # exactly three SuperNodes were admitted (their keys were registered first)
    assert deployed.superlink_log.count('/v1/fleet/activate-node HTTP/1.1" 200') >= 3


def test_one_shot_clients_exit_when_the_run_is_over(deployed):
    """#20: each client says once that the run is over and exits 0, without the stream of
    Flower's retry warnings a SuperNode prints while its server is away."""
    assert deployed.client_codes == [0, 0, 0]
    for c in deployed.clients:
        text = c.text()
        assert text.count("the run is over (this client trained up to round 2 of 2)") == 1, text
        assert "Connection attempt failed" not in text


def test_clients_keep_the_model_in_their_resident_worker(deployed):
    """#20: each client's worker loaded the model and data once, before round 1, and
    answered both rounds' train messages (the app bundle is its own code version)."""
    for i, c in enumerate(deployed.clients):
        text = c.text()
        assert text.count(f"model and data of client {i} loaded") == 1, text[-3000:]
        assert text.count("train message answered in") == 2, text[-3000:]
        assert "another code version" not in text and "the worker (pid" not in text


def test_insider_cannot_take_another_clients_index(deployed):
    """Attack: a registered node (key client-3) declares client index 0 before client 0
    connects. Its index is bound to its key (3, outside this 3-client run), so it neither
    aborts the run ("two nodes claim client index 0") nor gets client 0's settings."""
    assert deployed.server_code == 0, deployed.superlink_log[-3000:]
    assert all(r["clients"] == 3 for r in _rows(deployed.out)[1:])


def test_unregistered_node_key_is_refused(deployed):
    assert deployed.rogue_code != 0
    assert "Failed to activate SuperNode" in deployed.rogue.text()
    assert "No SuperNode found with the given public key" in deployed.superlink_log
    # and it never took part: every round heard from the three registered clients only
    assert all(r["clients"] == 3 for r in _rows(deployed.out)[1:])


def test_plaintext_client_is_refused(deployed):
    assert deployed.plain_code != 0
    text = deployed.plain.text()
    assert "--insecure: NO TLS" in text  # the loud warning
    assert "could not establish a connection to the SuperLink" in text


def _serverapp_gone(port: int) -> bool:
    """No flwr-serverapp of this SuperLink is left (read-only scan of /proc)."""
    needle = f"127.0.0.1:{port}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"flwr-serverapp" in cmd and needle in cmd:
            return False
    return True


@pytest.mark.slow
def test_killed_server_resumes_to_the_same_adapter(deployed, pki, tmp_path):
    certs, _ = pki
    out, port = tmp_path / "run", free_port()
    server = _server("server-1", deployed.cfg, out, port, certs, tmp_path)
    procs = [server]
    try:
        _wait_for(lambda: _submitted(server), SUBMIT_TIMEOUT_S, "the run to be submitted")
        # service clients: they wait for the killed server to come back
        procs += _clients(deployed.cfg, port, certs, tmp_path, "resume", "--service")
        ckpt = out / "checkpoint" / "state.json"
        _wait_for(lambda: len(_rows(out)) >= 2 and ckpt.is_file(), RUN_TIMEOUT_S, "round 1")
        assert json.loads(ckpt.read_text())["round"] == 1 and len(_rows(out)) == 2
        # crash: SIGKILL the server and its SuperLink (both started by this test's command)
        superlink_pid = int((out / ".superlink" / "superlink.pid").read_text())
        # the SuperLink's own (loopback) port, which its ServerApp dials
        local = (out / ".superlink" / "config.toml").read_text().split('address = "')[1]
        local_port = int(local.split('"')[0].rsplit(":", 1)[1])
        server.proc.kill()
        server.proc.wait()
        os.kill(superlink_pid, signal.SIGKILL)
        _wait_for(lambda: _serverapp_gone(local_port), 60, "the old ServerApp to exit")
        assert len(_rows(out)) == 2  # round 2 never finished
        resumed = _server("server-2", deployed.cfg, out, port, certs, tmp_path, "--resume")
        procs.append(resumed)
        assert resumed.wait(RUN_TIMEOUT_S) == 0, resumed.text()[-3000:]
    finally:
        for p in reversed(procs):
            p.stop()
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    ref = load_file(str(deployed.out / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert ref.keys() == got.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], atol=1e-6, rtol=0)
    assert rows[2]["loss"] == pytest.approx(_rows(deployed.out)[2]["loss"], abs=1e-6)


@pytest.mark.slow
def test_client_killed_mid_round_does_not_stop_the_run(tiny_bert_dir, pki, tmp_path):
    certs, _ = pki
    # the timeout bounds the wait for the killed client's reply; it must also cover a slow
    # reply on a loaded machine (45 s did not: two replies came later and the rounds failed)
    cfg = _config(tmp_path / "run.toml", tiny_bert_dir, min_replies=2, round_timeout_s=240.0)
    out, port = tmp_path / "run", free_port()
    server = _server("server", cfg, out, port, certs, tmp_path)
    procs = [server]
    try:
        _wait_for(lambda: _submitted(server), SUBMIT_TIMEOUT_S, "the run to be submitted")
        clients = _clients(cfg, port, certs, tmp_path, "drop")
        procs += clients
        _wait_for(
            lambda: "train message" in clients[2].text(),
            RUN_TIMEOUT_S,
            "client 2 to receive its round-1 training message",
        )
        clients[2].stop()  # stops its SuperNode mid-round: no reply will come
        assert server.wait(RUN_TIMEOUT_S) == 0, server.text()[-3000:]
    finally:
        for p in reversed(procs):
            p.stop()
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    assert not any(r.get("failed") for r in rows)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_spending_survives_a_killed_client_and_server(tiny_bert_dir, pki, tmp_path):
    """Threat model S7: kill a client and the server mid-round, resume: no client's epsilon
    restarts below what it spent (each client's ledger is on its own disk, written before
    it trains)."""
    import re

    from fedft import builders
    from fedft.config import load_config
    from fedft.data import build_federated_data
    from fedft.privacy.client import client_noise
    from fedft.privacy.client_ledger import read_ledger

    certs, _ = pki
    steps, sigma = 2, 1.0
    cfg = _config(
        tmp_path / "run.toml",
        tiny_bert_dir,
        privacy=("mode = 'sample'", "epsilon = 50.0", f"noise_multiplier = {sigma}"),
        rounds=2,
        local_steps=steps,
    )
    out, port = tmp_path / "run", free_port()
    ledgers = [tmp_path / f"ledger-{i}.json" for i in range(3)]

    def client(name: str, i: int) -> Proc:
        return _client(
            cfg, port, certs, tmp_path, name, i, "--ledger", str(ledgers[i]), "--service"
        )

    server = _server("server-1", cfg, out, port, certs, tmp_path)
    procs = [server]
    try:
        _wait_for(lambda: _submitted(server), 120, "the run to be submitted")
        clients = [client(f"dp-client-{i}", i) for i in range(3)]
        procs += clients
        # round 1 checkpointed, round 2 under way: every client has written its round-2
        # steps (write-ahead)
        ckpt = out / "checkpoint" / "state.json"
        _wait_for(
            lambda: ckpt.is_file() and all(read_ledger(p).steps >= 2 * steps for p in ledgers),
            RUN_TIMEOUT_S,
            "every client to start round 2",
        )
        # crash, mid-round: client 2 (its whole process group: the SuperNode and the
        # ClientApp it runs, all started by this test) and the server
        os.killpg(clients[2].proc.pid, signal.SIGKILL)
        clients[2].proc.wait()
        superlink_pid = int((out / ".superlink" / "superlink.pid").read_text())
        server.proc.kill()
        server.proc.wait()
        try:  # the SuperLink our server started, by the PID it recorded
            os.kill(superlink_pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # it went down with the server
        _wait_for(lambda: _serverapp_gone(port), 60, "the old ServerApp to exit")
        at_crash = [read_ledger(p).steps for p in ledgers]
        resumed = _server("server-2", cfg, out, port, certs, tmp_path, "--resume")
        procs += [resumed, client("dp-client-2-restarted", 2)]
        # a resumed run restarts the SuperLink and waits for three clients: allow two runs' time
        assert resumed.wait(2 * RUN_TIMEOUT_S) == 0, resumed.text()[-3000:]
    finally:
        for p in reversed(procs):
            p.stop()
    rows = _rows(out)
    assert [r["round"] for r in rows] == [0, 1, 2]
    final = rows[-1]["epsilon_clients"]
    run = load_config(cfg)
    sizes = [len(c) for c in build_federated_data(**builders.data_kwargs(run)).clients]
    for i in range(3):
        logs = [tmp_path / f"dp-client-{i}.log", tmp_path / f"dp-client-{i}-restarted.log"]
        received = sum(
            len(re.findall(r"Receiving: train message", p.read_text(errors="replace")))
            for p in logs
            if p.is_file()
        )
        _, q = client_noise(
            epsilon=50.0,
            delta=1e-5,
            mechanism="prv",
            noise_multiplier=sigma,
            planned_steps=2 * steps,
            num_examples=sizes[i],
            batch_size=8,
        )
        spent = epsilon_of([(sigma, q, received * steps)], delta=1e-5, mechanism="prv")
        ledger = read_ledger(ledgers[i])
        assert received >= 3, (i, received)  # rounds 1 and 2, and round 2 again after resume
        assert ledger.steps >= at_crash[i] and ledger.steps >= received * steps, i
        # the epsilon this client last reported covers every round it was sent
        assert float(final[str(i)]) >= spent - 1e-6, (i, final, spent, received)
