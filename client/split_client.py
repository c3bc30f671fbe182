"""Split-training client for ``fedft.split.v1.SplitTraining`` (grpc.aio).

Runs the client half of the U-shape (front, back, loss) and exchanges only cut activations,
the padding mask and gradients with the server. Micro-batches are pipelined up to the
credits the server grants; each CUT_GRADIENT returns a credit. One
:meth:`SplitClient.train_step` loops over three named steps on a ``_StepState``: send the
front outputs the credits allow, answer a body output with the back's gradient, apply a cut
gradient to the front.

Mutual TLS: :class:`ClientTls` names the deployment CA, the client's certificate and key
(``fedft certs``: ``ca.crt``, ``client-<i>.crt``, ``client-<i>-tls.key``) and the client id
to declare; the server binds the session to the certificate's identity and refuses a
declared id that differs from it (:class:`IdentityError`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from torch import Tensor

from fedft.certs import read_pem
from fedft.privacy.persample import ClippedSum
from fedft.split import (
    FrontOutput,
    SplitParts,
    back_backward,
    back_forward,
    front_backward,
    front_forward,
    local_loss_phase,
)
from fedft.split.dp import (
    Grads,
    PerSampleFront,
    back_per_sample,
    client_trainables,
    front_grads_per_sample,
    front_per_sample,
    merge,
)
from fedft.transport import split_wire as wire
from fedft.transport.split_wire import Frame, Limits, StepId

log = logging.getLogger(__name__)

MicroBatch = tuple[Tensor, Tensor, Tensor]  # input_ids (B, T), attention_mask (B, T), labels
#: OpenSession metadata key carrying the declared client id (server/split_service.py reads it).
CLIENT_ID_METADATA = "fedft-client-id"


class SplitError(RuntimeError):
    """The server answered a frame with a typed error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class IdentityError(SplitError):
    """The server refused the call: this client's certificate identity does not own the
    session, or the declared client id differs from it (gRPC ``PERMISSION_DENIED``)."""


def mtls_channel_credentials(
    *, ca_cert: str | Path, cert: str | Path, key: str | Path
) -> grpc.ChannelCredentials:
    """Channel credentials for mutual TLS with the split server.

    Args:
        ca_cert: PEM certificate of the CA that signed the server's certificate.
        cert: PEM certificate of this client (CN = its identity, e.g. ``client-0``).
        key: PEM private key of ``cert``.

    Returns:
        ``grpc.ssl_channel_credentials`` that verify the server and present the client cert.
    """
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_cert, "CA certificate"),
        private_key=read_pem(key, "client TLS key"),
        certificate_chain=read_pem(cert, "client certificate"),
    )


@dataclass(frozen=True, kw_only=True)
class ClientTls:
    """A split client's mutual-TLS material.

    Attributes:
        ca_cert: the deployment CA certificate (``ca.crt``).
        cert: this client's certificate (``client-<i>.crt``, CN = its identity).
        key: its private key (``client-<i>-tls.key``).
        client_id: the id declared at OpenSession (``client-<i>``); the server refuses it
            unless it equals the certificate's CN. None declares nothing.
        server_name: expected server name when the dialled address is not in the server
            certificate's SANs (``grpc.ssl_target_name_override``); None = the address.
    """

    ca_cert: Path
    cert: Path
    key: Path
    client_id: str | None = None
    server_name: str | None = None

    @classmethod
    def from_dir(cls, certs: str | Path, *, name: str) -> ClientTls:
        """``ca.crt``, ``<name>.crt`` and ``<name>-tls.key`` in ``certs``; declares ``name``."""
        d = Path(certs)
        return cls(
            ca_cert=d / "ca.crt", cert=d / f"{name}.crt", key=d / f"{name}-tls.key", client_id=name
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """The channel credentials (files read now; see :func:`mtls_channel_credentials`)."""
        return mtls_channel_credentials(ca_cert=self.ca_cert, cert=self.cert, key=self.key)


def _typed(err: grpc.aio.AioRpcError) -> Exception:
    """PERMISSION_DENIED as :class:`IdentityError`; any other RPC error unchanged."""
    if err.code() == grpc.StatusCode.PERMISSION_DENIED:
        return IdentityError("PERMISSION_DENIED", err.details() or "identity check failed")
    return err


@dataclass
class Traffic:
    """Frames and payload bytes (tensor data only) in each direction."""

    frames_up: int = 0
    frames_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


@dataclass
class _StepState:
    """One training step's micro-batches in flight (see :meth:`SplitClient.train_step`).

    Attributes:
        micro_batches: the step's (input_ids, attention_mask, labels) micro-batches.
        clip: sample-level DP's clipped-sum accumulator (None: plain gradients).
        params: under DP, the client trainables whose per-example gradients are formed.
        fronts: micro-batch -> its front output, until its cut gradient comes back.
        back_grads: under DP, micro-batch -> the back half's per-example gradients.
        losses: the summed loss of each micro-batch answered so far.
        examples: under DP, the examples whose loss is in ``losses``.
        sent, done: micro-batches sent forward / finished (cut gradient applied).
    """

    micro_batches: Sequence[MicroBatch]
    clip: ClippedSum | None
    params: Mapping[str, Tensor]
    fronts: dict[int, FrontOutput | PerSampleFront] = field(default_factory=dict)
    back_grads: dict[int, list[Grads]] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    examples: int = 0
    sent: int = 0
    done: int = 0

    @property
    def n(self) -> int:
        return len(self.micro_batches)

    @property
    def labels(self) -> list[Tensor]:
        return [mb[2] for mb in self.micro_batches]


class SplitClient:
    """One client's split session.

    Args:
        parts: the client's split model (front/back used; the body is never called).
        target: "host:port" of the split server.
        model_id: must equal the server's.
        wire_dtype: "bf16" (default), "fp16" (scaled) or "fp32".
        limits: the client's limits (message bytes also set on the channel).
        lora_rank: server-side LoRA rank on the body (0 = frozen body).
        lora_alpha: server-side LoRA alpha.
        server_lr: server adapter learning rate.
        seed: server adapter init seed.
        server_dp: sample-level DP-SGD on the server adapter (needs ``lora_rank >= 1``); the
            session is refused (:class:`SplitError` DP_REFUSED) unless the server confirms it.
        channel_credentials: e.g. ``grpc.ssl_channel_credentials(...)`` for (m)TLS.
        tls: mutual TLS from files (builds ``channel_credentials``, declares its client id,
            sets the server name override); exclusive with ``channel_credentials``.
        client_id: id declared at OpenSession (``fedft-client-id`` metadata); defaults to
            ``tls.client_id``.
        server_name_override: ``grpc.ssl_target_name_override`` (TLS only).
        interceptors: grpc.aio client interceptors (auditing, auth metadata).
    """

    def __init__(
        self,
        parts: SplitParts,
        *,
        target: str,
        model_id: str,
        wire_dtype: wire.WireDType = "bf16",
        limits: Limits | None = None,
        lora_rank: int = 0,
        lora_alpha: float = 16.0,
        server_lr: float = 1e-3,
        seed: int = 0,
        server_dp: wire.ServerDP | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        tls: ClientTls | None = None,
        client_id: str | None = None,
        server_name_override: str | None = None,
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> None:
        limits = limits or Limits()
        if tls is not None:
            if channel_credentials is not None:
                raise ValueError("pass tls or channel_credentials, not both")
            channel_credentials = tls.credentials()
            client_id = client_id if client_id is not None else tls.client_id
            server_name_override = server_name_override or tls.server_name
        if server_name_override and channel_credentials is None:
            raise ValueError("server_name_override needs TLS channel credentials")
        self._metadata = () if client_id is None else ((CLIENT_ID_METADATA, client_id),)
        self.parts = parts
        self.wire_dtype = wire_dtype
        self.traffic = Traffic()
        self._request = wire.OpenSessionRequest(
            model_id=model_id,
            front_layers=parts.front_layers,
            body_layers=parts.body_layers,
            wire_dtype=wire_dtype,
            limits=limits,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            server_lr=server_lr,
            seed=seed,
            server_dp=server_dp,
        )
        opts: list[tuple[str, int | str]] = list(wire.channel_options(limits.max_message_bytes))
        if server_name_override:
            opts.append(("grpc.ssl_target_name_override", server_name_override))
        icp = list(interceptors) or None
        if channel_credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=opts, interceptors=icp)
        else:
            self.channel = grpc.aio.secure_channel(
                target, channel_credentials, options=opts, interceptors=icp
            )
        self.stub = wire.SplitStub(self.channel)
        self.session: wire.OpenSessionReply | None = None
        self._queue: asyncio.Queue[Frame | None] = asyncio.Queue()
        self._call: grpc.aio.StreamStreamCall | None = None
        self._seq = 0
        self.credits = 0

    async def __aenter__(self) -> SplitClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> wire.OpenSessionReply:
        """Open the session and the data stream.

        Raises:
            IdentityError: the declared client id is not this certificate's identity.
            grpc.aio.AioRpcError: other refusals (UNAVAILABLE: no or untrusted certificate).
        """
        try:
            self.session = await self.stub.open_session(self._request, metadata=self._metadata)
        except grpc.aio.AioRpcError as err:
            raise _typed(err) from err
        if self.session.hidden_size != self.parts.hidden_size:
            raise SplitError("SHAPE_REJECTED", "server hidden size differs from the client's")
        if self._request.server_dp is not None and not self.session.server_dp:
            await self.stub.close(wire.CloseRequest(self.session.session_id))
            self.session = None
            raise SplitError(
                "DP_REFUSED",
                "the split server did not confirm DP on its adapter (an older server?); the "
                "released adapter would not be private",
            )
        self.credits = self.session.credits
        self._call = self.stub.exchange(self._requests())
        return self.session

    async def _requests(self) -> AsyncIterator[Frame]:
        while (frame := await self._queue.get()) is not None:
            yield frame

    async def close(self) -> None:
        """End the stream, close the session, close the channel."""
        await self._queue.put(None)
        if self.session is not None:
            try:
                await self.stub.close(wire.CloseRequest(self.session.session_id))
            except grpc.aio.AioRpcError as err:
                log.warning("closing split session failed: %s", err.code())
        await self.channel.close()

    async def send(self, frame: Frame) -> None:
        """Queue one frame on the stream (public for tests of hostile input)."""
        self.traffic.frames_up += 1
        self.traffic.bytes_up += sum(t.nbytes for t in frame.tensors)
        await self._queue.put(frame)

    async def receive(self) -> Frame:
        """The next frame from the server (raises on end of stream)."""
        assert self._call is not None
        try:
            frame = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise _typed(err) from err
        if frame is grpc.aio.EOF:
            raise SplitError("EXPIRED", "the server ended the stream")
        assert isinstance(frame, Frame)
        self.traffic.frames_down += 1
        self.traffic.bytes_down += sum(t.nbytes for t in frame.tensors)
        return frame

    def next_step_id(self, round_: int, step: int, micro_batch: int) -> StepId:
        """A StepId with the next sequence number."""
        self._seq += 1
        return StepId(round_, step, micro_batch, self._seq)

    def _decode(self, frame: Frame, like: Tensor) -> Tensor:
        t = frame.tensor(frame.tensors[0].name if frame.tensors else "hidden")
        return wire.decode_tensor(t, max_elements=like.numel(), expect_shape=tuple(like.shape))

    async def train_step(
        self,
        micro_batches: Sequence[MicroBatch],
        *,
        round_: int,
        step: int,
        optimizer: torch.optim.Optimizer | None = None,
        clip: ClippedSum | None = None,
    ) -> float:
        """One optimiser step over ``micro_batches`` (loss = their mean), then Commit.

        Args:
            micro_batches: (input_ids (B, T), attention_mask (B, T), labels) each.
            round_: federated round.
            step: step within the round (strictly increasing per round).
            optimizer: client optimiser; zeroed before and stepped after (None: leave grads).
                Ignored with ``clip``.
            clip: sample-level DP: instead of accumulating ``.grad``, form each example's
                gradient of every client trainable (back half + front half seeded with the
                returned cut gradient), clip it and add it here; the caller adds the noise
                and steps. ``micro_batches`` may then be empty (an empty Poisson batch still
                commits, so the server's DP adapter releases its noise too).

        Returns:
            The mean loss over the micro-batches (with ``clip``: over the examples; 0 for none).
        """
        assert self.session is not None, "call open() first"
        if optimizer is not None and clip is None:
            optimizer.zero_grad(set_to_none=True)
        params = client_trainables(self.parts) if clip is not None else {}
        st = _StepState(micro_batches, clip, params)
        while st.done < st.n:
            await self._send_forwards(st, round_, step)
            frame = await self.receive()
            if frame.kind == "error":
                raise SplitError(frame.error_code or "INTERNAL", frame.error_message)
            if frame.kind == "body_output":
                await self._backward(st, frame, round_, step)
            elif frame.kind == "cut_gradient":
                self._front_backward(st, frame)
        try:
            await self.stub.commit(wire.CommitRequest(self.session.session_id, round_, step))
        except grpc.aio.AioRpcError as err:
            raise _typed(err) from err
        if clip is not None:
            return sum(st.losses) / st.examples if st.examples else 0.0
        if optimizer is not None:
            optimizer.step()
        return sum(st.losses) / st.n

    async def _send_forwards(self, st: _StepState, round_: int, step: int) -> None:
        """Send the next micro-batches' front outputs while the server grants credits."""
        assert self.session is not None
        while st.sent < st.n and self.credits > 0:
            ids, mask, _ = st.micro_batches[st.sent]
            front = (
                front_forward(self.parts, ids, mask)
                if st.clip is None
                else front_per_sample(self.parts, ids, mask)
            )
            st.fronts[st.sent] = front
            hidden = wire.encode_tensor("hidden", front.hidden, self.wire_dtype)
            m = wire.encode_tensor("attention_mask", front.attention_mask, "uint8")
            step_id = self.next_step_id(round_, step, st.sent)
            await self.send(Frame(self.session.session_id, "forward", step_id, (hidden, m)))
            self.credits -= 1
            st.sent += 1

    async def _backward(self, st: _StepState, frame: Frame, round_: int, step: int) -> None:
        """The body's output -> the back's loss and gradient -> send the gradient back."""
        assert self.session is not None
        mb = frame.step.micro_batch
        front = st.fronts[mb]
        body_out = self._decode(frame, front.hidden)
        if st.clip is None:
            back = back_forward(
                self.parts, body_out, front.attention_mask, st.labels[mb], loss_scale=1.0 / st.n
            )
            grad = back_backward(back)
            st.losses.append(float(back.loss.detach()) * st.n)
        else:  # per example: ℓ_i, d ℓ_i / d body output_i, the back's grads
            per, grad, st.back_grads[mb] = back_per_sample(
                self.parts, st.params, body_out, front.attention_mask, st.labels[mb]
            )
            st.losses.append(float(per.sum()))
            st.examples += int(per.numel())
        g = wire.encode_tensor("grad", grad, self.wire_dtype)
        step_id = self.next_step_id(round_, step, mb)
        await self.send(Frame(self.session.session_id, "backward", step_id, (g,)))

    def _front_backward(self, st: _StepState, frame: Frame) -> None:
        """The cut gradient -> the front's gradients (clipped per example under DP)."""
        mb = frame.step.micro_batch
        front = st.fronts[mb]
        grad_cut = self._decode(frame, front.hidden)
        if isinstance(front, PerSampleFront):
            assert st.clip is not None
            halves = front_grads_per_sample(front, st.params, grad_cut)
            st.clip.add([merge(b, f) for b, f in zip(st.back_grads.pop(mb), halves, strict=True)])
        else:
            front_backward(front, grad_cut)
        del st.fronts[mb]
        self.credits += frame.credits
        st.done += 1

    def local_phase(
        self, batches: Iterable[MicroBatch], optimizer: torch.optim.Optimizer
    ) -> list[float]:
        """SFPrompt local-loss phase: front -> back shortcut, no server messages."""
        return local_loss_phase(self.parts, batches, optimizer)
