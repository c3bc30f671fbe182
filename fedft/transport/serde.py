"""Flower records <-> fedft types: the one place that converts between them.

Wire format (version 1). Every tensor travels as a Flower ``Array`` with
``stype = "fedft.raw"``: ``data`` holds the tensor's elements as little-endian, C-order
bytes, ``dtype`` is one of ``float32``, ``float16``, ``bfloat16``, ``int64`` and ``shape``
is the tensor's shape. Why raw bytes rather than Flower's ``numpy.ndarray`` stype (the bytes
of ``np.save``):

- the declared shape and dtype fix the byte length, so a record is checked *before* any
  parsing or allocation (``np.load`` parses a header written by the sender first);
- bfloat16 travels as itself (2 bytes per element): numpy has no bfloat16, which is why
  ``ArrayRecord`` rejects bf16 tensors, and casting to float32 would double the upload;
- no pickle path exists at all (``np.load`` only refuses pickles when told to).

Layout of the records (keys of a ``RecordDict``):

- ``"fedft.meta"`` (ConfigRecord): ``version``, ``kind`` (``"update"`` / ``"start"``),
  ``parts`` and, for updates, ``num_examples``.
- ``"fedft.adapters"`` (ArrayRecord): ``"<module>::a"``, ``"<module>::b"``,
  ``"<module>::r"`` for the factors named by ``parts``; ``"fedft.scaling"`` (ConfigRecord):
  ``module -> scaling``.
- ``"fedft.base_delta"`` (ArrayRecord): ``"<module>::dense"`` (out, in) or factored entries
  as above, with their scalings in ``"fedft.base_scaling"``.
- ``"fedft.extras"`` (ArrayRecord): name -> dense tensor (classifier head, soft prompts).
- ``"fedft.metrics"`` (MetricRecord) and ``"fedft.config"`` (ConfigRecord).

Which factors travel (``parts``): ``"ab"`` both LoRA factors (FedIT, FLoRA, ...); ``"b"``
only B (FFA-LoRA: A is frozen and shared); ``"r"`` only the r x r matrix (Fed-SB: B and A
are frozen and shared); ``"abr"`` all three (the Fed-SB init the server hands out). Factors
that do not travel are taken from a ``reference`` the receiver already holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from torch import Tensor

from fedft.types import ClientUpdate, LoraFactors, Parts

logger = logging.getLogger(__name__)

WireParts = Literal[Parts, "abr"]
"""The factor parts a message may carry: what trains (:data:`~fedft.types.Parts`), or
``"abr"`` (Fed-SB's frozen B and A with R)."""
ConfigValue = int | float | str | bool

#: version of the record layout described in the module docstring.
WIRE_VERSION = 1
#: the Array ``stype`` of every tensor fedft sends.
STYPE = "fedft.raw"
#: largest number of elements one decoded array may declare (2**28: 1 GiB of float32).
DEFAULT_MAX_NUMEL = 1 << 28
#: most dimensions a decoded array may declare.
MAX_NDIM = 8

META = "fedft.meta"
ADAPTERS = "fedft.adapters"
SCALING = "fedft.scaling"
BASE_DELTA = "fedft.base_delta"
BASE_SCALING = "fedft.base_scaling"
EXTRAS = "fedft.extras"
METRICS = "fedft.metrics"
CONFIG = "fedft.config"
#: a client's privacy state in its reply (accountant JSON, refusal); mirrored by the server
PRIVACY_RECORD = "fedft.privacy"
#: the round a reply was trained for; the server drops replies tagged for another round
ROUND_RECORD = "fedft.round"

_SEP = "::"
_PARTS: tuple[str, ...] = get_args(WireParts)


class SerdeError(ValueError):
    """A record that cannot be encoded or decoded; the message says which entry and why."""


@dataclass(frozen=True)
class _WireDtype:
    torch_dtype: torch.dtype
    #: little-endian numpy dtype the bytes are read as (bf16 is read as int16 bits).
    numpy_dtype: np.dtype
    itemsize: int


_WIRE_DTYPES: dict[str, _WireDtype] = {
    "float32": _WireDtype(torch.float32, np.dtype("<f4"), 4),
    "float16": _WireDtype(torch.float16, np.dtype("<f2"), 2),
    "bfloat16": _WireDtype(torch.bfloat16, np.dtype("<i2"), 2),
    "int64": _WireDtype(torch.int64, np.dtype("<i8"), 8),
}
_NAME_OF: dict[torch.dtype, str] = {w.torch_dtype: name for name, w in _WIRE_DTYPES.items()}


# --- single tensors ----------------------------------------------------------------------


def tensor_to_array(tensor: Tensor) -> Array:
    """Encode one tensor as a ``fedft.raw`` Array (little-endian, C-order bytes).

    float32, float16, bfloat16 and int64 travel as they are; float64 is cast to float32
    (logged once per call); any other dtype raises :class:`SerdeError`. The tensor is
    detached and copied to the CPU first.

    Args:
        tensor: any shape, on any device.

    Returns:
        Array with ``dtype``, ``shape``, ``stype = "fedft.raw"`` and ``data``.
    """
    t = tensor.detach()
    if t.dtype == torch.float64:
        logger.debug("casting a float64 tensor %s to float32 for the wire", tuple(t.shape))
        t = t.to(torch.float32)
    name = _NAME_OF.get(t.dtype)
    if name is None:
        raise SerdeError(
            f"cannot send a {t.dtype} tensor; allowed dtypes: {sorted(_WIRE_DTYPES)} "
            "(and float64, cast to float32)"
        )
    t = t.to("cpu").contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # same bits; numpy has no bfloat16
    wire = _WIRE_DTYPES[name]
    data = t.numpy().astype(wire.numpy_dtype, copy=False).tobytes(order="C")
    return Array(dtype=name, shape=tuple(int(s) for s in tensor.shape), stype=STYPE, data=data)


def array_to_tensor(
    array: Array, *, key: str = "?", max_numel: int = DEFAULT_MAX_NUMEL, check_finite: bool = False
) -> Tensor:
    """Decode a ``fedft.raw`` Array, validating it before anything is allocated.

    Checks, in order: the stype, the dtype against the whitelist, the shape (at most
    ``MAX_NDIM`` non-negative integer dimensions), the element count against
    ``max_numel``, and ``numel * itemsize == len(data)``. Only then are the bytes read.

    Args:
        array: the Array as received.
        key: the entry's name, used in error messages.
        max_numel: largest element count accepted.
        check_finite: also reject NaN or infinite values (floating dtypes).

    Returns:
        A new, writable CPU tensor of the declared dtype and shape.

    Raises:
        SerdeError: naming the entry and what was wrong with it.
    """
    if not isinstance(array, Array):
        raise SerdeError(f"entry {key!r}: expected a Flower Array, got {type(array).__name__}")
    if array.stype != STYPE:
        raise SerdeError(
            f"entry {key!r}: stype {array.stype!r} is not {STYPE!r}; fedft only decodes "
            "tensors encoded by fedft.transport.serde"
        )
    wire = _WIRE_DTYPES.get(array.dtype)
    if wire is None:
        raise SerdeError(
            f"entry {key!r}: dtype {array.dtype!r} is not allowed; allowed: {sorted(_WIRE_DTYPES)}"
        )
    shape = tuple(array.shape)
    if len(shape) > MAX_NDIM or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise SerdeError(
            f"entry {key!r}: shape {shape} is not a list of at most {MAX_NDIM} sizes >= 0"
        )
    numel = math.prod(shape)
    if numel > max_numel:
        raise SerdeError(
            f"entry {key!r}: shape {shape} declares {numel} elements, more than the "
            f"limit of {max_numel}"
        )
    if not isinstance(array.data, bytes | bytearray | memoryview):
        raise SerdeError(f"entry {key!r}: data is {type(array.data).__name__}, not bytes")
    expected = numel * wire.itemsize
    if len(array.data) != expected:
        raise SerdeError(
            f"entry {key!r}: {len(array.data)} bytes of data, but shape {shape} of "
            f"{array.dtype} needs {expected}"
        )
    flat = np.frombuffer(array.data, dtype=wire.numpy_dtype, count=numel)
    native = flat.astype(wire.numpy_dtype.newbyteorder("="), copy=True)  # writable copy
    out = torch.from_numpy(native).reshape(shape)
    if wire.torch_dtype == torch.bfloat16:
        out = out.view(torch.bfloat16)
    if check_finite and out.is_floating_point() and not bool(torch.isfinite(out).all()):
        raise SerdeError(f"entry {key!r}: contains NaN or infinite values")
    return out


# --- plain tensor dicts --------------------------------------------------------------------


def tensors_to_record(tensors: Mapping[str, Tensor]) -> ArrayRecord:
    """Encode ``name -> Tensor`` as an ArrayRecord of ``fedft.raw`` Arrays (order kept)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        if not isinstance(tensor, Tensor):
            raise SerdeError(f"entry {name!r}: expected a Tensor, got {type(tensor).__name__}")
        record[name] = tensor_to_array(tensor)
    return record


def tensors_from_record(
    record: ArrayRecord, *, max_numel: int = DEFAULT_MAX_NUMEL, check_finite: bool = False
) -> dict[str, Tensor]:
    """Decode an ArrayRecord written by :func:`tensors_to_record`.

    See :func:`array_to_tensor` for the checks each entry goes through.
    """
    if not isinstance(record, ArrayRecord):
        raise SerdeError(f"expected an ArrayRecord, got {type(record).__name__}")
    return {
        key: array_to_tensor(arr, key=key, max_numel=max_numel, check_finite=check_finite)
        for key, arr in record.items()
    }


# --- adapters -------------------------------------------------------------------------------


def _check_parts(parts: str) -> None:
    if parts not in _PARTS:
        raise SerdeError(f"parts = {parts!r} is not allowed: one of {list(_PARTS)}")


def _factor_tensors(factors: LoraFactors, parts: str, module: str) -> dict[str, Tensor]:
    if "r" in parts and factors.r is None:
        raise SerdeError(f"adapter {module!r}: parts={parts!r} sends r, but it has no r matrix")
    if "r" not in parts and "a" in parts and factors.r is not None:
        raise SerdeError(
            f"adapter {module!r} has a Fed-SB r matrix that parts={parts!r} would drop; "
            "use parts='abr' or 'r'"
        )
    out = {}
    if "a" in parts:
        out["a"] = factors.a
    if "b" in parts:
        out["b"] = factors.b
    if "r" in parts:
        assert factors.r is not None
        out["r"] = factors.r
    return out


def _encode_factors(adapters: Mapping[str, LoraFactors], parts: str, record: ArrayRecord) -> None:
    for module, factors in adapters.items():
        if _SEP in module:
            raise SerdeError(f"module name {module!r} must not contain {_SEP!r}")
        if not isinstance(factors, LoraFactors):
            raise SerdeError(f"adapter {module!r}: expected LoraFactors, got {type(factors)}")
        for part, tensor in _factor_tensors(factors, parts, module).items():
            record[f"{module}{_SEP}{part}"] = tensor_to_array(tensor)


def adapters_to_record(adapters: Mapping[str, LoraFactors], *, parts: WireParts) -> ArrayRecord:
    """Encode the factors named by ``parts`` of every adapter.

    Scalings do not go in the ArrayRecord: see :func:`scalings_to_config`.

    Args:
        adapters: module -> LoraFactors (a: (r, in), b: (out, r), r: (r, r) or None).
        parts: which factors travel ("ab", "b", "r" or "abr").

    Returns:
        ArrayRecord with keys ``"<module>::a"``, ``"<module>::b"``, ``"<module>::r"``.
    """
    _check_parts(parts)
    record = ArrayRecord()
    _encode_factors(adapters, parts, record)
    return record


def scalings_to_config(adapters: Mapping[str, LoraFactors]) -> ConfigRecord:
    """``module -> scaling`` (float) as a ConfigRecord."""
    return ConfigRecord({module: float(f.scaling) for module, f in adapters.items()})


def _group(record: ArrayRecord, allowed: set[str]) -> dict[str, dict[str, Array]]:
    """Split ``"<module>::<part>"`` keys into ``{module: {part: Array}}``.

    Split at the first separator: a key holding two (a module name with ``::``, which the
    encoder refuses to write) leaves a part that is not allowed, so it is refused.
    """
    grouped: dict[str, dict[str, Array]] = {}
    for key, array in record.items():
        module, sep, part = key.partition(_SEP)
        if not sep or not module or part not in allowed:
            raise SerdeError(
                f"unexpected entry {key!r}: keys must be '<module>{_SEP}<part>' with part in "
                f"{sorted(allowed)}"
            )
        grouped.setdefault(module, {})[part] = array
    return grouped


def adapters_from_record(
    record: ArrayRecord,
    *,
    parts: WireParts,
    reference: Mapping[str, LoraFactors] | None = None,
    scalings: Mapping[str, float] | None = None,
    max_numel: int = DEFAULT_MAX_NUMEL,
    check_finite: bool = False,
    modules: Collection[str] | None = None,
) -> dict[str, LoraFactors]:
    """Decode adapters, rebuilding the factors that did not travel from ``reference``.

    Args:
        record: written by :func:`adapters_to_record` with the same ``parts``.
        parts: which factors the record must hold ("ab", "b", "r" or "abr").
        reference: module -> LoraFactors the receiver already holds; required when
            ``parts`` is "b" (A, and r if any, come from it) or "r" (A and B come from it).
            Every sent factor must have the reference's shape.
        scalings: module -> scaling as sent (:func:`scalings_to_config`); when None the
            reference's scalings are used.
        max_numel: largest element count accepted per tensor.
        check_finite: reject NaN/inf values.
        modules: the module names the receiver accepts (None: any); checked on the keys
            before any tensor is decoded.

    Returns:
        module -> LoraFactors, in the record's order.

    Raises:
        SerdeError: missing or extra entries, shapes that do not fit, bad tensors.
    """
    _check_parts(parts)
    if not isinstance(record, ArrayRecord):
        raise SerdeError(f"expected an ArrayRecord of adapters, got {type(record).__name__}")
    needs_reference = parts in ("b", "r")
    if needs_reference and reference is None:
        raise SerdeError(f"parts={parts!r} needs the reference factors the receiver holds")
    grouped = _group(record, set(parts))
    if modules is not None:
        unknown = sorted(set(grouped) - set(modules))
        if unknown:
            shown = ", ".join(repr(m[:80]) for m in unknown[:3])
            raise SerdeError(
                f"{len(unknown)} adapter module(s) the receiver never sent ({shown}"
                f"{', ...' if len(unknown) > 3 else ''}); refused before decoding"
            )
    out: dict[str, LoraFactors] = {}
    for module, arrays in grouped.items():
        if set(arrays) != set(parts):
            raise SerdeError(
                f"adapter {module!r}: got parts {sorted(arrays)}, expected {sorted(parts)}"
            )
        got = {
            p: array_to_tensor(
                a, key=f"{module}{_SEP}{p}", max_numel=max_numel, check_finite=check_finite
            )
            for p, a in arrays.items()
        }
        ref = None if reference is None else reference.get(module)
        if needs_reference and ref is None:
            raise SerdeError(f"adapter {module!r} is not in the reference; cannot rebuild it")
        if ref is not None and needs_reference:
            for p, t in got.items():
                want = getattr(ref, p)
                if want is None or tuple(t.shape) != tuple(want.shape):
                    raise SerdeError(
                        f"adapter {module!r}: {p}{tuple(t.shape)} does not match the "
                        f"reference's {None if want is None else tuple(want.shape)}"
                    )
        if scalings is not None and module in scalings:
            scaling = float(scalings[module])
        elif ref is not None:
            scaling = float(ref.scaling)
        else:
            raise SerdeError(f"adapter {module!r}: no scaling was sent and no reference holds one")
        if parts == "b":
            assert ref is not None
            a, b, r = ref.a, got["b"], ref.r
        elif parts == "r":
            assert ref is not None
            a, b, r = ref.a, ref.b, got["r"]
        else:
            a, b, r = got["a"], got["b"], got.get("r")
        try:
            out[module] = LoraFactors(a=a, b=b, scaling=scaling, r=r)
        except ValueError as exc:
            raise SerdeError(f"adapter {module!r}: {exc}") from exc
    return out


# --- dense-or-factored base deltas ---------------------------------------------------------


def _base_delta_to_records(
    base_delta: Mapping[str, Tensor | LoraFactors],
) -> tuple[ArrayRecord, ConfigRecord]:
    record = ArrayRecord()
    scalings = ConfigRecord()
    for module, value in base_delta.items():
        if _SEP in module:
            raise SerdeError(f"module name {module!r} must not contain {_SEP!r}")
        if isinstance(value, LoraFactors):
            parts = "ab" if value.r is None else "abr"
            for part, tensor in _factor_tensors(value, parts, module).items():
                record[f"{module}{_SEP}{part}"] = tensor_to_array(tensor)
            scalings[module] = float(value.scaling)
        elif isinstance(value, Tensor):
            if value.dim() != 2:
                raise SerdeError(f"base_delta {module!r}: dense delta must be (out, in)")
            record[f"{module}{_SEP}dense"] = tensor_to_array(value)
        else:
            raise SerdeError(f"base_delta {module!r}: expected a Tensor or LoraFactors")
    return record, scalings


def _base_delta_from_records(
    record: ArrayRecord, scalings: Mapping[str, float], *, max_numel: int, check_finite: bool
) -> dict[str, Tensor | LoraFactors]:
    out: dict[str, Tensor | LoraFactors] = {}
    for module, arrays in _group(record, {"a", "b", "r", "dense"}).items():
        key = f"base_delta {module}"
        got = {
            p: array_to_tensor(
                a, key=f"{key}{_SEP}{p}", max_numel=max_numel, check_finite=check_finite
            )
            for p, a in arrays.items()
        }
        if set(got) == {"dense"}:
            if got["dense"].dim() != 2:
                raise SerdeError(f"{key}: dense delta must be 2-D (out, in)")
            out[module] = got["dense"]
        elif set(got) in ({"a", "b"}, {"a", "b", "r"}):
            if module not in scalings:
                raise SerdeError(f"{key}: factored delta without a scaling")
            try:
                out[module] = LoraFactors(
                    a=got["a"], b=got["b"], scaling=float(scalings[module]), r=got.get("r")
                )
            except ValueError as exc:
                raise SerdeError(f"{key}: {exc}") from exc
        else:
            raise SerdeError(f"{key}: got {sorted(got)}; expected dense, or a and b (and r)")
    return out


# --- records in a RecordDict ------------------------------------------------------------------


def _get(rd: RecordDict, key: str, kind: type) -> object:
    if not isinstance(rd, RecordDict):
        raise SerdeError(f"expected a RecordDict, got {type(rd).__name__}")
    if key not in rd:
        raise SerdeError(f"record {key!r} is missing; found {sorted(rd)}")
    value = rd[key]
    if not isinstance(value, kind):
        raise SerdeError(f"record {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def _read_meta(rd: RecordDict, kind: str) -> ConfigRecord:
    meta = _get(rd, META, ConfigRecord)
    assert isinstance(meta, ConfigRecord)
    if meta.get("version") != WIRE_VERSION:
        raise SerdeError(
            f"wire version {meta.get('version')!r} is not supported (this fedft speaks "
            f"{WIRE_VERSION}); run the same fedft version on server and clients"
        )
    if meta.get("kind") != kind:
        raise SerdeError(f"expected kind {kind!r}, got {meta.get('kind')!r}")
    return meta


def _scalings(rd: RecordDict, key: str) -> dict[str, float]:
    cr = _get(rd, key, ConfigRecord)
    assert isinstance(cr, ConfigRecord)
    out = {}
    for module, value in cr.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SerdeError(f"{key}[{module!r}] = {value!r} is not a number")
        if not math.isfinite(value):
            raise SerdeError(f"{key}[{module!r}] = {value!r} is not finite")
        out[module] = float(value)
    return out


def metrics_to_record(metrics: Mapping[str, float]) -> MetricRecord:
    """A client's scalar metrics (train loss, ε, ...) as the ``fedft.metrics`` record.

    Raises:
        SerdeError: a value is not a number.
    """
    record = MetricRecord()
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SerdeError(f"metric {name!r} = {value!r} is not a number")
        record[name] = float(value)
    return record


def update_to_recorddict(update: ClientUpdate, *, parts: WireParts) -> RecordDict:
    """Encode what a client sends back after a round.

    Args:
        update: the client's update (its ``client_id`` does not travel: the server knows
            the sender from Flower's message metadata).
        parts: which adapter factors travel ("ab", "b" for FFA, "r" for Fed-SB, "abr").

    Returns:
        RecordDict with ``fedft.meta``, ``fedft.adapters``, ``fedft.scaling``,
        ``fedft.extras`` and ``fedft.metrics``.
    """
    _check_parts(parts)
    metrics = metrics_to_record(update.metrics)
    return RecordDict(
        {
            META: ConfigRecord(
                {
                    "version": WIRE_VERSION,
                    "kind": "update",
                    "parts": parts,
                    "num_examples": int(update.num_examples),
                }
            ),
            ADAPTERS: adapters_to_record(update.adapters, parts=parts),
            SCALING: scalings_to_config(update.adapters),
            EXTRAS: tensors_to_record(update.extras),
            METRICS: metrics,
        }
    )


def update_from_recorddict(
    rd: RecordDict,
    *,
    client_id: str,
    parts: WireParts,
    reference: Mapping[str, LoraFactors] | None = None,
    max_numel: int = DEFAULT_MAX_NUMEL,
    check_finite: bool = True,
) -> ClientUpdate:
    """Decode a client's reply into a :class:`ClientUpdate`, validating every entry.

    Args:
        rd: the reply's content.
        client_id: who sent it (from the message metadata, not from the payload).
        parts: what the server expects this client to send; a reply with other parts is
            rejected.
        reference: the factors the server handed out (needed for "b" and "r").
        max_numel: largest element count accepted per tensor.
        check_finite: reject NaN/inf tensors (on by default: a poisoned update must not
            reach the aggregator).

    Raises:
        SerdeError: naming the bad record or entry.
    """
    _check_parts(parts)
    meta = _read_meta(rd, "update")
    if meta.get("parts") != parts:
        raise SerdeError(
            f"client {client_id!r} sent parts={meta.get('parts')!r}, expected {parts!r}"
        )
    n = meta.get("num_examples")
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise SerdeError(f"client {client_id!r}: num_examples = {n!r} is not an integer >= 1")
    adapters_rec = _get(rd, ADAPTERS, ArrayRecord)
    extras_rec = _get(rd, EXTRAS, ArrayRecord)
    metrics_rec = _get(rd, METRICS, MetricRecord)
    assert isinstance(adapters_rec, ArrayRecord) and isinstance(extras_rec, ArrayRecord)
    assert isinstance(metrics_rec, MetricRecord)
    adapters = adapters_from_record(
        adapters_rec,
        parts=parts,
        reference=reference,
        scalings=_scalings(rd, SCALING),
        max_numel=max_numel,
        check_finite=check_finite,
        modules=None if reference is None else reference.keys(),
    )
    extras = tensors_from_record(extras_rec, max_numel=max_numel, check_finite=check_finite)
    metrics: dict[str, float] = {}
    for name, value in metrics_rec.items():
        if isinstance(value, list):
            raise SerdeError(f"metric {name!r}: lists are not accepted, send scalars")
        metrics[name] = float(value)
    return ClientUpdate(
        client_id=client_id, adapters=adapters, num_examples=n, metrics=metrics, extras=extras
    )


def start_parts(trainable: Parts, *, holds_frozen: bool) -> WireParts:
    """The factor parts a start message carries for a client training ``trainable``.

    Every part the client needs, except that a client already holding the shared, frozen
    factors (FFA's A, Fed-SB's B and A) gets only what it trains: they travel once.
    """
    if holds_frozen and trainable != "ab":
        return trainable
    return "abr" if trainable == "r" else "ab"


def start_to_recorddict(
    *,
    adapters: Mapping[str, LoraFactors],
    parts: WireParts,
    base_delta: Mapping[str, Tensor | LoraFactors],
    extras: Mapping[str, Tensor],
    config: Mapping[str, ConfigValue],
) -> RecordDict:
    """Encode what the server sends a client at the start of a round.

    Args:
        adapters: the global adapters to start from (empty: start fresh, e.g. FLoRA).
        parts: which adapter factors travel.
        base_delta: module -> dense (out, in) Tensor or LoraFactors, to fold into the base.
        extras: name -> dense trainables (classifier head, soft prompts).
        config: per-round settings for the client (round, local_steps, lr, rank, ...).

    Returns:
        RecordDict with ``fedft.meta``, ``fedft.adapters``, ``fedft.scaling``,
        ``fedft.base_delta``, ``fedft.base_scaling``, ``fedft.extras``, ``fedft.config``.
    """
    _check_parts(parts)
    cfg = ConfigRecord()
    for key, value in config.items():
        if not isinstance(value, int | float | str | bool):
            raise SerdeError(f"config {key!r} = {value!r}: values must be int, float, str or bool")
        cfg[key] = value
    base_rec, base_scaling = _base_delta_to_records(base_delta)
    return RecordDict(
        {
            META: ConfigRecord({"version": WIRE_VERSION, "kind": "start", "parts": parts}),
            ADAPTERS: adapters_to_record(adapters, parts=parts),
            SCALING: scalings_to_config(adapters),
            BASE_DELTA: base_rec,
            BASE_SCALING: base_scaling,
            EXTRAS: tensors_to_record(extras),
            CONFIG: cfg,
        }
    )


def start_from_recorddict(
    rd: RecordDict,
    *,
    reference: Mapping[str, LoraFactors] | None = None,
    max_numel: int = DEFAULT_MAX_NUMEL,
    check_finite: bool = False,
) -> tuple[
    dict[str, LoraFactors],
    dict[str, Tensor | LoraFactors],
    dict[str, Tensor],
    dict[str, ConfigValue],
]:
    """Decode a round's start message: ``(adapters, base_delta, extras, config)``.

    Args:
        rd: the message content written by :func:`start_to_recorddict`.
        reference: the factors this client already holds (needed when the server sent
            parts "b" or "r").
        max_numel: largest element count accepted per tensor.
        check_finite: reject NaN/inf tensors.
    """
    meta = _read_meta(rd, "start")
    parts = meta.get("parts")
    if not isinstance(parts, str) or parts not in _PARTS:
        raise SerdeError(f"start message: parts = {parts!r} is not one of {list(_PARTS)}")
    adapters_rec = _get(rd, ADAPTERS, ArrayRecord)
    base_rec = _get(rd, BASE_DELTA, ArrayRecord)
    extras_rec = _get(rd, EXTRAS, ArrayRecord)
    cfg = _get(rd, CONFIG, ConfigRecord)
    assert isinstance(adapters_rec, ArrayRecord) and isinstance(base_rec, ArrayRecord)
    assert isinstance(extras_rec, ArrayRecord) and isinstance(cfg, ConfigRecord)
    adapters = adapters_from_record(
        adapters_rec,
        parts=parts,  # type: ignore[arg-type]
        reference=reference,
        scalings=_scalings(rd, SCALING),
        max_numel=max_numel,
        check_finite=check_finite,
    )
    base_delta = _base_delta_from_records(
        base_rec, _scalings(rd, BASE_SCALING), max_numel=max_numel, check_finite=check_finite
    )
    extras = tensors_from_record(extras_rec, max_numel=max_numel, check_finite=check_finite)
    config: dict[str, ConfigValue] = {}
    for key, value in cfg.items():
        if not isinstance(value, int | float | str | bool):
            raise SerdeError(f"config {key!r} = {value!r}: expected int, float, str or bool")
        config[key] = value
    return adapters, base_delta, extras, config


def recorddict_nbytes(rd: RecordDict) -> int:
    """Serialised size in bytes of ``rd``: ``recorddict_to_proto(rd).ByteSize()``.

    This is what bytes_up / bytes_down report (payload only; gRPC framing and Flower's
    message metadata come on top).
    """
    return int(recorddict_to_proto(rd).ByteSize())
