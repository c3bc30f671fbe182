"""The split server's body worker hands the turn over between blocks (issue 14, item 5).

A flooding client's long job used to make another client's job wait for all of it (one
worker thread, first in first out). These tests play the flooder with a job that is
already running when the other client's job arrives, and check where the other job runs:
at the flooder's next block boundary, in forward and in backward.
"""

from __future__ import annotations

import asyncio
import threading
import time

import torch
from torch import nn

from server.fair_worker import FairWorker, install_yield_points


def _blocks(n: int = 6) -> nn.ModuleList:
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(n))
    install_yield_points(blocks)
    return blocks


def _wait_for(cond, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_a_waiting_client_runs_at_the_next_block_not_after_the_whole_job() -> None:
    blocks = _blocks()
    events: list[tuple[str, str]] = []
    worker = FairWorker(max_jobs=4, on_event=lambda e, k: events.append((e, k)))
    order: list[tuple[str, int]] = []

    def job(name: str, hold: threading.Event | None = None) -> None:
        x = torch.ones(1, 4)
        for i, block in enumerate(blocks):
            x = block(x)  # the block's yield point runs first
            order.append((name, i))
            if hold is not None and i == 0:
                hold.set()  # the flooder is inside its job: let the victim arrive
                _wait_for(lambda: worker.waiting() == 1)

    async def main() -> None:
        await worker.run("flooder", job, "warm-up")  # the flooder has used the worker
        started = threading.Event()
        flood = asyncio.ensure_future(worker.run("flooder", job, "flooder", started))
        await asyncio.get_running_loop().run_in_executor(None, started.wait)
        await asyncio.gather(flood, worker.run("victim", job, "victim"))

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()
    real = [o for o in order if o[0] != "warm-up"]
    assert real == [("flooder", 0)] + [("victim", i) for i in range(6)] + [
        ("flooder", i) for i in range(1, 6)
    ]
    assert worker.switches == 1
    assert ("pause", "flooder") in events and ("resume", "flooder") in events


def test_the_turn_is_handed_over_between_blocks_in_backward_too() -> None:
    blocks = _blocks()
    for p in blocks.parameters():
        p.requires_grad_(False)
    done: list[str] = []
    worker = FairWorker(max_jobs=4)
    grads_seen: list[int] = []

    def flood_backward(arrived: threading.Event) -> None:
        x = torch.ones(1, 4, requires_grad=True)
        h = x
        outs = []
        for block in blocks:
            h = block(h)
            outs.append(h)

        # in backward, once the gradient has passed the last block, the victim arrives
        def victim_arrives(g: torch.Tensor) -> None:
            arrived.set()
            _wait_for(lambda: worker.waiting() == 1)

        outs[-2].register_hook(victim_arrives)
        for k, out in enumerate(outs[:-2]):
            out.register_hook(lambda g, k=k: grads_seen.append(k))
        h.sum().backward()
        done.append("flooder")

    def victim() -> None:
        done.append(f"victim after {len(grads_seen)} flooder block gradients")

    async def main() -> None:
        await worker.run("flooder", lambda: blocks[0](torch.ones(1, 4)))  # some history
        arrived = threading.Event()
        flood = asyncio.ensure_future(worker.run("flooder", flood_backward, arrived))
        await asyncio.get_running_loop().run_in_executor(None, arrived.wait)
        await asyncio.gather(flood, worker.run("victim", victim))

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()
    # the victim ran at the flooder's next yield point in backward (the gradient reaching
    # the last block's input), before the flooder's remaining blocks' backward
    assert done == ["victim after 0 flooder block gradients", "flooder"]
    assert grads_seen == [3, 2, 1, 0]
    assert worker.switches == 1


def test_the_client_with_less_recent_worker_time_goes_first() -> None:
    worker = FairWorker(max_jobs=4, half_life_s=60.0)
    ran: list[str] = []
    gate = threading.Event()

    def hold() -> None:
        gate.wait()

    async def main() -> None:
        # "busy" has used the worker for 50 ms, "light" for none
        await worker.run("busy", time.sleep, 0.05)
        first = asyncio.ensure_future(worker.run("holder", hold))
        await asyncio.sleep(0.05)
        jobs = [
            asyncio.ensure_future(worker.run("busy", ran.append, "busy")),
            asyncio.ensure_future(worker.run("light", ran.append, "light")),
        ]
        await asyncio.get_running_loop().run_in_executor(
            None, _wait_for, lambda: worker.waiting() == 2
        )
        gate.set()
        await asyncio.gather(first, *jobs)

    try:
        asyncio.run(main())
    finally:
        worker.shutdown()
    assert ran == ["light", "busy"]  # "busy" asked first, but had more of the worker


def test_yield_points_outside_a_job_do_nothing() -> None:
    blocks = _blocks(2)
    x = torch.ones(1, 4, requires_grad=True)
    y = blocks[1](blocks[0](x))
    y.sum().backward()  # no worker, no job: the hooks must not block or fail
    assert x.grad is not None
