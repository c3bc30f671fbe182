"""fedft split-training gRPC service (``fedft.split.v1.SplitTraining``) on grpc.aio.

One shared frozen body, one :class:`~fedft.split.BodyAdapter` + optimiser per session.
Every frame is validated (session, kind, step ids, credits, tensor roles, dtype, shape,
size, finiteness) before anything is allocated; a bad frame gets a typed ERROR frame and
the stream (and the server) stay up. Body compute runs off the event loop, one job at a
time (the shared body is used by one forward/backward at a time, and the event loop stays
free for I/O); each client identity has at most one job at a time, and jobs take turns
between the body's blocks, the client with the least recent worker time first
(:mod:`server.fair_worker`). Sessions
are admitted by memory (what their largest micro-batches keep for backward, measured), and
freed after ``session_timeout_s`` without work (a killed client, or one sending only empty
Commits or bad frames).

Identity: behind mutual TLS (``grpc.ssl_server_credentials(..., require_client_auth=True)``)
gRPC verifies the client's certificate against the deployment CA and exposes its common name
in ``context.auth_context()["x509_common_name"]``. OpenSession binds the new session to that
identity; every later Commit, Close and Exchange stream on the session must come from the
same identity, else the call ends with ``PERMISSION_DENIED`` and details starting with
``IDENTITY_MISMATCH`` (the session id is a secret, but a leaked one is still useless to
another client). A client may declare its id in the ``fedft-client-id`` metadata of
OpenSession; behind mTLS it must equal its certificate's CN. Without TLS (loopback
simulation, tests) the identity is None for everyone and nothing changes.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import torch

from fedft.privacy.persample import ClippedSum, noisy_mean
from fedft.split import Blocks, BodyAdapter, BodyContext, body_backward, body_forward
from fedft.split.dp import DetachedBody, body_backward_per_sample, body_forward_detached
from fedft.transport import split_wire as wire
from fedft.transport.split_wire import Frame, Limits, WireError
from server.fair_worker import FairWorker, install_yield_points

log = logging.getLogger(__name__)

UP_ROLES = {"forward": ("hidden", "attention_mask"), "backward": ("grad",)}
#: auth-context key of the verified peer certificate's common name (gRPC core).
CN_KEY = "x509_common_name"
#: OpenSession metadata key in which a client may declare its id (checked against its CN).
CLIENT_ID_METADATA = "fedft-client-id"
#: prefix of the details of a PERMISSION_DENIED caused by an identity check.
IDENTITY_MISMATCH = "IDENTITY_MISMATCH"
#: prefix of the details of a PERMISSION_DENIED for a client not sampled this round.
NOT_SAMPLED = "NOT_SAMPLED"
#: the file (in the run's output folder) naming the identities sampled this round.
ADMISSION_FILE = "split-admission.json"


def write_admission(path: Path, *, round_: int, identities: Iterable[str]) -> None:
    """Name the client identities the split service admits from now on (this round's
    cohort): written by the round before it sends its messages, read by the service.

    Written to a temporary file (0600) and renamed over ``path``, so a reader sees the old
    list or the new one, never half of one.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"round": int(round_), "clients": sorted(set(identities))}, f)
    os.replace(tmp, path)


def read_admission(path: Path) -> tuple[int, frozenset[str]] | None:
    """``(round, identities)`` from :func:`write_admission`'s file; None if absent or
    unreadable (then nobody is admitted)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        clients = raw["clients"]
        if not isinstance(raw["round"], int) or not all(isinstance(c, str) for c in clients):
            raise ValueError("bad types")
        return raw["round"], frozenset(clients)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("split admission list %s unreadable (%s): admitting no one", path, exc)
        return None


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The common name of the peer's verified client certificate; None without mutual TLS.

    gRPC fills ``x509_common_name`` only for a certificate it verified against the server's
    root certificates (``require_client_auth=True``); a certificate with several CNs has no
    single identity and counts as none.
    """
    values = context.auth_context().get(CN_KEY) or []
    if len(values) != 1:
        return None
    return bytes(values[0]).decode("utf-8", errors="replace")


def declared_client_id(context: grpc.aio.ServicerContext) -> str | None:
    """The ``fedft-client-id`` the client put in its call metadata (None if absent)."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_METADATA:
            return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else value
    return None


@dataclass
class _ServerDP:
    """A DP session's mechanism on its adapter: the step's clipped sum, σ, B, the noise."""

    config: wire.ServerDP
    clip: ClippedSum
    generator: torch.Generator

    def release(self, adapter: BodyAdapter) -> None:
        """Set the adapter's ``.grad`` to (Σ clipped + N(0, σ²C²)) / B and start a new sum."""
        grads = noisy_mean(
            self.clip,
            noise_multiplier=self.config.noise_multiplier,
            expected_batch_size=self.config.expected_batch_size,
            generator=self.generator,
        )
        for name, p in adapter.named_parameters():
            p.grad = grads[name].to(p.dtype)
        params = dict(adapter.named_parameters())
        self.clip = ClippedSum(params, max_grad_norm=self.clip.max_grad_norm)


def _client_key(s: _Session) -> str:
    """Whose turn a session's job takes: its certificate identity, or the session alone."""
    return s.identity if s.identity is not None else f"session {s.sid}"


@dataclass
class _Session:
    sid: str
    adapter: BodyAdapter | None
    optimizer: torch.optim.Optimizer | None
    wire_dtype: wire.WireDType
    limits: Limits
    credits: int
    last_seen: float
    identity: str | None = None
    committed: tuple[int, int] = (-1, -1)
    last_seq: int = -1
    pending: dict[tuple[int, int, int], BodyContext | DetachedBody] = field(default_factory=dict)
    done: set[tuple[int, int, int]] = field(default_factory=set)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    dp: _ServerDP | None = None
    reserved: int = 0  #: bytes admitted for this session (see SplitService._reserve)
    kept: dict[tuple[int, int, int], int] = field(default_factory=dict)  #: pending -> bytes

    def state_bytes(self) -> int:
        """Adapter bytes plus what the pending micro-batches keep for their backward
        (inputs, output and the activations autograd saved, as measured at the forward)."""
        n = self.adapter.nbytes() if self.adapter is not None else 0
        return n + sum(self.kept.get(key, 0) for key in self.pending)


class SplitService:
    """The service: control plane (open/commit/close) and the per-session data stream.

    Args:
        body: the server's blocks (frozen here; shared by all sessions).
        hidden_size: H.
        model_id: what clients must name in OpenSession.
        front_layers: client front blocks this body expects.
        limits: the server's own limits (message bytes, batch, sequence, in-flight).
        session_timeout_s: an idle session is freed after this many seconds.
        max_sessions: OpenSession beyond this is refused (RESOURCE_EXHAUSTED).
        max_sessions_per_client: OpenSession from a certificate identity that already holds
            this many sessions is refused (RESOURCE_EXHAUSTED), so one client cannot take
            every slot; anonymous peers (plaintext) share the global cap only.
        require_client_identity: refuse (UNAUTHENTICATED) an OpenSession whose peer has no
            verified client certificate; set it whenever the server runs mutual TLS, so that a
            misconfiguration (TLS without client auth) fails closed instead of open.
        admission_file: when set, only the client identities this file names (this round's
            cohort, :func:`write_admission`) may open sessions (else PERMISSION_DENIED,
            ``NOT_SAMPLED``), and sessions of identities a newer list leaves out are freed.
            Without the file nobody is admitted. Needs client identities (mutual TLS).
        max_state_bytes: memory budget of all sessions together: OpenSession is refused
            (RESOURCE_EXHAUSTED) when the open sessions' reservations plus the new one's
            (adapter, optimiser state, ``max_in_flight`` largest micro-batches with the
            activations kept for their backward, measured) would exceed it.

    Scheduling: body compute runs one job at a time on a :class:`~server.fair_worker.FairWorker`,
    and each client identity (each session, for anonymous peers) has at most one job queued
    or running at a time. Between the body's blocks the running job hands the worker to a
    waiting job of a client that has had less of it recently, so a client flooding frames
    over all its sessions delays another client's job by one block, not one job, and two
    busy clients get equal shares of the worker.
    """

    def __init__(
        self,
        *,
        body: Blocks,
        hidden_size: int,
        model_id: str,
        front_layers: int,
        limits: Limits | None = None,
        session_timeout_s: float = 60.0,
        max_sessions: int = 64,
        max_sessions_per_client: int = 2,
        require_client_identity: bool = False,
        max_state_bytes: int = 4 << 30,
        admission_file: Path | None = None,
    ) -> None:
        for p in body.parameters():
            p.requires_grad_(False)
        self.body = body
        self.hidden_size = hidden_size
        self.model_id = model_id
        self.front_layers = front_layers
        self.body_layers = len(body.layers)
        self.limits = limits or Limits()
        self.session_timeout_s = session_timeout_s
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client
        self.require_client_identity = require_client_identity
        self.max_state_bytes = max_state_bytes
        self.admission_file = admission_file
        self._admission: tuple[int, tuple[int, int, int] | None, frozenset[str]] = (
            -1,
            None,
            frozenset(),
        )
        self.sessions: dict[str, _Session] = {}
        self._probe_bytes: dict[tuple[int, int, int, bool], int] = {}
        self._turns: dict[str, asyncio.Lock] = {}
        #: the last jobs, in order: ("wait", client, t) when one is asked for, ("start",
        #: client, t) / ("end", client, t) when it starts / ends on the worker (t:
        #: time.monotonic() seconds)
        self.job_log: collections.deque[tuple[str, str, float]] = collections.deque(maxlen=100_000)
        self.frames_received = 0
        self.errors: dict[str, int] = {}
        install_yield_points(body.layers)
        self.worker = self._new_worker()

    def _new_worker(self) -> FairWorker:
        def note(event: str, key: str) -> None:
            self.job_log.append((event, key, time.monotonic()))

        return FairWorker(max_jobs=self.max_sessions + 1, on_event=note)

    # ------------------------------------------------------------------ bookkeeping

    def stats(self) -> dict[str, int]:
        """Sessions, in-flight micro-batches, bytes of per-session state, frames received."""
        return {
            "sessions": len(self.sessions),
            "in_flight": sum(len(s.pending) for s in self.sessions.values()),
            "state_bytes": sum(s.state_bytes() for s in self.sessions.values()),
            "frames_received": self.frames_received,
        }

    def _free(self, sid: str, why: str) -> None:
        s = self.sessions.pop(sid, None)
        if s is not None:
            s.pending.clear()
            s.kept.clear()
            if s.identity is None or not any(
                o.identity == s.identity for o in self.sessions.values()
            ):
                self._turns.pop(_client_key(s), None)
            log.info("split session %s… freed (%s)", sid[:8], why)

    def expire_idle(self, now: float | None = None) -> int:
        """Free sessions idle longer than the timeout; returns how many were freed."""
        now = time.monotonic() if now is None else now
        stale = [k for k, s in self.sessions.items() if now - s.last_seen > self.session_timeout_s]
        for sid in stale:
            self._free(sid, "timeout")
        return len(stale)

    def stop_worker(self) -> None:
        """Wait for the body's worker thread to finish its job and end it (idempotent).

        A fresh worker (no thread until its first job) takes its place, so the service
        can be served again.
        """
        self.worker.shutdown()
        self.worker = self._new_worker()

    async def reap_forever(self) -> None:
        """Background task: :meth:`expire_idle` and :meth:`expire_unadmitted` every quarter
        timeout."""
        while True:
            await asyncio.sleep(max(0.05, self.session_timeout_s / 4))
            self.expire_idle()
            self.expire_unadmitted()

    def admitted(self) -> frozenset[str] | None:
        """The identities admitted now (None: no admission list, everyone)."""
        if self.admission_file is None:
            return None
        try:
            st = self.admission_file.stat()
            stamp: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            stamp = None
        if stamp != self._admission[1]:
            got = read_admission(self.admission_file) if stamp is not None else None
            rnd, ids = got if got is not None else (-1, frozenset[str]())
            if rnd != self._admission[0]:
                log.info("split admission: round %d, %d clients", rnd, len(ids))
            self._admission = (rnd, stamp, ids)
        return self._admission[2]

    def expire_unadmitted(self) -> int:
        """Free the sessions of identities the admission list no longer names."""
        admitted = self.admitted()
        if admitted is None:
            return 0
        gone = [k for k, s in self.sessions.items() if s.identity not in admitted]
        for sid in gone:
            self._free(sid, "client not sampled this round")
        return len(gone)

    async def _deny(self, context: grpc.aio.ServicerContext, why: str) -> None:
        self.errors["PERMISSION_DENIED"] = self.errors.get("PERMISSION_DENIED", 0) + 1
        log.warning("split call refused: %s", why)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{IDENTITY_MISMATCH}: {why}")

    async def _authorize(self, s: _Session, context: grpc.aio.ServicerContext, what: str) -> None:
        """Abort with PERMISSION_DENIED unless the caller is the identity that opened ``s``."""
        peer = peer_identity(context)
        if peer != s.identity:
            await self._deny(
                context,
                f"{what} on a session opened by another client identity "
                f"(this caller's certificate identity: {peer!r})",
            )

    async def _compute(self, s: _Session, fn: Any, *args: Any) -> Any:
        """Run ``fn`` on the worker once this session's client has no other job there."""
        key = _client_key(s)
        self.job_log.append(("wait", key, time.monotonic()))
        turn = self._turns.setdefault(key, asyncio.Lock())
        async with turn:
            return await self.worker.run(key, fn, *args)

    # ------------------------------------------------------------------ control plane

    async def open_session(
        self, req: wire.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> wire.OpenSessionReply:
        identity, declared = await self._identify(context)
        await self._check_request(req, context)
        await self._check_capacity(identity, context)
        lim = self._negotiate(req.limits)
        adapter, opt, dp = self._build_adapter(req)
        reserved = await self._reserve(lim, adapter, dp is not None, context)
        sid = secrets.token_hex(16)
        self.sessions[sid] = _Session(
            sid,
            adapter,
            opt,
            req.wire_dtype,
            lim,
            lim.max_in_flight,
            time.monotonic(),
            identity,
            dp=dp,
            reserved=reserved,
        )
        log.info(
            "split session %s… opened for %s (%s, rank %d, %d MiB reserved)",
            sid[:8],
            identity or declared or "an anonymous client",
            req.wire_dtype,
            req.lora_rank,
            reserved >> 20,
        )
        return wire.OpenSessionReply(
            sid, lim, self.hidden_size, lim.max_in_flight, self.session_timeout_s, dp is not None
        )

    async def _identify(self, context: grpc.aio.ServicerContext) -> tuple[str | None, str | None]:
        """The caller's certificate identity and declared id (aborts on a mismatch)."""
        identity = peer_identity(context)
        if identity is None and self.require_client_identity:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this split server requires a client certificate signed by the deployment CA",
            )
        declared = declared_client_id(context)
        if declared is not None and identity is not None and declared != identity:
            await self._deny(
                context,
                f"declared client id {declared!r} != certificate identity {identity!r}",
            )
        admitted = self.admitted()
        if admitted is not None and identity not in admitted:
            self.errors[NOT_SAMPLED] = self.errors.get(NOT_SAMPLED, 0) + 1
            log.warning("split session refused: %s is not sampled this round", identity)
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{NOT_SAMPLED}: client {identity!r} is not in this round's cohort",
            )
        return identity, declared

    async def _check_request(
        self, req: wire.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Abort unless the request names the served model and cut and sane settings."""
        if req.model_id != self.model_id:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"model_id {req.model_id!r} != served model {self.model_id!r}",
            )
        if (req.front_layers, req.body_layers) != (self.front_layers, self.body_layers):
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"cut (front {req.front_layers}, body {req.body_layers}) != served cut "
                f"(front {self.front_layers}, body {self.body_layers})",
            )
        if req.lora_rank > 256 or not 0 <= req.server_lr < 10:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "lora_rank or server_lr out of range"
            )
        if req.server_dp is not None and req.lora_rank < 1:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "server_dp needs a server adapter (lora_rank >= 1): a frozen body trains nothing",
            )

    async def _check_capacity(
        self, identity: str | None, context: grpc.aio.ServicerContext
    ) -> None:
        """Abort (RESOURCE_EXHAUSTED) past the per-identity or the global session cap."""
        if identity is not None:
            held = sum(1 for s in self.sessions.values() if s.identity == identity)
            if held >= self.max_sessions_per_client:
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"client {identity!r} already holds {held} open sessions (at most "
                    f"{self.max_sessions_per_client} per client); close one or wait for it to "
                    "expire",
                )
        if len(self.sessions) >= self.max_sessions:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many open sessions")

    def _negotiate(self, theirs: Limits) -> Limits:
        """The session's limits: the server's own, lowered where the client asks (0 = none)."""
        mine = self.limits

        def pick(own: int, asked: int) -> int:
            return min(own, asked) if asked > 0 else own

        return Limits(
            max_message_bytes=pick(mine.max_message_bytes, theirs.max_message_bytes),
            max_batch=pick(mine.max_batch, theirs.max_batch),
            max_seq_len=pick(mine.max_seq_len, theirs.max_seq_len),
            max_in_flight=pick(mine.max_in_flight, theirs.max_in_flight),
        )

    def _build_adapter(
        self, req: wire.OpenSessionRequest
    ) -> tuple[BodyAdapter | None, torch.optim.Optimizer | None, _ServerDP | None]:
        """The session's adapter, its optimiser and, for a DP session, its mechanism."""
        if req.lora_rank <= 0:
            return None, None, None
        adapter = BodyAdapter(
            self.body, rank=req.lora_rank, alpha=req.lora_alpha or 16.0, seed=req.seed
        )
        opt = torch.optim.AdamW(adapter.parameters(), lr=req.server_lr or 1e-3)
        dp = None
        if req.server_dp is not None:
            clip = ClippedSum(
                dict(adapter.named_parameters()), max_grad_norm=req.server_dp.max_grad_norm
            )
            noise = torch.Generator().manual_seed(secrets.randbits(63))  # never the client's
            dp = _ServerDP(req.server_dp, clip, noise)
        return adapter, opt, dp

    async def _reserve(
        self,
        lim: Limits,
        adapter: BodyAdapter | None,
        dp: bool,
        context: grpc.aio.ServicerContext,
    ) -> int:
        """Admission by memory: the bytes the session may hold (adapter, its optimiser state,
        and ``max_in_flight`` largest micro-batches with the activations kept for backward);
        RESOURCE_EXHAUSTED when the open sessions' reservations plus this one exceed
        ``max_state_bytes``."""
        per_batch = await self._micro_batch_bytes(lim.max_batch, lim.max_seq_len, adapter, dp)
        params = 3 * adapter.nbytes() if adapter is not None else 0  # weights + AdamW moments
        need = params + lim.max_in_flight * per_batch
        held = sum(s.reserved for s in self.sessions.values())
        if held + need > self.max_state_bytes:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"memory: this session needs {need >> 20} MiB ({lim.max_in_flight} micro-batches "
                f"of {lim.max_batch} x {lim.max_seq_len} with their saved activations), open "
                f"sessions hold {held >> 20} of {self.max_state_bytes >> 20} MiB; retry later "
                "or ask for smaller limits",
            )
        return need

    async def _micro_batch_bytes(
        self, batch: int, seq_len: int, adapter: BodyAdapter | None, dp: bool
    ) -> int:
        """Bytes one (batch x seq_len) micro-batch keeps until its backward: inputs, output
        and the saved activations, measured once per shape (here by a forward on zeros, or
        by the first real micro-batch of that shape) and cached."""
        key = (batch, seq_len, adapter.nbytes() if adapter is not None else 0, dp)
        if key not in self._probe_bytes:
            hidden = torch.zeros(batch, seq_len, self.hidden_size)
            mask = torch.ones(batch, seq_len, dtype=torch.long)
            forward = body_forward_detached if dp else body_forward
            _, nbytes = await self.worker.run(
                "memory probe", self._measured, forward, adapter, hidden, mask
            )
            self._probe_bytes[key] = nbytes
        return self._probe_bytes[key]

    def _measured(
        self, forward: Any, adapter: BodyAdapter | None, hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[BodyContext | DetachedBody, int]:
        """Run ``forward`` and count the bytes it keeps: inputs, output and every tensor
        autograd saved for backward (the shared frozen weights and the adapter excluded)."""
        shared = {p.untyped_storage().data_ptr() for p in self.body.parameters()}
        if adapter is not None:
            shared |= {p.untyped_storage().data_ptr() for p in adapter.parameters()}
        saved: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in shared:
                saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ctx = forward(self.body, adapter, hidden, mask)
        for t in (ctx.inputs, ctx.output):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return ctx, sum(saved.values())

    async def commit(
        self, req: wire.CommitRequest, context: grpc.aio.ServicerContext
    ) -> wire.CommitReply:
        s = self.sessions.get(req.session_id)
        if s is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "UNKNOWN_SESSION")
        assert s is not None
        await self._authorize(s, context, "Commit")
        async with s.lock:
            if (req.round, req.step) <= s.committed:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "STALE commit")
            count = len(s.done)
            if s.dp is not None and s.adapter is not None and s.optimizer is not None:
                # DP: every committed step releases noise, also one with no micro-batches
                await self._compute(s, s.dp.release, s.adapter)
                await self._compute(s, s.optimizer.step)
                s.optimizer.zero_grad(set_to_none=True)
            elif s.optimizer is not None and count:
                await self._compute(s, s.optimizer.step)
                s.optimizer.zero_grad(set_to_none=True)
            s.committed = (req.round, req.step)
            s.done.clear()
            s.pending.clear()
            s.kept.clear()
            if count:  # a Commit of no micro-batch does not keep an idle session alive
                s.last_seen = time.monotonic()
        return wire.CommitReply(count)

    async def close(self, req: wire.CloseRequest, context: grpc.aio.ServicerContext) -> None:
        s = self.sessions.get(req.session_id)
        if s is not None:
            await self._authorize(s, context, "Close")
        self._free(req.session_id, "closed")

    # ------------------------------------------------------------------ data plane

    async def exchange(
        self, frames: AsyncIterator[Frame], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Frame]:
        bound: str | None = None
        async for frame in frames:
            self.frames_received += 1
            if bound is not None and frame.session_id not in ("", bound):
                yield self._error(frame, "UNKNOWN_SESSION", "one stream serves one session")
                continue
            s = self.sessions.get(bound or frame.session_id)
            if s is None:
                if bound is not None:  # freed after a timeout while the stream was idle
                    yield self._error(frame, "EXPIRED", "session timed out and was freed")
                    return
                yield self._error(frame, "UNKNOWN_SESSION", "no such session on this server")
                continue
            if bound is None:  # the stream's identity is fixed: check it once, when binding
                await self._authorize(s, context, "Exchange")
            sid = s.sid
            bound = sid
            try:
                async with s.lock:
                    reply = await self._handle(s, frame)
                s.last_seen = time.monotonic()  # only work done keeps a session alive
            except WireError as err:
                reply = self._error(frame, err.code, err.message)
            except Exception:  # keep the server up on anything unexpected
                log.exception("split frame failed")
                reply = self._error(frame, "INTERNAL", "internal error")
            yield reply

    def _error(self, frame: Frame, code: wire.ErrorCode, message: str) -> Frame:
        self.errors[code] = self.errors.get(code, 0) + 1
        return Frame(frame.session_id, "error", frame.step, error_code=code, error_message=message)

    async def _handle(self, s: _Session, frame: Frame) -> Frame:
        if frame.kind == "error" and frame.error_code is not None:
            raise WireError(frame.error_code, frame.error_message or "malformed frame")
        if frame.kind not in UP_ROLES:
            raise WireError("BAD_FRAME", f"a client may not send {frame.kind} frames")
        roles = UP_ROLES[frame.kind]
        bad = [t.name for t in frame.tensors if t.name not in roles]
        if bad:
            raise WireError(
                "FORBIDDEN_CONTENT", f"{frame.kind} frame may carry only {roles}: {bad}"
            )
        step = frame.step
        if (step.round, step.step) <= s.committed:
            raise WireError("STALE", f"step {step.key} is at or before committed {s.committed}")
        if step.sequence <= s.last_seq:
            raise WireError("DUPLICATE", f"sequence {step.sequence} already seen")
        s.last_seq = step.sequence
        if frame.kind == "forward":
            return await self._forward(s, frame)
        return await self._backward(s, frame)

    async def _forward(self, s: _Session, frame: Frame) -> Frame:
        key = frame.step.key
        if key in s.pending or key in s.done:
            raise WireError("DUPLICATE", f"micro-batch {key} already forwarded")
        if len(s.pending) >= s.credits:
            raise WireError("OVER_CREDIT", f"{len(s.pending)} micro-batches already in flight")
        lim, h = s.limits, self.hidden_size
        hidden_wt = frame.tensor("hidden")
        hidden = wire.decode_tensor(
            hidden_wt,
            max_elements=lim.max_batch * lim.max_seq_len * h,
            expect_shape=(None, None, h),
        )
        b, t, _ = hidden.shape
        if b > lim.max_batch or t > lim.max_seq_len:
            raise WireError("SHAPE_REJECTED", f"batch {b} x seq {t} exceeds {lim}")
        mask = wire.decode_mask(frame.tensor("attention_mask"), batch=b, seq_len=t)
        forward = body_forward_detached if s.dp is not None else body_forward
        shape = (b, t, s.adapter.nbytes() if s.adapter is not None else 0, s.dp is not None)
        if shape in self._probe_bytes:  # measured before: a plain forward
            ctx = await self._compute(s, forward, self.body, s.adapter, hidden, mask)
        else:  # the first micro-batch of this shape counts what it keeps
            ctx, self._probe_bytes[shape] = await self._compute(
                s, self._measured, forward, s.adapter, hidden, mask
            )
        s.pending[key] = ctx
        s.kept[key] = self._probe_bytes[shape]
        out = wire.encode_tensor("hidden", ctx.output, s.wire_dtype)
        return Frame(s.sid, "body_output", frame.step, (out,))

    async def _backward(self, s: _Session, frame: Frame) -> Frame:
        key = frame.step.key
        ctx = s.pending.get(key)
        if ctx is None:
            code: wire.ErrorCode = "DUPLICATE" if key in s.done else "STALE"
            raise WireError(code, f"no pending forward for micro-batch {key}")
        shape = tuple(int(x) for x in ctx.output.shape)
        grad = wire.decode_tensor(
            frame.tensor("grad"), max_elements=ctx.output.numel(), expect_shape=shape
        )
        if isinstance(ctx, DetachedBody):  # DP session: per-example adapter grads, clipped
            assert s.dp is not None and s.adapter is not None
            grad_cut = await self._compute(
                s, body_backward_per_sample, self.body, s.adapter, ctx, grad, s.dp.clip
            )
        else:
            grad_cut = await self._compute(s, body_backward, ctx, grad)
        del s.pending[key]
        s.kept.pop(key, None)
        s.done.add(key)
        out = wire.encode_tensor("grad", grad_cut, s.wire_dtype)
        return Frame(s.sid, "cut_gradient", frame.step, (out,), credits=1)


@dataclass
class RunningServer:
    """A started server: the grpc.aio server, its bound port, the service and the reaper."""

    server: grpc.aio.Server
    port: int
    service: SplitService
    reaper: asyncio.Task[None]

    async def stop(self, grace: float | None = None) -> None:
        self.reaper.cancel()
        await self.server.stop(grace)
        self.service.stop_worker()  # no thread outlives the server


async def start_server(
    service: SplitService,
    *,
    address: str = "127.0.0.1:0",
    server_credentials: grpc.ServerCredentials | None = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Start ``service`` on ``address`` (port 0 = any free port) with both message limits set.

    ``server_credentials`` (e.g. ``grpc.ssl_server_credentials(..., require_client_auth=True)``
    for mTLS) switches to a secure port; plaintext otherwise.
    """
    max_bytes = service.limits.max_message_bytes
    server = grpc.aio.server(
        options=wire.channel_options(max_bytes), interceptors=list(interceptors) or None
    )
    server.add_generic_rpc_handlers(
        (
            wire.generic_handler(
                open_session=service.open_session,
                commit=service.commit,
                close=service.close,
                exchange=service.exchange,
            ),
        )
    )
    if server_credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, server_credentials)
    await server.start()
    reaper = asyncio.get_running_loop().create_task(service.reap_forever())
    log.info("split server on %s (port %d)", address, port)
    return RunningServer(server, port, service, reaper)


def build_service(
    model: torch.nn.Module,
    *,
    model_id: str,
    front_layers: int,
    back_layers: int,
    limits: Limits | None = None,
    session_timeout_s: float = 60.0,
    require_client_identity: bool = False,
    admission_file: Path | None = None,
) -> SplitService:
    """Cut ``model`` and serve its body (the front/back blocks are simply unused here).

    ``require_client_identity``, ``admission_file``: see :class:`SplitService` (set both
    under mutual TLS).
    """
    from fedft.split import split_model

    parts = split_model(model, front_layers=front_layers, back_layers=back_layers)
    return SplitService(
        body=parts.body,
        hidden_size=parts.hidden_size,
        model_id=model_id,
        front_layers=front_layers,
        limits=limits,
        session_timeout_s=session_timeout_s,
        require_client_identity=require_client_identity,
        admission_file=admission_file,
    )
