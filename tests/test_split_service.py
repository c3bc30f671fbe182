"""The split gRPC service on real loopback sockets: exactness, privacy of the wire, hostile
input, limits, duplicates, timeouts and concurrency."""

from __future__ import annotations

import asyncio
import copy
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from test_split_support import HIDDEN, batch, tiny_bert, tiny_llama

from client.split_client import SplitClient
from fedft.split import BodyAdapter, split_model, split_train_step
from fedft.transport import split_wire as wire
from fedft.transport.split_wire import Frame, Limits, WireTensor
from server.split_service import build_service, start_server

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "tiny"


class Recorder(grpc.aio.ServerInterceptor):
    """Records every data-plane frame the server receives and sends."""

    def __init__(self) -> None:
        self.up: list[Frame] = []
        self.down: list[Frame] = []

    async def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        handler = await continuation(details)
        if handler is None or handler.stream_stream is None:
            return handler
        inner = handler.stream_stream

        async def behaviour(requests, context):  # type: ignore[no-untyped-def]
            async def recorded():  # type: ignore[no-untyped-def]
                async for f in requests:
                    self.up.append(f)
                    yield f

            async for out in inner(recorded(), context):
                self.down.append(out)
                yield out

        return grpc.stream_stream_rpc_method_handler(
            behaviour,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _server(model, *, limits=None, timeout=30.0, interceptors=()):  # type: ignore[no-untyped-def]
    service = build_service(
        copy.deepcopy(model),
        model_id=MODEL_ID,
        front_layers=1,
        back_layers=1,
        limits=limits or Limits(),
        session_timeout_s=timeout,
    )
    return await start_server(service, interceptors=interceptors)


def _client(model, port, **kw):  # type: ignore[no-untyped-def]
    parts = split_model(model, front_layers=1, back_layers=1)
    return SplitClient(parts, target=f"127.0.0.1:{port}", model_id=MODEL_ID, **kw)


def _forward_frame(c: SplitClient, ids, mask, mb=0, step=0, dtype="fp32", round_=0) -> Frame:  # type: ignore[no-untyped-def]
    from fedft.split import front_forward

    f = front_forward(c.parts, ids, mask)
    assert c.session is not None
    return Frame(
        c.session.session_id,
        "forward",
        c.next_step_id(round_, step, mb),
        (
            wire.encode_tensor("hidden", f.hidden, dtype),
            wire.encode_tensor("attention_mask", f.attention_mask, "uint8"),
        ),
    )


def test_stopping_the_server_ends_the_body_worker_thread() -> None:
    """The body's worker thread ends with the server, not when the service is collected."""
    model = tiny_bert(layers=4)

    def workers() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("split-body")]

    async def run() -> None:
        srv = await _server(model)
        try:
            async with _client(model, srv.port, wire_dtype="fp32", lora_rank=4, seed=7) as c:
                await c.train_step([batch("bert", b=2, seed=0)], round_=0, step=0)
            worker = srv.service.worker
            assert worker.threads  # the step ran on the worker
        finally:
            await srv.stop()
        assert not [t for t in worker.threads if t.is_alive()]
        # served again after a stop: a fresh worker takes the job
        srv = await start_server(srv.service)
        try:
            async with _client(model, srv.port, wire_dtype="fp32", lora_rank=4, seed=7) as c:
                await c.train_step([batch("bert", b=2, seed=1)], round_=0, step=0)
        finally:
            await srv.stop()

    before = set(workers())
    asyncio.run(run())
    assert not set(workers()) - before


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_loopback_step_equals_in_process_and_wire_carries_no_ids_labels_logits(
    family: str,
) -> None:
    build = tiny_bert if family == "bert" else tiny_llama
    model = build(layers=4)
    oracle = copy.deepcopy(model)
    mbs = [batch(family, b=3, seed=s) for s in (0, 1)]
    rec = Recorder()

    async def run() -> float:
        srv = await _server(model, interceptors=[rec])
        try:
            async with _client(model, srv.port, wire_dtype="fp32", lora_rank=4, seed=7) as c:
                loss = await c.train_step(mbs, round_=0, step=0)
                assert srv.service.stats()["in_flight"] == 0
                return loss
        finally:
            await srv.stop()

    loss = asyncio.run(run())

    parts = split_model(oracle, front_layers=1, back_layers=1)
    for p in parts.body.parameters():
        p.requires_grad_(False)
    adapter = BodyAdapter(parts.body, rank=4, alpha=16.0, seed=7)
    ref = sum(float(split_train_step(parts, adapter, *mb, loss_scale=0.5)) for mb in mbs)
    assert abs(loss - ref) <= 1e-5
    body_ids = {id(p) for p in parts.body.parameters()}
    ref_params = dict(oracle.named_parameters())
    n = 0
    for name, p in model.named_parameters():
        if id(ref_params[name]) in body_ids:
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-5, rtol=1e-4)
        n += 1
    assert n > 5

    # Every frame on the wire: only hidden states, the 0/1 mask and gradients.
    assert len(rec.up) == 4 and len(rec.down) == 4
    vocab = model.config.vocab_size
    for f in rec.up + rec.down:
        for t in f.tensors:
            assert t.name in ("hidden", "attention_mask", "grad")
            if t.name == "attention_mask":
                assert t.dtype == "uint8" and len(t.shape) == 2
                assert set(t.data) <= {0, 1}
            else:
                assert t.dtype in ("fp32", "bf16", "fp16")
                assert len(t.shape) == 3 and t.shape[-1] == HIDDEN != vocab
    sent_ids = {bytes(mb[0].numpy().tobytes()) for mb in mbs}
    for f in rec.up:
        for t in f.tensors:
            assert t.data not in sent_ids


def test_four_concurrent_clients_train() -> None:
    async def one(port: int, seed: int) -> list[float]:
        model = tiny_bert(layers=3)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        data = [batch("bert", b=4, seed=seed)]
        async with _client(model, port, wire_dtype="bf16", lora_rank=2, server_lr=3e-3) as c:
            return [await c.train_step(data, round_=0, step=s, optimizer=opt) for s in range(6)]

    async def run() -> list[list[float]]:
        srv = await _server(tiny_bert(layers=3))
        body = srv.service.body
        params = dict(body.named_parameters())
        values = {k: v.clone() for k, v in body.state_dict().items()}
        try:
            out = await asyncio.gather(*(one(srv.port, s) for s in range(4)))
            assert srv.service.stats()["sessions"] == 0  # all closed
            assert srv.service.errors == {}
            # jobs interleave between blocks; the shared body is never swapped or written
            assert dict(body.named_parameters()) == params
            assert all(torch.equal(v, values[k]) for k, v in body.state_dict().items())
            return list(out)
        finally:
            await srv.stop()

    for losses in asyncio.run(run()):
        assert losses[-1] < losses[0] - 0.05, losses


def test_hostile_frames_get_typed_errors_and_server_stays_up() -> None:
    model = tiny_bert(layers=3)
    ids, mask, labels = batch("bert", b=2)

    async def run() -> None:
        srv = await _server(model)
        try:
            async with _client(model, srv.port, wire_dtype="fp32") as c:
                sid = c.session.session_id  # type: ignore[union-attr]
                good = _forward_frame(c, ids, mask)
                hidden, m = good.tensors

                async def expect(frame: Frame, code: str) -> None:
                    await c.send(frame)
                    reply = await c.receive()
                    assert (reply.kind, reply.error_code) == ("error", code), reply.error_message

                def frame(*tensors: WireTensor) -> Frame:
                    return Frame(sid, "forward", c.next_step_id(0, 0, 0), tensors)

                short = WireTensor("hidden", "fp32", hidden.shape, hidden.data[:-4])
                await expect(frame(short, m), "SHAPE_REJECTED")
                huge = WireTensor("hidden", "fp32", (1 << 40, 1 << 40, HIDDEN), hidden.data)
                await expect(frame(huge, m), "SHAPE_REJECTED")
                nan = wire.encode_tensor("hidden", torch.full(hidden.shape, float("nan")), "fp32")
                await expect(frame(nan, m), "NON_FINITE")
                odd = WireTensor("hidden", "unknown:42", hidden.shape, hidden.data)
                await expect(frame(odd, m), "UNSUPPORTED_DTYPE")
                lab = wire.encode_tensor("labels", labels.float(), "fp32")
                await expect(frame(hidden, m, lab), "FORBIDDEN_CONTENT")
                ids_t = wire.encode_tensor("input_ids", ids.to(torch.uint8), "uint8")
                await expect(frame(ids_t, m), "FORBIDDEN_CONTENT")
                bad_mask = wire.encode_tensor("attention_mask", mask * 7, "uint8")
                await expect(frame(hidden, bad_mask), "SHAPE_REJECTED")
                wrong = Frame("0" * 32, "forward", c.next_step_id(0, 0, 0), (hidden, m))
                await expect(wrong, "UNKNOWN_SESSION")
                grad = Frame(sid, "backward", c.next_step_id(0, 0, 5), (hidden,))
                await expect(grad, "FORBIDDEN_CONTENT")
                # Still serving: a real step on the same stream works.
                loss = await c.train_step([(ids, mask, labels)], round_=0, step=0)
                assert loss > 0
                errors = srv.service.errors
                assert errors["SHAPE_REJECTED"] == 3 and errors["FORBIDDEN_CONTENT"] == 3

            # A fresh stream naming an unknown session gets UNKNOWN_SESSION too.
            c2 = _client(model, srv.port, wire_dtype="fp32")
            await c2.open()
            await c2.send(Frame("f" * 32, "forward", c2.next_step_id(0, 0, 0), (hidden, m)))
            assert (await c2.receive()).error_code == "UNKNOWN_SESSION"
            await c2.close()
        finally:
            await srv.stop()

    asyncio.run(run())


def test_oversized_message_is_resource_exhausted() -> None:
    model = tiny_bert(layers=3)

    async def run() -> None:
        srv = await _server(model, limits=Limits(max_message_bytes=32 * 1024))
        try:
            big = Limits(max_message_bytes=16 * 1024 * 1024)
            c = _client(model, srv.port, wire_dtype="fp32", limits=big)
            await c.open()
            ids, mask, _ = batch("bert", b=8, t=48)  # 8*48*32*4 = 49 KiB of activations
            await c.send(_forward_frame(c, ids, mask))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await c.receive()
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await c.close()
            async with _client(model, srv.port, wire_dtype="fp32") as ok:
                assert await ok.train_step([batch("bert", b=2)], round_=0, step=0) > 0
        finally:
            await srv.stop()

    asyncio.run(run())


def test_duplicate_and_stale_steps_rejected_not_double_counted() -> None:
    model = tiny_bert(layers=3)
    ids, mask, labels = batch("bert", b=2)

    async def run() -> None:
        srv = await _server(model, limits=Limits(max_in_flight=1))
        try:
            async with _client(model, srv.port, wire_dtype="fp32", lora_rank=2) as c:
                sid = c.session.session_id  # type: ignore[union-attr]
                fwd = _forward_frame(c, ids, mask, mb=0)
                await c.send(fwd)
                out = await c.receive()
                assert out.kind == "body_output"
                await c.send(fwd)  # same sequence number
                assert (await c.receive()).error_code == "DUPLICATE"
                await c.send(_forward_frame(c, ids, mask, mb=0))  # same micro-batch
                assert (await c.receive()).error_code == "DUPLICATE"
                await c.send(_forward_frame(c, ids, mask, mb=1))  # 1 credit only
                assert (await c.receive()).error_code == "OVER_CREDIT"
                g = wire.encode_tensor("grad", torch.ones(2, 10, HIDDEN) * 1e-3, "fp32")
                await c.send(Frame(sid, "backward", c.next_step_id(0, 0, 0), (g,)))
                cut = await c.receive()
                assert cut.kind == "cut_gradient" and cut.credits == 1
                await c.send(Frame(sid, "backward", c.next_step_id(0, 0, 0), (g,)))
                assert (await c.receive()).error_code == "DUPLICATE"
                await c.send(Frame(sid, "backward", c.next_step_id(0, 0, 3), (g,)))
                assert (await c.receive()).error_code == "STALE"
                reply = await c.stub.commit(wire.CommitRequest(sid, 0, 0))
                assert reply.micro_batches == 1  # the duplicates were not counted
                await c.send(_forward_frame(c, ids, mask, mb=2, step=0))  # committed step
                assert (await c.receive()).error_code == "STALE"
                with pytest.raises(grpc.aio.AioRpcError):
                    await c.stub.commit(wire.CommitRequest(sid, 0, 0))
                assert srv.service.stats()["in_flight"] == 0
        finally:
            await srv.stop()

    asyncio.run(run())


def test_frames_and_commits_of_an_earlier_round_are_stale_whatever_their_step() -> None:
    """Order is (round, step): after commit(1, 0), step 5 of round 0 is in the past even
    with a fresh sequence number, and so is a commit of (0, 9)."""
    model = tiny_bert(layers=3)
    ids, mask, _ = batch("bert", b=2)

    async def run() -> None:
        srv = await _server(model)
        try:
            async with _client(model, srv.port, wire_dtype="fp32", lora_rank=2) as c:
                sid = c.session.session_id  # type: ignore[union-attr]
                assert (await c.stub.commit(wire.CommitRequest(sid, 1, 0))).micro_batches == 0
                await c.send(_forward_frame(c, ids, mask, mb=0, step=5))  # round 0, step 5
                late = await c.receive()
                assert late.kind == "error" and late.error_code == "STALE"
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await c.stub.commit(wire.CommitRequest(sid, 0, 9))
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                # control: the next step of round 1 is accepted and counted
                await c.send(_forward_frame(c, ids, mask, mb=0, step=1, round_=1))
                assert (await c.receive()).kind == "body_output"
                assert srv.service.stats()["in_flight"] == 1
        finally:
            await srv.stop()

    asyncio.run(run())


def test_local_phase_sends_zero_messages() -> None:
    model = tiny_bert(layers=3)

    async def run() -> None:
        srv = await _server(model)
        try:
            async with _client(model, srv.port) as c:
                opt = torch.optim.SGD(model.parameters(), lr=0.1)
                losses = c.local_phase([batch("bert", seed=s) for s in range(3)], opt)
                assert len(losses) == 3
                assert c.traffic.frames_up == 0 and c.traffic.bytes_up == 0
                await asyncio.sleep(0.05)
                assert srv.service.frames_received == 0
        finally:
            await srv.stop()

    asyncio.run(run())


_KILLED_CLIENT = """
import asyncio, sys
sys.path.insert(0, "tests")
from test_split_support import batch, tiny_bert
from client.split_client import SplitClient
from fedft.split import split_model
from fedft.transport import split_wire as wire
from fedft.split import front_forward

async def main():
    parts = split_model(tiny_bert(layers=3), front_layers=1, back_layers=1)
    c = SplitClient(parts, target=sys.argv[1], model_id="tiny", wire_dtype="fp32", lora_rank=2)
    await c.open()
    ids, mask, _ = batch("bert", b=2)
    f = front_forward(parts, ids, mask)
    h = wire.encode_tensor("hidden", f.hidden, "fp32")
    m = wire.encode_tensor("attention_mask", f.attention_mask, "uint8")
    await c.send(wire.Frame(c.session.session_id, "forward", c.next_step_id(0, 0, 0), (h, m)))
    print("READY", (await c.receive()).kind, flush=True)
    await asyncio.sleep(120)

asyncio.run(main())
"""


def test_killed_client_session_freed_after_timeout() -> None:
    async def run() -> None:
        srv = await _server(tiny_bert(layers=3), timeout=1.0)
        try:
            baseline = srv.service.stats()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                _KILLED_CLIENT,
                f"127.0.0.1:{srv.port}",
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            assert line.decode().strip() == "READY body_output"
            mid = srv.service.stats()
            assert mid["sessions"] == 1 and mid["in_flight"] == 1 and mid["state_bytes"] > 0
            proc.kill()  # mid-step: forward done, backward never comes
            await proc.wait()
            killed_at = time.monotonic()
            assert srv.service.stats()["sessions"] == 1  # kept until the timeout
            while srv.service.stats()["sessions"] and time.monotonic() - killed_at < 10:
                await asyncio.sleep(0.1)
            after = srv.service.stats()
            assert after["sessions"] == 0 and after["in_flight"] == 0
            assert after["state_bytes"] == baseline["state_bytes"] == 0
            assert time.monotonic() - killed_at < 3.0
            async with _client(tiny_bert(layers=3), srv.port) as ok:  # still serving
                assert await ok.train_step([batch("bert", b=2)], round_=0, step=0) > 0
        finally:
            await srv.stop()

    asyncio.run(run())
