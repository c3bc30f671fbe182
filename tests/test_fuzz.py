"""Fuzzing the two network decoders with a fixed seed.

- 10,000 mutated update messages (RecordDicts written by ``serde.update_to_recorddict``,
  then bit flips, truncated or padded bytes, shape changes, huge declared shapes, dtype
  and stype swaps, renamed or missing keys, wrong record types, bad meta/scaling/metric
  values) through ``serde.update_from_recorddict`` + ``validate_update``;
- 10,000 mutated split frames (bytes from ``split_wire.frame_to_bytes``, then bit flips,
  truncation, insertions; and frames with mutated tensor headers and payloads) through
  ``safe_frame_from_bytes`` + ``decode_tensor`` / ``decode_mask`` as the split service
  calls them.

Allowed outcomes: success, or the typed errors (``SerdeError`` and other ``ValueError``
subclasses; ``WireError``, also for bytes that are not a protobuf message at all: the split
wire turns protobuf's ``DecodeError`` into BAD_FRAME). Anything else is a crash and fails
the test. Memory: the tracemalloc peak over each whole loop stays under 32 MiB (a declared
2^40-element tensor would need 4 TiB).
"""

from __future__ import annotations

import copy
import random
import tracemalloc
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from google.protobuf.message import DecodeError

from fedft.aggregation.validate import validate_update
from fedft.transport import serde
from fedft.transport import split_wire as wire
from fedft.types import ClientUpdate, LoraFactors

N_CASES = 10_000
PEAK_BYTES = 32 * 1024 * 1024
SEED = 1234


def _start() -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor], ClientUpdate]:
    g = torch.Generator().manual_seed(0)
    start = {
        f"layer.{i}.query": LoraFactors(
            a=torch.randn(2, 8, generator=g), b=torch.zeros(8, 2), scaling=2.0
        )
        for i in range(2)
    }
    extras = {"classifier.weight": torch.randn(2, 8, generator=g)}
    update = ClientUpdate(
        client_id="0",
        adapters={
            m: LoraFactors(a=f.a + 0.01, b=f.b + 0.01, scaling=f.scaling) for m, f in start.items()
        },
        num_examples=12,
        metrics={"train_loss": 0.7},
        extras={k: v + 0.01 for k, v in extras.items()},
    )
    return start, extras, update


def _arrays(rd: Any) -> list[Array]:
    out = []
    for key in (serde.ADAPTERS, serde.EXTRAS):
        rec = rd.get(key)
        if isinstance(rec, ArrayRecord):
            out += list(rec.values())
    return out


def _mutate_update(rd: Any, rng: random.Random) -> None:
    kind = rng.randrange(14)
    arrays = _arrays(rd)
    arr = rng.choice(arrays) if arrays else None
    if kind == 0 and arr is not None and arr.data:  # bit flips
        data = bytearray(arr.data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        arr.data = bytes(data)
    elif kind == 1 and arr is not None:  # truncated
        arr.data = arr.data[: rng.randrange(len(arr.data) + 1)]
    elif kind == 2 and arr is not None:  # padded
        arr.data = arr.data + bytes(rng.randint(1, 64))
    elif kind == 3 and arr is not None:  # another shape, same bytes or not
        arr.shape = tuple(rng.randint(0, 20) for _ in range(rng.randint(0, 4)))
    elif kind == 4 and arr is not None:  # huge declared shape
        arr.shape = tuple(rng.choice([2**20, 2**31, 2**40, 3]) for _ in range(rng.randint(1, 3)))
    elif kind == 5 and arr is not None:  # dtype swap
        arr.dtype = rng.choice(["float32", "float16", "bfloat16", "int64", "float64", "<U8", "x"])
    elif kind == 6 and arr is not None:  # stype swap
        arr.stype = rng.choice(["numpy.ndarray", "", "fedft.raw2"])
    elif kind == 7:  # wrong keys
        rec = rd[serde.ADAPTERS]
        key = rng.choice(list(rec.keys()))
        value = rec.pop(key)
        rec[rng.choice([key + "x", "nosep", "::a", key.replace("::a", "::r"), key.upper()])] = value
    elif kind == 8:  # a record missing
        rd.pop(rng.choice([serde.META, serde.ADAPTERS, serde.SCALING, serde.EXTRAS, serde.METRICS]))
    elif kind == 9:  # a record of the wrong type
        key = rng.choice([serde.META, serde.ADAPTERS, serde.SCALING, serde.EXTRAS, serde.METRICS])
        rd.pop(key)  # replacing in place makes Flower log a warning per case
        rd[key] = rng.choice([ConfigRecord({"x": 1}), ArrayRecord(), MetricRecord({"m": 1.0})])
    elif kind == 10:  # meta values
        key = rng.choice(["num_examples", "version", "parts", "kind"])
        rd[serde.META][key] = rng.choice([-1, 0, 2**62, "x", 1.5, True, "ab", "r", b"\0"])
    elif kind == 11:  # scalings
        rec = rd[serde.SCALING]
        key = rng.choice([*rec.keys(), "unknown.module"])
        rec[key] = rng.choice([float("nan"), float("inf"), -1.0, 0.0, "2.0", 10**30, 2.0])
    elif kind == 12:  # metrics
        rd[serde.METRICS][rng.choice(["train_loss", "epsilon"])] = rng.choice(
            [float("nan"), [1.0, 2.0], -1.0, 10**18]
        )
    else:  # an extras tensor of another shape (still well-formed bytes)
        rd[serde.EXTRAS]["classifier.weight"] = serde.tensor_to_array(torch.ones(3, 8))


def _run(cases: Callable[[int], None]) -> tuple[Counter[str], int]:
    outcomes: Counter[str] = Counter()
    tracemalloc.start()
    try:
        for i in range(N_CASES):
            try:
                cases(i)
                outcomes["ok"] += 1
            except (ValueError, wire.WireError, DecodeError) as exc:
                outcomes[type(exc).__name__] += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return outcomes, peak


def test_fuzz_update_messages() -> None:
    start, extras, update = _start()
    base = serde.update_to_recorddict(update, parts="ab")
    rng = random.Random(SEED)
    rejected_by_validation = 0

    def case(_: int) -> None:
        nonlocal rejected_by_validation
        rd = copy.deepcopy(base)
        for _ in range(rng.randint(1, 3)):
            try:
                _mutate_update(rd, rng)
            except (TypeError, ValueError, KeyError, IndexError):
                pass  # Flower refused to build that record: the sender could not send it
        got = serde.update_from_recorddict(rd, client_id="0", parts="ab", reference=start)
        problems = validate_update(
            got, expected=start, parts="ab", extras_expected=extras, max_norm=10.0
        )
        if problems:
            rejected_by_validation += 1

    outcomes, peak = _run(case)
    # seen: SerdeError 8,601, decoded 1,399 (then validated), tracemalloc peak 1.3 MB
    assert sum(outcomes.values()) == N_CASES
    assert outcomes["ok"] < N_CASES // 2  # the mutations really break messages
    assert outcomes["SerdeError"] > N_CASES // 3
    assert peak < PEAK_BYTES, peak
    # some mutations decode fine and only validation catches them (e.g. a head of shape
    # (3, 8) instead of (2, 8), a module renamed consistently)
    assert 0 < rejected_by_validation <= outcomes["ok"]


def _frame() -> wire.Frame:
    g = torch.Generator().manual_seed(0)
    hidden = wire.encode_tensor("hidden", torch.randn(2, 4, 8, generator=g), "bf16")
    mask = wire.encode_tensor("attention_mask", torch.ones(2, 4, dtype=torch.uint8), "uint8")
    return wire.Frame("sess", "forward", wire.StepId(1, 2, 0, 5), (hidden, mask), credits=1)


def _decode_like_service(frame: wire.Frame) -> None:
    """What server/split_service.py does with an incoming forward/backward frame."""
    if frame.kind == "error":
        raise wire.WireError(frame.error_code or "BAD_FRAME", frame.error_message)
    lim = wire.Limits(max_batch=4, max_seq_len=16)
    hidden = wire.decode_tensor(
        frame.tensor("hidden"),
        max_elements=lim.max_batch * lim.max_seq_len * 8,
        expect_shape=(None, None, 8),
    )
    b, t, _ = hidden.shape
    if b > lim.max_batch or t > lim.max_seq_len:
        raise wire.WireError("SHAPE_REJECTED", "too large")
    wire.decode_mask(frame.tensor("attention_mask"), batch=b, seq_len=t)


def _mutate_tensor(wt: wire.WireTensor, rng: random.Random) -> wire.WireTensor:
    kind = rng.randrange(6)
    data = bytearray(wt.data)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return wire.WireTensor(wt.name, wt.dtype, wt.shape, bytes(data), wt.scale)
    if kind == 1:
        return wire.WireTensor(
            wt.name, wt.dtype, wt.shape, bytes(data[: rng.randrange(len(data) + 1)]), wt.scale
        )
    if kind == 2:
        shape = tuple(
            rng.choice([0, 1, 2, 4, 8, 2**31, 2**40, -1]) for _ in range(rng.randint(0, 5))
        )
        return wire.WireTensor(wt.name, wt.dtype, shape, wt.data, wt.scale)
    if kind == 3:
        dtype = rng.choice(["fp32", "bf16", "fp16", "uint8", "unknown:9"])
        return wire.WireTensor(
            wt.name, dtype, wt.shape, wt.data, rng.choice([0.0, 1.0, float("nan"), -2.0, 1e-300])
        )
    if kind == 4:
        return wire.WireTensor(
            rng.choice(["hidden", "grad", "labels", "logits"]),
            wt.dtype,
            wt.shape,
            wt.data,
            wt.scale,
        )
    return wt


def test_fuzz_split_frames() -> None:
    frame = _frame()
    raw = wire.frame_to_bytes(frame)
    rng = random.Random(SEED)

    def case(i: int) -> None:
        if i % 2 == 0:  # bytes on the wire
            data = bytearray(raw)
            kind = rng.randrange(3)
            if kind == 0:
                for _ in range(rng.randint(1, 8)):
                    j = rng.randrange(len(data))
                    data[j] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data = data[: rng.randrange(len(data))]
            else:
                j = rng.randrange(len(data))
                data[j:j] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
            got = wire.safe_frame_from_bytes(bytes(data))
        else:  # well-formed protobuf, hostile content
            tensors = tuple(_mutate_tensor(t, rng) for t in frame.tensors)
            if rng.random() < 0.2:
                tensors = tensors[: rng.randrange(len(tensors) + 1)] + tensors
            got = wire.safe_frame_from_bytes(
                wire.frame_to_bytes(
                    wire.Frame(frame.session_id, frame.kind, frame.step, tensors, frame.credits)
                )
            )
        _decode_like_service(got)

    outcomes, peak = _run(case)
    # seen: WireError 9,223 (4,007 of them bytes that are no protobuf), decoded 777,
    # tracemalloc peak 0.4 MB
    assert sum(outcomes.values()) == N_CASES
    assert outcomes["DecodeError"] == 0  # bytes that are no protobuf are a typed BAD_FRAME
    assert outcomes["WireError"] > N_CASES // 4
    assert peak < PEAK_BYTES, peak
