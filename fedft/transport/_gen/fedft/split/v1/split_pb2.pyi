from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]

class FrameKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FRAME_KIND_UNSPECIFIED: _ClassVar[FrameKind]
    FRAME_KIND_FORWARD: _ClassVar[FrameKind]
    FRAME_KIND_BODY_OUTPUT: _ClassVar[FrameKind]
    FRAME_KIND_BACKWARD: _ClassVar[FrameKind]
    FRAME_KIND_CUT_GRADIENT: _ClassVar[FrameKind]
    FRAME_KIND_ERROR: _ClassVar[FrameKind]

class ErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_CODE_UNSPECIFIED: _ClassVar[ErrorCode]
    ERROR_CODE_STALE: _ClassVar[ErrorCode]
    ERROR_CODE_DUPLICATE: _ClassVar[ErrorCode]
    ERROR_CODE_SHAPE_REJECTED: _ClassVar[ErrorCode]
    ERROR_CODE_NON_FINITE: _ClassVar[ErrorCode]
    ERROR_CODE_OVER_CREDIT: _ClassVar[ErrorCode]
    ERROR_CODE_EXPIRED: _ClassVar[ErrorCode]
    ERROR_CODE_UNKNOWN_SESSION: _ClassVar[ErrorCode]
    ERROR_CODE_FORBIDDEN_CONTENT: _ClassVar[ErrorCode]
    ERROR_CODE_UNSUPPORTED_DTYPE: _ClassVar[ErrorCode]
    ERROR_CODE_BAD_FRAME: _ClassVar[ErrorCode]
    ERROR_CODE_INTERNAL: _ClassVar[ErrorCode]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType
DTYPE_UINT8: DType
FRAME_KIND_UNSPECIFIED: FrameKind
FRAME_KIND_FORWARD: FrameKind
FRAME_KIND_BODY_OUTPUT: FrameKind
FRAME_KIND_BACKWARD: FrameKind
FRAME_KIND_CUT_GRADIENT: FrameKind
FRAME_KIND_ERROR: FrameKind
ERROR_CODE_UNSPECIFIED: ErrorCode
ERROR_CODE_STALE: ErrorCode
ERROR_CODE_DUPLICATE: ErrorCode
ERROR_CODE_SHAPE_REJECTED: ErrorCode
ERROR_CODE_NON_FINITE: ErrorCode
ERROR_CODE_OVER_CREDIT: ErrorCode
ERROR_CODE_EXPIRED: ErrorCode
ERROR_CODE_UNKNOWN_SESSION: ErrorCode
ERROR_CODE_FORBIDDEN_CONTENT: ErrorCode
ERROR_CODE_UNSUPPORTED_DTYPE: ErrorCode
ERROR_CODE_BAD_FRAME: ErrorCode
ERROR_CODE_INTERNAL: ErrorCode

class Tensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "data", "scale")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    scale: float
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., scale: _Optional[float] = ...) -> None: ...

class StepId(_message.Message):
    __slots__ = ("round", "step", "micro_batch", "sequence")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    round: int
    step: int
    micro_batch: int
    sequence: int
    def __init__(self, round: _Optional[int] = ..., step: _Optional[int] = ..., micro_batch: _Optional[int] = ..., sequence: _Optional[int] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: ErrorCode
    message: str
    def __init__(self, code: _Optional[_Union[ErrorCode, str]] = ..., message: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("session_id", "kind", "step", "tensors", "credits", "error")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    kind: FrameKind
    step: StepId
    tensors: _containers.RepeatedCompositeFieldContainer[Tensor]
    credits: int
    error: Error
    def __init__(self, session_id: _Optional[str] = ..., kind: _Optional[_Union[FrameKind, str]] = ..., step: _Optional[_Union[StepId, _Mapping]] = ..., tensors: _Optional[_Iterable[_Union[Tensor, _Mapping]]] = ..., credits: _Optional[int] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_batch", "max_seq_len", "max_in_flight")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_batch: int
    max_seq_len: int
    max_in_flight: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class ServerDP(_message.Message):
    __slots__ = ("noise_multiplier", "max_grad_norm", "expected_batch_size")
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    max_grad_norm: float
    expected_batch_size: int
    def __init__(self, noise_multiplier: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., expected_batch_size: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("model_id", "front_layers", "body_layers", "wire_dtype", "limits", "lora_rank", "lora_alpha", "server_lr", "seed", "server_dp")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FRONT_LAYERS_FIELD_NUMBER: _ClassVar[int]
    BODY_LAYERS_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    SERVER_LR_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SERVER_DP_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    front_layers: int
    body_layers: int
    wire_dtype: DType
    limits: Limits
    lora_rank: int
    lora_alpha: float
    server_lr: float
    seed: int
    server_dp: ServerDP
    def __init__(self, model_id: _Optional[str] = ..., front_layers: _Optional[int] = ..., body_layers: _Optional[int] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., server_lr: _Optional[float] = ..., seed: _Optional[int] = ..., server_dp: _Optional[_Union[ServerDP, _Mapping]] = ...) -> None: ...

class OpenSessionReply(_message.Message):
    __slots__ = ("session_id", "limits", "hidden_size", "credits", "session_timeout_s", "server_dp")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    CREDITS_FIELD_NUMBER: _ClassVar[int]
    SESSION_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    SERVER_DP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    limits: Limits
    hidden_size: int
    credits: int
    session_timeout_s: float
    server_dp: bool
    def __init__(self, session_id: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., hidden_size: _Optional[int] = ..., credits: _Optional[int] = ..., session_timeout_s: _Optional[float] = ..., server_dp: _Optional[bool] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("session_id", "round", "step")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    round: int
    step: int
    def __init__(self, session_id: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("micro_batches",)
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    micro_batches: int
    def __init__(self, micro_batches: _Optional[int] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
