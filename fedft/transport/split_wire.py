"""Serde for the split-learning wire contract ``fedft.split.v1`` (protos/fedft/split/v1).

The only module that touches ``split_pb2``. Everything else (``server/split_service.py``,
``client/split_client.py``) sees frozen dataclasses and torch tensors:

* :func:`encode_tensor` / :func:`decode_tensor`: tensor <-> :class:`WireTensor` (raw
  little-endian bytes in C order, dtype, shape, optional power-of-two fp16 scale).
  :func:`decode_tensor` validates dtype, shape, declared size and finiteness *before*
  allocating anything, and raises :class:`WireError` with a typed code.
* ``*_to_bytes`` / ``*_from_bytes``: protobuf (de)serialisation, used as gRPC serializers so
  that gRPC handlers and stubs work on dataclasses.
* :func:`generic_handler` / :class:`SplitStub`: bind the four RPCs of
  ``fedft.split.v1.SplitTraining`` on a ``grpc.aio`` server or channel.

Wire dtypes follow NOTES.md: bf16, or fp16 with a per-tensor power-of-two scale (unscaled fp16
gradients underflow), or fp32 for exact tests.
"""

from __future__ import annotations

import math
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import grpc
import torch
from google.protobuf.message import DecodeError, Message
from torch import Tensor

from fedft.transport._gen.fedft.split.v1 import split_pb2

SERVICE = "fedft.split.v1.SplitTraining"
WireDType = Literal["fp32", "bf16", "fp16", "uint8"]
FrameKind = Literal["forward", "body_output", "backward", "cut_gradient", "error"]
ErrorCode = Literal[
    "STALE",
    "DUPLICATE",
    "SHAPE_REJECTED",
    "NON_FINITE",
    "OVER_CREDIT",
    "EXPIRED",
    "UNKNOWN_SESSION",
    "FORBIDDEN_CONTENT",
    "UNSUPPORTED_DTYPE",
    "BAD_FRAME",
    "INTERNAL",
]

_DTYPE_TO_PB: dict[str, Any] = {
    "fp32": split_pb2.DTYPE_FLOAT32,
    "bf16": split_pb2.DTYPE_BFLOAT16,
    "fp16": split_pb2.DTYPE_FLOAT16,
    "uint8": split_pb2.DTYPE_UINT8,
}
_PB_TO_DTYPE = {v: k for k, v in _DTYPE_TO_PB.items()}
_TORCH_DTYPE: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "uint8": torch.uint8,
}
_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "uint8": 1}
_KIND_TO_PB: dict[str, Any] = {
    "forward": split_pb2.FRAME_KIND_FORWARD,
    "body_output": split_pb2.FRAME_KIND_BODY_OUTPUT,
    "backward": split_pb2.FRAME_KIND_BACKWARD,
    "cut_gradient": split_pb2.FRAME_KIND_CUT_GRADIENT,
    "error": split_pb2.FRAME_KIND_ERROR,
}
_PB_TO_KIND = {v: k for k, v in _KIND_TO_PB.items()}
_MAX_DIMS = 4
#: fp16 payloads are scaled so the largest magnitude lands near 2**_FP16_TARGET_EXP.
_FP16_TARGET_EXP = 14

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("fedft.transport.split_wire assumes a little-endian host")


class WireError(Exception):
    """A frame or tensor that violates the contract.

    Attributes:
        code: the typed error (an ``ERROR_CODE_*`` name without the prefix).
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: ErrorCode = code
        self.message = message


@dataclass(frozen=True)
class StepId:
    """Which micro-batch a frame belongs to.

    Attributes:
        round: federated round.
        step: optimiser step within the round.
        micro_batch: micro-batch index within the step.
        sequence: per-session, per-direction frame counter (strictly increasing).
    """

    round: int = 0
    step: int = 0
    micro_batch: int = 0
    sequence: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """(round, step, micro_batch): identifies a micro-batch regardless of sequence."""
        return self.round, self.step, self.micro_batch


@dataclass(frozen=True)
class WireTensor:
    """A tensor as it travels: undecoded payload plus header.

    Attributes:
        name: role in the frame ("hidden", "attention_mask", "grad").
        dtype: wire dtype name, or "unknown:<n>" for an enum value this version does not know.
        shape: declared shape.
        data: raw little-endian bytes, C order.
        scale: fp16 only: payload = value * scale (power of two); 0 or 1 = unscaled.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: bytes
    scale: float = 0.0

    @property
    def nbytes(self) -> int:
        """Payload size in bytes."""
        return len(self.data)


@dataclass(frozen=True)
class Frame:
    """One data-plane message (either direction) of the ``Exchange`` stream."""

    session_id: str
    kind: FrameKind
    step: StepId = field(default_factory=StepId)
    tensors: tuple[WireTensor, ...] = ()
    credits: int = 0
    error_code: ErrorCode | None = None
    error_message: str = ""

    def tensor(self, name: str) -> WireTensor:
        """The tensor called ``name``; :class:`WireError` BAD_FRAME if absent or repeated."""
        found = [t for t in self.tensors if t.name == name]
        if len(found) != 1:
            raise WireError("BAD_FRAME", f"{self.kind} frame needs exactly one {name!r} tensor")
        return found[0]


@dataclass(frozen=True)
class Limits:
    """What one side accepts: message size (bytes), batch, sequence length, in-flight."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_batch: int = 64
    max_seq_len: int = 512
    max_in_flight: int = 2


@dataclass(frozen=True, kw_only=True)
class ServerDP:
    """Sample-level DP-SGD on the client's server-side adapter.

    Attributes:
        noise_multiplier: σ this side adds (std σ·C per coordinate, once per step).
        max_grad_norm: C, each example's adapter gradient is clipped to it.
        expected_batch_size: B = q n, the noisy sum is divided by it.
    """

    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int

    def __post_init__(self) -> None:
        if not (
            math.isfinite(self.noise_multiplier)
            and self.noise_multiplier >= 0
            and math.isfinite(self.max_grad_norm)
            and self.max_grad_norm > 0
            and self.expected_batch_size >= 1
        ):
            raise WireError(
                "BAD_FRAME",
                f"server DP needs noise_multiplier >= 0, max_grad_norm > 0 and "
                f"expected_batch_size >= 1; got {self}",
            )


@dataclass(frozen=True)
class OpenSessionRequest:
    """Control plane: ask for a session for one client's cut of ``model_id``."""

    model_id: str
    front_layers: int
    body_layers: int
    wire_dtype: WireDType = "bf16"
    limits: Limits = field(default_factory=Limits)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    server_lr: float = 1e-3
    seed: int = 0
    server_dp: ServerDP | None = None


@dataclass(frozen=True)
class OpenSessionReply:
    """The session id (a secret), the server's limits, hidden size and initial credits.

    ``server_dp`` is True when the server applies the requested :class:`ServerDP`.
    """

    session_id: str
    limits: Limits
    hidden_size: int
    credits: int
    session_timeout_s: float
    server_dp: bool = False


@dataclass(frozen=True)
class CommitRequest:
    """Apply the server adapter's accumulated gradient for (round, step)."""

    session_id: str
    round: int
    step: int


@dataclass(frozen=True)
class CommitReply:
    """How many micro-batches the applied gradient covered."""

    micro_batches: int


@dataclass(frozen=True)
class CloseRequest:
    """Free the session now."""

    session_id: str


# ----------------------------------------------------------------------------- tensors


def fp16_scale(t: Tensor) -> float:
    """Power-of-two scale putting ``max|t|`` near 2**14 (safe in fp16, no underflow)."""
    amax = float(t.detach().abs().max()) if t.numel() else 0.0
    if amax == 0.0 or not math.isfinite(amax):
        return 1.0
    exp = _FP16_TARGET_EXP - math.ceil(math.log2(amax))
    return float(2.0 ** max(-100, min(100, exp)))


def encode_tensor(name: str, t: Tensor, dtype: WireDType) -> WireTensor:
    """Encode ``t`` as raw little-endian bytes in wire dtype ``dtype``.

    Args:
        name: role of the tensor in its frame.
        t: any shape; moved to CPU and made contiguous.
        dtype: "fp32", "bf16", "fp16" (scaled by :func:`fp16_scale`) or "uint8" (masks).

    Returns:
        The :class:`WireTensor`; payload size = numel * (4, 2, 2, 1) bytes.
    """
    x = t.detach().to("cpu")
    scale = 0.0
    if dtype == "fp16":
        scale = fp16_scale(x)
        x = x.to(torch.float32) * scale
    x = x.to(_TORCH_DTYPE[dtype]).contiguous()
    raw = x.view(torch.int16) if dtype == "bf16" else x  # numpy has no bfloat16
    return WireTensor(name, dtype, tuple(int(s) for s in t.shape), raw.numpy().tobytes(), scale)


def decode_tensor(
    wt: WireTensor,
    *,
    max_elements: int,
    expect_shape: tuple[int | None, ...] | None = None,
    allowed: tuple[str, ...] = ("fp32", "bf16", "fp16"),
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Validate a wire tensor, then decode it. Checks happen before any allocation.

    Args:
        wt: the received tensor.
        max_elements: largest element count accepted (from the session limits).
        expect_shape: per-dimension expected sizes (None = any size >= 1).
        allowed: accepted wire dtypes.
        out_dtype: dtype of the returned tensor.

    Returns:
        Tensor of shape ``wt.shape`` and dtype ``out_dtype`` (fp16 payloads divided by scale).

    Raises:
        WireError: UNSUPPORTED_DTYPE, SHAPE_REJECTED (rank, sizes, limits, byte count
            mismatch) or NON_FINITE.
    """
    if wt.dtype not in allowed:
        raise WireError("UNSUPPORTED_DTYPE", f"{wt.name}: dtype {wt.dtype} not in {allowed}")
    shape = wt.shape
    if not 1 <= len(shape) <= _MAX_DIMS or any(s < 1 for s in shape):
        raise WireError("SHAPE_REJECTED", f"{wt.name}: bad shape {shape}")
    if expect_shape is not None and (
        len(expect_shape) != len(shape)
        or any(e is not None and e != s for e, s in zip(expect_shape, shape))
    ):
        raise WireError("SHAPE_REJECTED", f"{wt.name}: shape {shape}, expected {expect_shape}")
    numel = math.prod(shape)  # python int: no overflow
    if numel > max_elements:
        raise WireError("SHAPE_REJECTED", f"{wt.name}: {numel} elements > limit {max_elements}")
    if len(wt.data) != numel * _ITEMSIZE[wt.dtype]:
        raise WireError(
            "SHAPE_REJECTED",
            f"{wt.name}: shape {shape} in {wt.dtype} needs {numel * _ITEMSIZE[wt.dtype]} "
            f"bytes, got {len(wt.data)}",
        )
    if wt.dtype == "fp16" and (not math.isfinite(wt.scale) or wt.scale < 0):
        raise WireError("NON_FINITE", f"{wt.name}: bad fp16 scale {wt.scale}")
    x = torch.frombuffer(bytearray(wt.data), dtype=_TORCH_DTYPE[wt.dtype]).reshape(shape)
    x = x.to(out_dtype) if x.dtype != out_dtype else x
    if wt.dtype == "fp16" and wt.scale not in (0.0, 1.0):
        x = x / wt.scale
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise WireError("NON_FINITE", f"{wt.name}: NaN or infinity in payload")
    return x


def decode_mask(wt: WireTensor, *, batch: int, seq_len: int) -> Tensor:
    """Decode a (B, T) padding mask of 0/1 bytes into a long tensor.

    Raises:
        WireError: SHAPE_REJECTED for a wrong shape or a value other than 0/1.
    """
    mask = decode_tensor(
        wt,
        max_elements=batch * seq_len,
        expect_shape=(batch, seq_len),
        allowed=("uint8",),
        out_dtype=torch.long,
    )
    if bool(((mask != 0) & (mask != 1)).any()):
        raise WireError("SHAPE_REJECTED", "attention_mask must hold only 0 and 1")
    return mask


# ----------------------------------------------------------------------------- protobuf


def _step_to_pb(s: StepId) -> Any:
    return split_pb2.StepId(
        round=s.round, step=s.step, micro_batch=s.micro_batch, sequence=s.sequence
    )


def _tensor_to_pb(t: WireTensor) -> Any:
    dtype: Any = _DTYPE_TO_PB.get(t.dtype)
    if dtype is None and t.dtype.startswith("unknown:"):
        dtype = int(t.dtype.split(":", 1)[1])
    return split_pb2.Tensor(
        name=t.name, dtype=cast(Any, dtype or 0), shape=list(t.shape), data=t.data, scale=t.scale
    )


def frame_to_bytes(f: Frame) -> bytes:
    """Serialise a :class:`Frame` (gRPC request/response serializer)."""
    pb = split_pb2.Frame(
        session_id=f.session_id,
        kind=_KIND_TO_PB[f.kind],
        step=_step_to_pb(f.step),
        tensors=[_tensor_to_pb(t) for t in f.tensors],
        credits=f.credits,
    )
    if f.error_code is not None:
        pb.error.code = split_pb2.ErrorCode.Value(f"ERROR_CODE_{f.error_code}")
        pb.error.message = f.error_message
    return bytes(pb.SerializeToString())


def _parse(cls: type[Message], raw: bytes) -> Any:
    """``cls.FromString(raw)``; bytes that are no such protobuf raise WireError BAD_FRAME."""
    try:
        return cls.FromString(raw)
    except DecodeError as err:
        raise WireError("BAD_FRAME", f"not a {cls.__name__} message: {err}") from err


def frame_from_bytes(raw: bytes) -> Frame:
    """Parse a :class:`Frame`; tensors stay undecoded (see :func:`decode_tensor`).

    Unknown frame kinds become "error" frames with code BAD_FRAME on the receiving side's
    validation path (the kind is checked by the handler).
    """
    pb = _parse(split_pb2.Frame, raw)
    code: Any = None
    if pb.HasField("error") and pb.error.code:
        name = split_pb2.ErrorCode.Name(pb.error.code) if pb.error.code in _ERR_VALUES else ""
        code = name.removeprefix("ERROR_CODE_") or "INTERNAL"
    kind = _PB_TO_KIND.get(pb.kind)
    if kind is None:
        raise WireError("BAD_FRAME", f"unknown frame kind {pb.kind}")
    return Frame(
        session_id=pb.session_id,
        kind=kind,  # type: ignore[arg-type]
        step=StepId(pb.step.round, pb.step.step, pb.step.micro_batch, pb.step.sequence),
        tensors=tuple(
            WireTensor(
                t.name,
                _PB_TO_DTYPE.get(t.dtype, f"unknown:{t.dtype}"),
                tuple(int(s) for s in t.shape),
                bytes(t.data),
                float(t.scale),
            )
            for t in pb.tensors
        ),
        credits=pb.credits,
        error_code=code,
        error_message=pb.error.message,
    )


_ERR_VALUES = set(split_pb2.ErrorCode.values())


def safe_frame_from_bytes(raw: bytes) -> Frame:
    """Like :func:`frame_from_bytes`, but a bad kind becomes a BAD_FRAME marker frame.

    Used as the server's request deserializer so a malformed frame yields a typed error
    instead of aborting the stream.
    """
    try:
        return frame_from_bytes(raw)
    except WireError as err:
        return Frame("", "error", error_code=err.code, error_message=err.message)


def _limits_to_pb(lim: Limits) -> Any:
    return split_pb2.Limits(
        max_message_bytes=lim.max_message_bytes,
        max_batch=lim.max_batch,
        max_seq_len=lim.max_seq_len,
        max_in_flight=lim.max_in_flight,
    )


def _limits_from_pb(pb: Any) -> Limits:
    return Limits(
        int(pb.max_message_bytes), int(pb.max_batch), int(pb.max_seq_len), int(pb.max_in_flight)
    )


def open_request_to_bytes(r: OpenSessionRequest) -> bytes:
    """Serialise an :class:`OpenSessionRequest`."""
    return bytes(
        split_pb2.OpenSessionRequest(
            model_id=r.model_id,
            front_layers=r.front_layers,
            body_layers=r.body_layers,
            wire_dtype=_DTYPE_TO_PB[r.wire_dtype],
            limits=_limits_to_pb(r.limits),
            lora_rank=r.lora_rank,
            lora_alpha=r.lora_alpha,
            server_lr=r.server_lr,
            seed=r.seed,
            server_dp=None
            if r.server_dp is None
            else split_pb2.ServerDP(
                noise_multiplier=r.server_dp.noise_multiplier,
                max_grad_norm=r.server_dp.max_grad_norm,
                expected_batch_size=r.server_dp.expected_batch_size,
            ),
        ).SerializeToString()
    )


def open_request_from_bytes(raw: bytes) -> OpenSessionRequest:
    """Parse an :class:`OpenSessionRequest`; an unknown wire dtype raises UNSUPPORTED_DTYPE."""
    pb = _parse(split_pb2.OpenSessionRequest, raw)
    dtype = _PB_TO_DTYPE.get(pb.wire_dtype)
    if dtype is None or dtype == "uint8":
        raise WireError("UNSUPPORTED_DTYPE", f"wire dtype {pb.wire_dtype} is not fp32/bf16/fp16")
    return OpenSessionRequest(
        model_id=pb.model_id,
        front_layers=pb.front_layers,
        body_layers=pb.body_layers,
        wire_dtype=dtype,  # type: ignore[arg-type]
        limits=_limits_from_pb(pb.limits),
        lora_rank=pb.lora_rank,
        lora_alpha=pb.lora_alpha,
        server_lr=pb.server_lr,
        seed=pb.seed,
        server_dp=ServerDP(
            noise_multiplier=pb.server_dp.noise_multiplier,
            max_grad_norm=pb.server_dp.max_grad_norm,
            expected_batch_size=pb.server_dp.expected_batch_size,
        )
        if pb.HasField("server_dp")
        else None,
    )


def open_reply_to_bytes(r: OpenSessionReply) -> bytes:
    """Serialise an :class:`OpenSessionReply`."""
    return bytes(
        split_pb2.OpenSessionReply(
            session_id=r.session_id,
            limits=_limits_to_pb(r.limits),
            hidden_size=r.hidden_size,
            credits=r.credits,
            session_timeout_s=r.session_timeout_s,
            server_dp=r.server_dp,
        ).SerializeToString()
    )


def open_reply_from_bytes(raw: bytes) -> OpenSessionReply:
    """Parse an :class:`OpenSessionReply`."""
    pb = _parse(split_pb2.OpenSessionReply, raw)
    return OpenSessionReply(
        pb.session_id,
        _limits_from_pb(pb.limits),
        pb.hidden_size,
        pb.credits,
        pb.session_timeout_s,
        pb.server_dp,
    )


def commit_request_to_bytes(r: CommitRequest) -> bytes:
    """Serialise a :class:`CommitRequest`."""
    pb = split_pb2.CommitRequest(session_id=r.session_id, round=r.round, step=r.step)
    return bytes(pb.SerializeToString())


def commit_request_from_bytes(raw: bytes) -> CommitRequest:
    """Parse a :class:`CommitRequest`."""
    pb = _parse(split_pb2.CommitRequest, raw)
    return CommitRequest(pb.session_id, pb.round, pb.step)


def commit_reply_to_bytes(r: CommitReply) -> bytes:
    """Serialise a :class:`CommitReply`."""
    return bytes(split_pb2.CommitReply(micro_batches=r.micro_batches).SerializeToString())


def commit_reply_from_bytes(raw: bytes) -> CommitReply:
    """Parse a :class:`CommitReply`."""
    return CommitReply(_parse(split_pb2.CommitReply, raw).micro_batches)


def close_request_to_bytes(r: CloseRequest) -> bytes:
    """Serialise a :class:`CloseRequest`."""
    return bytes(split_pb2.CloseRequest(session_id=r.session_id).SerializeToString())


def close_request_from_bytes(raw: bytes) -> CloseRequest:
    """Parse a :class:`CloseRequest`."""
    return CloseRequest(_parse(split_pb2.CloseRequest, raw).session_id)


def _empty_to_bytes(_: None) -> bytes:
    return bytes(split_pb2.CloseReply().SerializeToString())


def _empty_from_bytes(raw: bytes) -> None:
    _parse(split_pb2.CloseReply, raw)


# ----------------------------------------------------------------------------- gRPC binding


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Return gRPC options setting both message limits (needed on server AND channel, NOTES.md)."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def generic_handler(
    *,
    open_session: Callable[[OpenSessionRequest, Any], Awaitable[OpenSessionReply]],
    commit: Callable[[CommitRequest, Any], Awaitable[CommitReply]],
    close: Callable[[CloseRequest, Any], Awaitable[None]],
    exchange: Callable[[AsyncIterator[Frame], Any], AsyncIterator[Frame]],
) -> grpc.GenericRpcHandler:
    """Bind coroutine handlers on dataclasses to ``fedft.split.v1.SplitTraining``.

    Args:
        open_session: ``async (request, context) -> OpenSessionReply``.
        commit: ``async (request, context) -> CommitReply``.
        close: ``async (request, context) -> None``.
        exchange: async generator ``(frames, context) -> frames``.

    Returns:
        A handler for ``grpc.aio.Server.add_generic_rpc_handlers``.
    """
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "OpenSession": grpc.unary_unary_rpc_method_handler(
                open_session,
                request_deserializer=open_request_from_bytes,
                response_serializer=open_reply_to_bytes,
            ),
            "Commit": grpc.unary_unary_rpc_method_handler(
                commit,
                request_deserializer=commit_request_from_bytes,
                response_serializer=commit_reply_to_bytes,
            ),
            "Close": grpc.unary_unary_rpc_method_handler(
                close,
                request_deserializer=close_request_from_bytes,
                response_serializer=_empty_to_bytes,
            ),
            "Exchange": grpc.stream_stream_rpc_method_handler(
                exchange,
                request_deserializer=safe_frame_from_bytes,
                response_serializer=frame_to_bytes,
            ),
        },
    )


class SplitStub:
    """Client-side callables of ``fedft.split.v1.SplitTraining`` on a ``grpc.aio`` channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        prefix = f"/{SERVICE}/"
        self.open_session = channel.unary_unary(
            prefix + "OpenSession",
            request_serializer=open_request_to_bytes,
            response_deserializer=open_reply_from_bytes,
        )
        self.commit = channel.unary_unary(
            prefix + "Commit",
            request_serializer=commit_request_to_bytes,
            response_deserializer=commit_reply_from_bytes,
        )
        self.close = channel.unary_unary(
            prefix + "Close",
            request_serializer=close_request_to_bytes,
            response_deserializer=_empty_from_bytes,
        )
        self.exchange = channel.stream_stream(
            prefix + "Exchange",
            request_serializer=frame_to_bytes,
            response_deserializer=frame_from_bytes,
        )
