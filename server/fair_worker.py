"""The split server's body worker: one computation at a time, shared fairly between clients.

The shared body can serve one forward or backward at a time (it is one set of weights, and
on a CPU server one job already uses every core). A first-in-first-out queue lets a client
that keeps the worker busy make every other client wait a whole job of its own per job:
with jobs of equal size, a client training beside a flooder gets half its solo speed at
best. This worker takes turns between *blocks* instead of jobs:

- every job runs on a thread of its own, but only the job holding the worker's *turn*
  computes; the others wait on a condition variable;
- the body's blocks are *yield points* (:func:`install_yield_points`): before each block's
  forward, and when the gradient reaches each block's input in backward, the running job
  asks whether a job of another client waits that has had less of the worker recently
  (seconds of worker time, decayed with a half-life, so an idle client's past use fades);
  if so it hands the turn over and waits for it to come back;
- the job that gets the turn is always the waiting one whose client has had the least
  recent worker time (ties: the one that asked first).

So a client whose job arrives while a flooder's job runs waits one block, not one job, and
then runs to its end while the flooder (which has had more of the worker) waits. Two
clients that both keep the worker busy get equal shares of it.

Yield points run only on the job's own thread. On a GPU, autograd runs backward on its own
device thread, where the hooks do nothing (waiting there would stall every other job's
backward): a GPU server takes turns between blocks in forward and between jobs in backward.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

#: the job running on this thread: (worker, client key); absent on other threads.
_current = threading.local()


def _yield_point(*_: Any) -> None:
    """Hand the worker over to a more deserving job, if one waits (no-op outside jobs)."""
    job = getattr(_current, "job", None)
    if job is not None:
        job[0].checkpoint(job[1])


def _forward_pre_hook(module: nn.Module, args: tuple[Any, ...]) -> None:
    _yield_point()
    hidden = args[0] if args else None
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        hidden.register_hook(_yield_point)  # backward: the gradient reached this block's input


def install_yield_points(blocks: Iterable[nn.Module]) -> None:
    """Make each of ``blocks`` a yield point in forward and backward (idempotent)."""
    for block in blocks:
        if not getattr(block, "_fedft_yield_point", False):
            block.register_forward_pre_hook(_forward_pre_hook)
            block._fedft_yield_point = True  # type: ignore[assignment]


class FairWorker:
    """Runs jobs one at a time, switching between clients' jobs at yield points.

    Args:
        max_jobs: threads (jobs present at once; more queue first-in-first-out for a thread).
            The service gives each client at most one job, so its session cap is enough.
        half_life_s: how fast a client's recent worker time fades.
        thread_name_prefix: the threads' name prefix.
        between_blocks: hand the turn over at yield points (False: only between jobs, which
            is what the service did before; kept so the two can be measured side by side).
        on_event: called with ("start" | "end" | "pause" | "resume", client key) on the job's
            thread as the job first gets the turn, finishes, hands the turn over, gets it
            back.
    """

    def __init__(
        self,
        *,
        max_jobs: int,
        half_life_s: float = 1.0,
        thread_name_prefix: str = "split-body",
        between_blocks: bool = True,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self._cond = threading.Condition()
        self._tickets = itertools.count()
        self._waiting: dict[int, str] = {}  #: ticket -> client key, jobs waiting for the turn
        self._holder: int | None = None  #: ticket holding the turn
        self._slice_start = 0.0
        self._used: dict[str, tuple[float, float]] = {}  #: key -> (decayed seconds, at time)
        self._half_life = half_life_s
        self.between_blocks = between_blocks
        self._on_event = on_event or (lambda event, key: None)
        self.switches = 0  #: times a job handed the turn to another mid-job
        self._executor = ThreadPoolExecutor(
            max_workers=max_jobs, thread_name_prefix=thread_name_prefix
        )

    @property
    def threads(self) -> set[threading.Thread]:
        """The worker's threads (started lazily, one per concurrent job)."""
        return set(self._executor._threads)

    def waiting(self) -> int:
        """How many jobs wait for the turn now."""
        with self._cond:
            return len(self._waiting)

    async def run(self, key: str, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` as a job of client ``key``; returns its result."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._job, key, fn, args
        )

    def shutdown(self) -> None:
        """Let the jobs present finish, then end the threads."""
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ the turn

    def _recent(self, key: str, now: float) -> float:
        used, at = self._used.get(key, (0.0, now))
        return used * 0.5 ** ((now - at) / self._half_life)

    def _charge(self, key: str, now: float) -> None:
        self._used[key] = (self._recent(key, now) + (now - self._slice_start), now)

    def _next(self, now: float) -> int | None:
        """The waiting ticket whose client has had the least recent worker time."""
        if not self._waiting:
            return None
        return min(self._waiting, key=lambda t: (self._recent(self._waiting[t], now), t))

    def _take(self, ticket: int, key: str) -> None:
        """Wait (holding ``_cond``) until ``ticket`` is the one that gets the turn."""
        self._waiting[ticket] = key
        while not (self._holder is None and self._next(time.monotonic()) == ticket):
            self._cond.wait()
        del self._waiting[ticket]
        self._holder = ticket
        self._slice_start = time.monotonic()

    def _give(self, key: str) -> None:
        """Hand the turn back (holding ``_cond``), charging ``key`` for its slice."""
        self._charge(key, time.monotonic())
        self._holder = None
        self._cond.notify_all()

    def _job(self, key: str, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        ticket = next(self._tickets)
        with self._cond:
            self._take(ticket, key)
        _current.job = (self, key, ticket)
        self._on_event("start", key)
        try:
            return fn(*args)
        finally:
            self._on_event("end", key)
            _current.job = None
            with self._cond:
                self._give(key)

    def checkpoint(self, key: str) -> None:
        """Called by the running job between blocks: yield to a job of a client that has had
        less of the worker recently, and wait for the turn to come back."""
        if not self._waiting or not self.between_blocks:  # the common case costs no lock
            return
        ticket = _current.job[2]
        with self._cond:
            now = time.monotonic()
            nxt = self._next(now)
            if nxt is None:
                return
            mine = self._recent(key, now) + (now - self._slice_start)
            if self._waiting[nxt] == key or self._recent(self._waiting[nxt], now) >= mine:
                return
            self.switches += 1
            self._give(key)
            self._on_event("pause", key)
            self._take(ticket, key)
        self._on_event("resume", key)
