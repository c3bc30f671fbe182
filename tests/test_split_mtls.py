"""Mutual TLS on the split service over real loopback sockets: who may open a session, and
every later call on a session must come from the certificate identity that opened it."""

from __future__ import annotations

import asyncio
import collections
import copy
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from test_split_support import batch, tiny_bert
from tiny_models import save_tiny_bert

from client.deploy import ClientPlan, node_config, split_tls_files
from client.split_client import ClientTls, IdentityError, SplitClient
from client.split_round import client_tls_from_node_config, run_split_round
from fedft.certs import write_deployment_certs
from fedft.config import RunConfig, load_config
from fedft.split import front_forward, split_model
from fedft.transport import split_wire as wire
from server.deploy import (
    DeployError,
    ServerPlan,
    ServerTls,
    free_port,
    split_service_addresses,
    start_split_service,
)
from server.split_runner import mtls_server_credentials, server_credentials_from_dir
from server.split_service import (
    ADMISSION_FILE,
    IDENTITY_MISMATCH,
    NOT_SAMPLED,
    RunningServer,
    build_service,
    start_server,
    write_admission,
)

MODEL_ID = "tiny"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki") / "certs"
    write_deployment_certs(d, clients=2)
    return d


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA issuing a certificate with the very same CN (client-0)."""
    d = tmp_path_factory.mktemp("rogue") / "certs"
    write_deployment_certs(d, clients=1)
    return d


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_bert(layers=3)


async def _server(
    model: torch.nn.Module,
    creds: grpc.ServerCredentials | None,
    *,
    require_identity: bool = True,
    **service_kw: Any,
) -> RunningServer:
    """A split server on loopback over a copy of ``model`` (``service_kw`` to build_service)."""
    service = build_service(
        copy.deepcopy(model),
        model_id=MODEL_ID,
        front_layers=1,
        back_layers=1,
        require_client_identity=require_identity,
        **service_kw,
    )
    return await start_server(service, address="127.0.0.1:0", server_credentials=creds)


def _client(model: torch.nn.Module, port: int, **kw: object) -> SplitClient:
    parts = split_model(copy.deepcopy(model), front_layers=1, back_layers=1)
    return SplitClient(parts, target=f"127.0.0.1:{port}", model_id=MODEL_ID, **kw)  # type: ignore[arg-type]


async def _step(c: SplitClient, step: int = 0) -> float:
    ids, mask, labels = batch("bert", b=4, t=8, seed=step)
    return await c.train_step([(ids, mask, labels)], round_=0, step=step)


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(fn(), timeout=30))


def test_valid_certificate_trains_and_session_is_bound_to_its_cn(model, certs):
    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs))
        try:
            c = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            async with c:
                assert c.session is not None
                sess = srv.service.sessions[c.session.session_id]
                assert sess.identity == "client-0"
                loss = await _step(c)
                assert math.isfinite(loss) and loss > 0
                # the front got a cut gradient back: the step really crossed the wire
                grads = [p.grad for p in c.parts.front.parameters() if p.grad is not None]
                assert grads and any(float(g.abs().sum()) > 0 for g in grads)
                assert c.traffic.frames_up == c.traffic.frames_down == 2
                await _step(c, step=1)  # the bound session keeps working
            assert srv.service.stats()["sessions"] == 0  # Close from the owner is allowed
            assert "PERMISSION_DENIED" not in srv.service.errors
        finally:
            await srv.stop(None)

    _run(main)


def test_client_without_certificate_is_refused(model, certs):
    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs))
        try:
            only_ca = grpc.ssl_channel_credentials(
                root_certificates=(certs / "ca.crt").read_bytes()
            )
            c = _client(model, srv.port, channel_credentials=only_ca)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.open()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await c.channel.close()
            plain = _client(model, srv.port)  # plaintext on the TLS port
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await plain.open()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await plain.channel.close()
            assert srv.service.stats()["sessions"] == 0
        finally:
            await srv.stop(None)

    _run(main)


def test_certificate_from_rogue_ca_is_refused(model, certs, rogue):
    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs))
        try:
            # right CA for the server, but the client's cert (same CN) comes from another CA
            tls = ClientTls(
                ca_cert=certs / "ca.crt",
                cert=rogue / "client-0.crt",
                key=rogue / "client-0-tls.key",
                client_id="client-0",
            )
            c = _client(model, srv.port, tls=tls)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.open()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await c.channel.close()
            assert srv.service.stats()["sessions"] == 0
        finally:
            await srv.stop(None)

    _run(main)


def test_other_identity_cannot_use_a_session(model, certs):
    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs))
        try:
            owner = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            thief = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-1"))
            async with owner:
                await _step(owner)
                await thief.open()
                assert owner.session is not None and thief.session is not None
                own_session = thief.session
                victim = owner.session.session_id
                service = srv.service
                pending_before = len(service.sessions[victim].pending)

                # data plane: client-1's stream names client-0's session
                thief.session = owner.session
                with pytest.raises(IdentityError) as err:
                    await _step(thief, step=5)
                assert err.value.code == "PERMISSION_DENIED"
                assert str(err.value).count(IDENTITY_MISMATCH) == 1
                assert "client-1" in str(err.value)
                assert len(service.sessions[victim].pending) == pending_before  # no compute

                # control plane: Commit and Close on client-0's session
                for call, req in (
                    (thief.stub.commit, wire.CommitRequest(victim, 0, 9)),
                    (thief.stub.close, wire.CloseRequest(victim)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await call(req)
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert (info.value.details() or "").startswith(IDENTITY_MISMATCH)
                assert victim in service.sessions  # not freed by the thief
                assert service.sessions[victim].committed == (0, 0)  # not committed by it
                assert service.errors["PERMISSION_DENIED"] == 3

                # the owner's session is intact and keeps training
                assert math.isfinite(await _step(owner, step=1))
                thief.session = own_session
                await thief.close()
        finally:
            await srv.stop(None)

    _run(main)


def test_declared_client_id_must_equal_certificate_cn(model, certs):
    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs))
        try:
            liar = ClientTls(
                ca_cert=certs / "ca.crt",
                cert=certs / "client-1.crt",
                key=certs / "client-1-tls.key",
                client_id="client-0",
            )
            c = _client(model, srv.port, tls=liar)
            with pytest.raises(IdentityError) as err:
                await c.open()
            assert "'client-0'" in str(err.value) and "'client-1'" in str(err.value)
            await c.channel.close()
            assert srv.service.stats()["sessions"] == 0
            # the same certificate declaring its own id is admitted
            honest = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-1"))
            async with honest:
                assert honest.session is not None
                assert srv.service.sessions[honest.session.session_id].identity == "client-1"
        finally:
            await srv.stop(None)

    _run(main)


def test_tls_without_client_auth_fails_closed_when_identity_required(model, certs):
    async def main() -> None:
        server_only = grpc.ssl_server_credentials(
            [((certs / "server.key").read_bytes(), (certs / "server.crt").read_bytes())]
        )
        srv = await _server(model, server_only, require_identity=True)
        try:
            c = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await c.open()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            await c.channel.close()
        finally:
            await srv.stop(None)

    _run(main)


def test_plaintext_behaviour_unchanged_and_bad_files_refused(model, certs, tmp_path):
    async def main() -> None:
        srv = await _server(model, None, require_identity=False)
        try:
            c = _client(model, srv.port, client_id="client-0")  # declared, nothing to check
            async with c:
                assert c.session is not None
                assert srv.service.sessions[c.session.session_id].identity is None
                assert math.isfinite(await _step(c))
        finally:
            await srv.stop(None)

    _run(main)
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"not a certificate")
    with pytest.raises(ValueError, match="not PEM"):
        mtls_server_credentials(ca_cert=junk, cert=certs / "server.crt", key=certs / "server.key")
    with pytest.raises(FileNotFoundError):
        ClientTls.from_dir(tmp_path, name="client-0").credentials()


# --- deployment plumbing: `fedft server` starts the service, `fedft client` hands the files


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A 3-layer, hidden-32 BERT classifier saved with the MiniLM tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert3"), layers=3, max_positions=64)


def _split_cfg(model_dir: str, server: str) -> RunConfig:
    return load_config(
        None,
        [
            f"model.name='{model_dir}'",
            "data.max_train_examples=60",
            "data.max_length=16",
            "data.test_size=16",
            "federation.num_clients=2",
            "federation.clients_per_round=2",
            "adapter.method='split'",
            "split.front_layers=1",
            "split.back_layers=1",
            f"split.server='{server}'",
        ],
    )


def test_split_service_addresses(tmp_path):
    base = load_config(None, ["adapter.method='split'", "split.server='fl.example.org:9093'"])
    plan = ServerPlan(out=tmp_path, address="0.0.0.0:9092")
    assert split_service_addresses(base, plan) == ("0.0.0.0:9093", base)
    bound = ServerPlan(out=tmp_path, address="0.0.0.0:9092", split_address="10.0.0.5:7000")
    assert split_service_addresses(base, bound)[0] == "10.0.0.5:7000"
    empty = replace(base, split=replace(base.split, server=""))
    bind, filled = split_service_addresses(empty, bound)
    assert bind == filled.split.server == "10.0.0.5:7000"  # clients are told where to dial
    with pytest.raises(DeployError, match="split.server"):
        split_service_addresses(empty, plan)  # nothing clients could dial
    with pytest.raises(DeployError, match="share the port"):
        split_service_addresses(replace(base, split=replace(base.split, server="h:9092")), plan)


def test_deployed_split_service_runs_mtls_for_node_config_clients(tiny_bert_dir, certs, tmp_path):
    """server/deploy.py serves with mTLS; client/deploy.py's node config gives a working
    ClientTls that declares client-1 with client-1's certificate."""
    from flwr.common.config import parse_config_args

    port = free_port()
    cfg = _split_cfg(tiny_bert_dir, f"127.0.0.1:{port}")
    plan = ServerPlan(
        out=tmp_path,
        address=f"127.0.0.1:{free_port()}",
        tls=ServerTls.from_dir(certs),
        node_keys=(certs / "client-0.pub",),
    )
    bind, cfg = split_service_addresses(cfg, plan)
    cert, key = split_tls_files(certs, 1)
    assert cert == certs / "client-1.crt" and key == certs / "client-1-tls.key"
    client_plan = ClientPlan(
        partition=1, server=plan.address, root_cert=certs / "ca.crt", split_cert=cert, split_key=key
    )
    tls = client_tls_from_node_config(parse_config_args([node_config(client_plan)]))
    assert tls == ClientTls(
        ca_cert=(certs / "ca.crt").resolve(),
        cert=cert.resolve(),
        key=key.resolve(),
        client_id="client-1",
    )
    with pytest.raises(ValueError, match="split-key"):
        client_tls_from_node_config({"split-ca": "a", "split-cert": "b"})
    assert client_tls_from_node_config({"partition-id": 0}) is None
    assert split_tls_files(tmp_path, 0) == (None, None)

    server = start_split_service(cfg, plan, bind=bind)
    try:
        service = server.service
        assert service.require_client_identity
        assert service.admission_file == plan.out / ADMISSION_FILE
        write_admission(service.admission_file, round_=1, identities=["client-1"])  # the round
        runtime, data, start = _round_inputs(cfg)
        kw = {
            "client_id": "1",
            "start": start,
            "data": data,
            "server_address": cfg.split.server,
            "model_id": cfg.model.name,
            "front_layers": 1,
            "back_layers": 1,
            "wire_dtype": "bf16",
            "in_flight": 2,
            "local_loss_steps": 0,
            "keep_fraction": 1.0,
            "steps": 2,
            "batch_size": 4,
            "lr": 0.01,
            "seed": 0,
        }
        update = run_split_round(runtime, tls=tls, **kw)  # type: ignore[arg-type]
        assert update.metrics["split_frames_up"] == 2 * 2 * 2  # steps x micro-batches x 2
        assert math.isfinite(update.metrics["train_loss"])
        assert "PERMISSION_DENIED" not in service.errors and service.stats()["sessions"] == 0
        with pytest.raises(RuntimeError, match="UNAVAILABLE"):
            run_split_round(runtime, tls=None, **kw)  # type: ignore[arg-type]
    finally:
        server.stop()
    assert not server.is_alive()


def _round_inputs(cfg: RunConfig):  # type: ignore[no-untyped-def]
    from fedft import builders
    from fedft.data import build_federated_data
    from fedft.data.encode import encode
    from fedft.training.coordinator import ClientStart
    from fedft.training.runtime import PROMPT, get_runtime, initial_prompt

    fed = build_federated_data(**builders.data_kwargs(cfg))
    runtime = get_runtime(
        **builders.runtime_kwargs(cfg, num_labels=fed.num_labels), device=torch.device("cpu")
    )
    data = encode(fed.clients[1], runtime.tokenizer, task="classification", max_length=16)
    extras = {**runtime.initial_extras, PROMPT: initial_prompt(runtime, num_tokens=2, seed=0)}
    return runtime, data, ClientStart(adapters={}, base_delta={}, extras=extras, rank=1)


def test_one_client_cannot_take_every_session(model, certs):
    """Attack (issue 14, item 5): client-0 opens sessions until refused; before, it could
    hold all 64 and client-1 got RESOURCE_EXHAUSTED. Now each certificate identity holds at
    most ``max_sessions_per_client`` (2) and client-1 still gets in and trains."""

    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs))
        flood: list[SplitClient] = []
        try:
            refused = None
            for _ in range(srv.service.max_sessions):
                c = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
                flood.append(c)
                try:
                    await c.open()
                except grpc.aio.AioRpcError as exc:
                    refused = exc
                    break
            assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "per client" in (refused.details() or "")
            held = [s for s in srv.service.sessions.values() if s.identity == "client-0"]
            assert len(held) == srv.service.max_sessions_per_client == 2
            other = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-1"))
            async with other:
                assert math.isfinite(await _step(other))
        finally:
            for c in flood:
                await c.channel.close()
            await srv.stop(None)

    _run(main)


def test_split_limits_are_the_runs_own():
    from server.split_runner import split_limits

    cfg = load_config(None, ["federation.batch_size=8", "data.max_length=32"])
    lim = split_limits(cfg)
    assert (lim.max_batch, lim.max_seq_len) == (8, 32 + cfg.adapter.prompt_tokens)


# --- one authenticated client against the others' share of the split server (issue 14) ---


def _heavy_bert() -> torch.nn.Module:
    """A BERT whose body (8 of 10 blocks) dominates a step: the server's compute is what a
    flooding client can take from the others."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=97,
        hidden_size=128,
        num_hidden_layers=10,
        num_attention_heads=4,
        intermediate_size=512,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg).eval()


FLOOD_LIMITS = wire.Limits(max_batch=8, max_seq_len=32, max_in_flight=2)
#: client-1's micro-batch rows: a quarter of the flooder's (the largest the limits allow)
VICTIM_B = 2


async def _flood(c: SplitClient, go: asyncio.Event, stop: asyncio.Event, jobs: list[int]) -> None:
    """While ``go`` is set, keep the session's two credits busy with the largest
    micro-batches the limits allow: forward, backward, ... pipelined, no client compute,
    commit every step."""
    assert c.session is not None
    sid = c.session.session_id
    hidden = wire.encode_tensor("hidden", torch.randn(8, 32, 128), "fp32")
    mask = wire.encode_tensor("attention_mask", torch.ones(8, 32, dtype=torch.long), "uint8")
    grad = wire.encode_tensor("grad", torch.randn(8, 32, 128) * 1e-3, "fp32")
    step = 0
    while not stop.is_set():
        if not go.is_set():
            await asyncio.sleep(0.01)
            continue
        for mb in range(2):
            await c.send(wire.Frame(sid, "forward", c.next_step_id(0, step, mb), (hidden, mask)))
        for _ in range(4):
            frame = await c.receive()
            assert frame.kind != "error", frame.error_message
            jobs[0] += 1
            if frame.kind == "body_output":
                await c.send(
                    wire.Frame(
                        sid, "backward", c.next_step_id(0, step, frame.step.micro_batch), (grad,)
                    )
                )
        await c.stub.commit(wire.CommitRequest(sid, 0, step))
        step += 1


async def _steps_in(c: SplitClient, seconds: float, first: int, b: int = 8) -> int:
    """How many full training steps (one b x 32 micro-batch, forward and backward through
    the server) ``c`` completes in ``seconds`` of wall time."""
    loop = asyncio.get_running_loop()
    end, n = loop.time() + seconds, 0
    while loop.time() < end:
        ids, mask, labels = batch("bert", b=b, t=32, seed=first + n)
        await c.train_step([(ids, mask, labels)], round_=0, step=first + n)
        n += 1
    return n


def _cut_ins(log: Sequence[tuple[str, str, float]], client: str) -> tuple[list[int], int]:
    """For each job of ``client``: how many other clients' jobs started on the worker
    between the moment it was asked for and its own start; and how many of its jobs were
    asked for while another client's job was running (they had to wait)."""
    out, waiting, count, running, contended = [], False, 0, 0, 0
    for event, who, _ in log:
        if who == client:
            if event == "wait":
                waiting, count = True, 0
                contended += running > 0
            elif event == "start" and waiting:
                out.append(count)
                waiting = False
        elif event == "start":
            running += 1
            count += waiting
        elif event == "end":
            running -= 1
    return out, contended


def _ms(pair: tuple[float, float]) -> tuple[int, int]:
    return (round(pair[0] * 1e3), round(pair[1] * 1e3))


def _job_times(
    log: Sequence[tuple[str, str, float]], client: str, windows: Sequence[tuple[float, float]]
) -> tuple[float, float]:
    """Mean seconds ``client``'s jobs asked for inside ``windows`` waited for the worker
    and ran on it."""
    asked: float | None = None
    started: float | None = None
    waits, runs = [], []
    for event, who, t in log:
        if who != client:
            continue
        if event == "wait":
            asked = t if any(a <= t < b for a, b in windows) else None
        elif event == "start" and asked is not None:
            started = t
            waits.append(t - asked)
        elif event == "end" and asked is not None and started is not None:
            runs.append(t - started)
            asked = started = None
    return (sum(waits) / max(1, len(waits)), sum(runs) / max(1, len(runs)))


def test_a_flooding_client_does_not_starve_another(certs):
    """Attack (issue 14, item 5): client-0 floods the split server with the largest
    micro-batches over both of its sessions, pipelined, doing no work of its own, while
    client-1 trains. Each client identity has at most one job on the worker, and the running
    job hands the worker over between the body's blocks to a waiting job of a client that has
    had less of it recently, so a client-1 job waits for one client-0 *block*, not a whole
    job (before the turns, client-0's two sessions held two places in the worker's FIFO
    queue ahead of client-1's one; with turns between jobs only, one whole client-0 job).

    Client-1's step counts in equal windows, alone, flooded, and flooded with the turns
    taken between jobs only (the reference), rotate five times so the shared machine's load
    weighs on all three alike. Asserted: client-1 trains at >= 0.5 of its solo step rate
    under the flood (the issue's target), and its jobs found the worker busy and still
    waited for at most one client-0 job to start. On two shared cores client-1's own front
    and back compute shares the CPU with client-0's jobs (in a deployment the client computes
    on its own machine), which no scheduling of the server's worker removes; the numbers of
    each run are in docs/benchmarks.md §14."""
    model = _heavy_bert()
    window, cycles = 2.0, 5

    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs), limits=FLOOD_LIMITS)
        service = srv.service
        go, stop, jobs = asyncio.Event(), asyncio.Event(), [0]
        victim = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-1"))
        flooders = [
            _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            for _ in range(2)
        ]
        tasks: list[asyncio.Task[None]] = []
        try:
            async with victim:
                for f in flooders:
                    await f.open()
                tasks = [asyncio.create_task(_flood(f, go, stop, jobs)) for f in flooders]
                await _steps_in(victim, 1.0, first=0, b=VICTIM_B)  # warm up
                kinds = ("solo", "flooded", "jobwise")
                steps: dict[str, list[int]] = {k: [] for k in kinds}
                windows: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
                clock = asyncio.get_running_loop().time  # time.monotonic, as the job log
                for k in range(cycles):
                    for j, kind in enumerate(kinds):
                        service.worker.between_blocks = kind != "jobwise"
                        if kind == "solo":
                            go.clear()
                            await asyncio.sleep(0.3)  # the last flood steps drain
                        else:
                            go.set()
                            await asyncio.sleep(0.3)
                        t0 = clock()
                        first = 1000 * (len(kinds) * k + j + 1)
                        steps[kind].append(await _steps_in(victim, window, first, b=VICTIM_B))
                        windows[kind].append((t0, clock()))
                go.clear()
                service.worker.between_blocks = True
                stop.set()
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
            cut_ins, contended = _cut_ins(list(service.job_log), "client-1")
            times = {
                (who, w): _job_times(service.job_log, who, windows[w])
                for who in ("client-0", "client-1")
                for w in kinds
            }
            solo = sum(steps["solo"])
            ratio = sum(steps["flooded"]) / solo
            print(
                f"\nsplit flood: client-1 steps in {cycles} x {window} s windows: solo {solo}, "
                f"flooded {sum(steps['flooded'])} (ratio {ratio:.2f}, per cycle "
                f"{[round(f / max(1, s), 2) for s, f in zip(steps['solo'], steps['flooded'])]}"
                f"), flooded with turns between jobs only {sum(steps['jobwise'])} (ratio "
                f"{sum(steps['jobwise']) / solo:.2f}); client-1 job wait / run (ms): solo "
                f"{_ms(times['client-1', 'solo'])}, flooded {_ms(times['client-1', 'flooded'])}"
                f", jobwise {_ms(times['client-1', 'jobwise'])}; client-0 job run (ms), "
                f"flooded {_ms(times['client-0', 'flooded'])[1]}, jobwise "
                f"{_ms(times['client-0', 'jobwise'])[1]}; client-0 jobs {jobs[0]}; hand-overs "
                f"between blocks {service.worker.switches}; client-1 jobs that found the "
                f"worker busy: {contended}; client-0 jobs started while a "
                f"client-1 job waited: {dict(collections.Counter(cut_ins))}"
            )
            assert jobs[0] >= 2 * sum(steps["flooded"])  # the flood really ran beside
            assert contended >= 5  # client-1's jobs found the worker busy with client-0's
            assert service.worker.switches >= 5  # ... and the turn came to them mid-job
            assert max(cut_ins) <= 1, "a client-1 job waited for two client-0 jobs"
            assert ratio >= 0.5, f"client-1 trained at {ratio:.2f} of its solo step rate"
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            for f in flooders:
                await f.channel.close()
            await srv.stop(None)

    asyncio.run(asyncio.wait_for(main(), timeout=300))


def test_memory_admission_counts_the_activations_kept_for_backward(model, certs):
    """Attack (issue 14, item 5): sessions used to be admitted by count only, and a
    session's state counted its inputs and outputs but not the activations autograd keeps
    for backward (most of the memory). Now OpenSession reserves what the session's largest
    micro-batches keep (measured), a session that would exceed the budget is refused, and
    the bytes a pending micro-batch holds include its saved activations."""
    limits = wire.Limits(max_batch=4, max_seq_len=8, max_in_flight=2)
    in_out = 2 * 4 * 8 * 32 * 4  # a 4 x 8 x H=32 fp32 micro-batch's inputs and output

    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs), limits=limits)
        service = srv.service
        try:
            first = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            async with first:
                assert first.session is not None
                reserved = service.sessions[first.session.session_id].reserved
                assert reserved > 2 * 3 * in_out  # two micro-batches, each > 3x inputs + output
                service.max_state_bytes = reserved + reserved // 2  # room for one session only
                second = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-1"))
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await second.open()
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "memory" in (refused.value.details() or "")
                await second.channel.close()
                ids, mask, _ = batch("bert", b=4, t=8, seed=0)
                front = front_forward(first.parts, ids, mask)
                hidden = wire.encode_tensor("hidden", front.hidden, "fp32")
                m = wire.encode_tensor("attention_mask", front.attention_mask, "uint8")
                sid = first.session.session_id
                await first.send(
                    wire.Frame(sid, "forward", first.next_step_id(0, 0, 0), (hidden, m))
                )
                assert (await first.receive()).kind == "body_output"
                adapter = service.sessions[sid].adapter
                kept = service.stats()["state_bytes"] - (adapter.nbytes() if adapter else 0)
                assert kept > 3 * in_out  # the saved activations are counted, not only in/out
                assert kept <= reserved
        finally:
            await srv.stop(None)

    _run(main)


def test_empty_commits_do_not_keep_a_session_alive(model, certs):
    """Attack (issue 14, item 5): a client that stops sending work but keeps calling Commit
    held its session (and its memory reservation) forever, since every Commit counted as
    activity. Now only forward/backward work and Commits of committed micro-batches do; the
    reaper frees the session once the timeout passes without work."""

    async def main() -> None:
        srv = await _server(model, server_credentials_from_dir(certs), session_timeout_s=1.0)
        service = srv.service
        try:
            c = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            await c.open()
            assert c.session is not None
            sid = c.session.session_id
            await _step(c, step=0)  # real work: the session is alive
            assert sid in service.sessions
            freed_by_commit = None
            for step in range(1, 16):  # 3 s of empty Commits, one every 0.2 s
                await asyncio.sleep(0.2)
                try:
                    await c.stub.commit(wire.CommitRequest(sid, 0, step))
                except grpc.aio.AioRpcError as exc:
                    freed_by_commit = exc
                    break
            assert sid not in service.sessions
            assert freed_by_commit is not None
            assert freed_by_commit.code() == grpc.StatusCode.NOT_FOUND
            await c.channel.close()
        finally:
            await srv.stop(None)

    _run(main)


def test_only_clients_sampled_this_round_are_admitted(model, certs, tmp_path):
    """Attack (issue 14, item 5): any client with a certificate could open sessions in any
    round, sampled or not, and keep them. Now the round names its cohort
    (``write_admission``): client-0, not sampled, is refused with NOT_SAMPLED; client-1
    trains; when the next round samples client-0 only, client-1's session is freed and
    client-0 gets in. Without any list nobody is admitted."""
    admission = tmp_path / ADMISSION_FILE

    async def main() -> None:
        srv = await _server(
            model,
            server_credentials_from_dir(certs),
            session_timeout_s=1.0,
            admission_file=admission,
        )
        service = srv.service
        try:
            early = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-1"))
            with pytest.raises(IdentityError, match=NOT_SAMPLED):  # PERMISSION_DENIED
                await early.open()
            await early.channel.close()
            write_admission(admission, round_=1, identities=["client-1"])
            outsider = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            with pytest.raises(IdentityError, match=f"PERMISSION_DENIED: {NOT_SAMPLED}"):
                await outsider.open()
            await outsider.channel.close()
            sampled = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-1"))
            await sampled.open()
            assert math.isfinite(await _step(sampled))
            write_admission(admission, round_=2, identities=["client-0"])
            for _ in range(40):  # the reaper runs every quarter timeout
                if not service.sessions:
                    break
                await asyncio.sleep(0.1)
            assert not service.sessions  # client-1's session went with its round
            await sampled.channel.close()
            now = _client(model, srv.port, tls=ClientTls.from_dir(certs, name="client-0"))
            async with now:
                assert math.isfinite(await _step(now))
            assert service.errors[NOT_SAMPLED] == 2
        finally:
            await srv.stop(None)

    _run(main)
