"""Flower records <-> fedft types: round trips, reference rebuilds, rejection, byte counts."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

from fedft.config import ConfigError, RunConfig, build_config
from fedft.transport import serde
from fedft.transport.flower_config import RUN_CONFIG_KEY, read_run_config, to_run_config
from fedft.transport.serde import SerdeError
from fedft.types import ClientUpdate, LoraFactors

MODULES = ("layers.0.attn.q_proj", "layers.1.mlp.down_proj")


def _adapters(
    rank: int = 4,
    *,
    with_r: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    scaling: float = 2.0,
) -> dict[str, LoraFactors]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, m in enumerate(MODULES):
        d_out, d_in = 12 + i, 10 + 2 * i
        out[m] = LoraFactors(
            a=torch.randn(rank, d_in, generator=g).to(dtype),
            b=torch.randn(d_out, rank, generator=g).to(dtype),
            scaling=scaling + i,
            r=torch.randn(rank, rank, generator=g).to(dtype) if with_r else None,
        )
    return out


def _same(x: LoraFactors, y: LoraFactors) -> None:
    assert x.scaling == y.scaling
    for part in ("a", "b", "r"):
        tx, ty = getattr(x, part), getattr(y, part)
        assert (tx is None) == (ty is None), part
        if tx is not None:
            assert tx.dtype == ty.dtype and tx.shape == ty.shape, part
            assert torch.equal(tx, ty), part


def _wire(rd: RecordDict) -> RecordDict:
    """What the other side sees: the proto bytes parsed back."""
    return recorddict_from_proto(recorddict_to_proto(rd))


# --- single tensors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.float64]
)
def test_tensor_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5) * 100).to(dtype)
    arr = serde.tensor_to_array(t)
    assert arr.stype == serde.STYPE
    back = serde.array_to_tensor(arr)
    want = t.to(torch.float32) if dtype == torch.float64 else t
    assert back.dtype == want.dtype and back.shape == want.shape
    assert torch.equal(back, want)
    assert len(arr.data) == t.numel() * want.element_size()
    back.add_(1)  # the decoded tensor is writable and owns its memory


def test_bf16_travels_at_two_bytes_per_element_and_noncontiguous_inputs_work() -> None:
    t = torch.randn(8, 6).to(torch.bfloat16).t()  # non-contiguous (6, 8)
    arr = serde.tensor_to_array(t)
    assert arr.dtype == "bfloat16" and len(arr.data) == 2 * 48
    assert torch.equal(serde.array_to_tensor(arr), t)


def test_bytes_are_little_endian_c_order() -> None:
    arr = serde.tensor_to_array(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    import struct

    assert struct.unpack("<4f", arr.data) == (1.0, 2.0, 3.0, 4.0)


def test_unsupported_dtype_is_refused_on_encode() -> None:
    with pytest.raises(SerdeError, match="bool"):
        serde.tensor_to_array(torch.ones(3, dtype=torch.bool))


# --- rejection ---------------------------------------------------------------------------------


def _raw(dtype: str, shape: tuple[int, ...], data: bytes, stype: str = serde.STYPE) -> Array:
    return Array(dtype=dtype, shape=shape, stype=stype, data=data)


def test_wrong_byte_length_is_rejected() -> None:
    with pytest.raises(SerdeError, match=r"'w'.*20 bytes.*needs 24"):
        serde.array_to_tensor(_raw("float32", (2, 3), b"\0" * 20), key="w")


def test_huge_declared_shape_is_rejected_before_allocating() -> None:
    with pytest.raises(SerdeError, match="more than the limit"):
        serde.array_to_tensor(_raw("float32", (1 << 20, 1 << 20), b"\0" * 16))
    with pytest.raises(SerdeError, match="more than the limit"):
        serde.array_to_tensor(_raw("float32", (4, 4), b"\0" * 64), max_numel=15)


def test_bad_shapes_unknown_dtype_and_foreign_stype_are_rejected() -> None:
    with pytest.raises(SerdeError, match="dtype 'object'"):
        serde.array_to_tensor(_raw("object", (1,), b"\0" * 8))
    with pytest.raises(SerdeError, match="dtype 'float64'"):
        serde.array_to_tensor(_raw("float64", (1,), b"\0" * 8))
    with pytest.raises(SerdeError, match="shape"):
        serde.array_to_tensor(_raw("float32", (-1, 2), b""))
    with pytest.raises(SerdeError, match="stype 'numpy.ndarray'"):
        serde.array_to_tensor(Array(torch.ones(2).numpy()))


def test_non_finite_values_rejected_only_when_asked() -> None:
    arr = serde.tensor_to_array(torch.tensor([1.0, math.nan]))
    assert torch.isnan(serde.array_to_tensor(arr)).any()
    with pytest.raises(SerdeError, match="NaN"):
        serde.array_to_tensor(arr, check_finite=True)
    inf = serde.tensor_to_array(torch.tensor([math.inf]).to(torch.bfloat16))
    with pytest.raises(SerdeError, match="infinite"):
        serde.array_to_tensor(inf, check_finite=True)


def test_tensors_record_round_trip_keeps_order() -> None:
    d = {"z.weight": torch.randn(2, 3), "a.bias": torch.arange(5), "m": torch.randn(4).half()}
    back = serde.tensors_from_record(serde.tensors_to_record(d))
    assert list(back) == list(d)
    assert all(torch.equal(back[k], d[k]) and back[k].dtype == d[k].dtype for k in d)


# --- adapters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adapters_ab_round_trip(dtype: torch.dtype) -> None:
    ad = _adapters(dtype=dtype)
    rec = serde.adapters_to_record(ad, parts="ab")
    assert sorted(rec) == sorted(f"{m}::{p}" for m in MODULES for p in "ab")
    back = serde.adapters_from_record(
        rec, parts="ab", scalings={m: f.scaling for m, f in ad.items()}
    )
    for m in MODULES:
        _same(ad[m], back[m])
    assert torch.allclose(back[MODULES[0]].delta(), ad[MODULES[0]].delta())


def test_ffa_sends_only_b_and_server_rebuilds_from_shared_a() -> None:
    shared = _adapters(seed=1)  # what the server handed out: A frozen and shared
    trained = {m: LoraFactors(a=f.a, b=f.b + 0.5, scaling=f.scaling) for m, f in shared.items()}
    rec = serde.adapters_to_record(trained, parts="b")
    assert all(k.endswith("::b") for k in rec)
    back = serde.adapters_from_record(rec, parts="b", reference=shared)
    for m in MODULES:
        _same(trained[m], back[m])
        assert back[m].a is shared[m].a


def test_fedsb_sends_only_r_and_server_rebuilds_b_r_a() -> None:
    shared = _adapters(rank=3, with_r=True, seed=2)
    trained = {
        m: LoraFactors(a=f.a, b=f.b, scaling=f.scaling, r=torch.randn(3, 3))
        for m, f in shared.items()
    }
    rec = serde.adapters_to_record(trained, parts="r")
    assert sorted(rec) == sorted(f"{m}::r" for m in MODULES)
    assert sum(len(a.data) for a in rec.values()) == len(MODULES) * 9 * 4  # r^2 floats each
    back = serde.adapters_from_record(rec, parts="r", reference=shared)
    for m in MODULES:
        _same(trained[m], back[m])
        want = trained[m].scaling * trained[m].b @ trained[m].r @ trained[m].a
        assert torch.allclose(back[m].delta(), want, atol=1e-5)


def test_abr_round_trip_and_ab_refuses_to_drop_r() -> None:
    ad = _adapters(with_r=True)
    back = serde.adapters_from_record(
        serde.adapters_to_record(ad, parts="abr"), parts="abr", reference=ad
    )
    for m in MODULES:
        _same(ad[m], back[m])
    with pytest.raises(SerdeError, match="would drop"):
        serde.adapters_to_record(ad, parts="ab")
    with pytest.raises(SerdeError, match="no r matrix"):
        serde.adapters_to_record(_adapters(), parts="r")


def test_reference_mismatches_are_rejected() -> None:
    shared = _adapters(rank=4)
    rec = serde.adapters_to_record(_adapters(rank=2), parts="b")
    with pytest.raises(SerdeError, match="does not match the reference"):
        serde.adapters_from_record(rec, parts="b", reference=shared)
    with pytest.raises(SerdeError, match="needs the reference"):
        serde.adapters_from_record(rec, parts="b")
    with pytest.raises(SerdeError, match="not in the reference"):
        serde.adapters_from_record(
            serde.adapters_to_record(shared, parts="b"),
            parts="b",
            reference={MODULES[0]: shared[MODULES[0]]},
        )
    # a record holding other parts than declared
    with pytest.raises(SerdeError, match="unexpected entry"):
        serde.adapters_from_record(
            serde.adapters_to_record(shared, parts="ab"), parts="b", reference=shared
        )
    partial = serde.adapters_to_record(shared, parts="ab")
    del partial[f"{MODULES[0]}::a"]
    with pytest.raises(SerdeError, match=r"got parts \['b'\]"):
        serde.adapters_from_record(partial, parts="ab", reference=shared)


# --- whole messages -------------------------------------------------------------------------


@pytest.mark.parametrize("parts", ["ab", "b", "r", "abr"])
def test_update_round_trip_through_the_proto(parts: str) -> None:
    shared = _adapters(rank=3, with_r="r" in parts, seed=3)
    update = ClientUpdate(
        client_id="ignored",
        adapters=shared,
        num_examples=37,
        metrics={"train_loss": 0.75, "epsilon": 1.25, "steps": 20},
        extras={"classifier.weight": torch.randn(2, 12), "prompt": torch.randn(4, 12).half()},
    )
    rd = _wire(serde.update_to_recorddict(update, parts=parts))  # type: ignore[arg-type]
    back = serde.update_from_recorddict(
        rd,
        client_id="node-7",
        parts=parts,  # type: ignore[arg-type]
        reference=shared,
    )
    assert back.client_id == "node-7" and back.num_examples == 37
    assert back.metrics == {"train_loss": 0.75, "epsilon": 1.25, "steps": 20.0}
    assert list(back.extras) == list(update.extras)
    for k, t in update.extras.items():
        assert torch.equal(back.extras[k], t) and back.extras[k].dtype == t.dtype
    for m in MODULES:
        _same(shared[m], back.adapters[m])


def test_update_with_wrong_parts_or_poisoned_values_is_rejected() -> None:
    ad = _adapters()
    update = ClientUpdate(client_id="c", adapters=ad, num_examples=5)
    rd = serde.update_to_recorddict(update, parts="ab")
    with pytest.raises(SerdeError, match="sent parts='ab', expected 'b'"):
        serde.update_from_recorddict(rd, client_id="c", parts="b", reference=ad)
    bad = {m: LoraFactors(a=f.a, b=f.b * math.nan, scaling=f.scaling) for m, f in ad.items()}
    rd = serde.update_to_recorddict(
        ClientUpdate(client_id="c", adapters=bad, num_examples=5), parts="ab"
    )
    with pytest.raises(SerdeError, match="NaN"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")
    rd = serde.update_to_recorddict(update, parts="ab")
    rd[serde.META]["num_examples"] = 0
    with pytest.raises(SerdeError, match="num_examples = 0"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")
    rd[serde.META]["num_examples"] = 5
    rd[serde.META]["version"] = 99
    with pytest.raises(SerdeError, match="wire version 99"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")
    rd[serde.META]["version"] = serde.WIRE_VERSION
    rd[serde.ADAPTERS][f"{MODULES[0]}::b"] = _raw("float32", (12, 4), b"\0" * 47)
    with pytest.raises(SerdeError, match=r"layers.0.attn.q_proj::b.*47 bytes"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")
    del rd[serde.METRICS]
    with pytest.raises(SerdeError, match="'fedft.metrics' is missing"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")


def test_start_round_trip_with_dense_and_factored_base_delta() -> None:
    ad = _adapters(dtype=torch.bfloat16)
    stacked = LoraFactors(a=torch.randn(7, 10), b=torch.randn(12, 7), scaling=0.5)  # FLoRA
    base_delta = {MODULES[0]: stacked, MODULES[1]: torch.randn(13, 12)}
    config = {"round": 3, "lr": 5e-4, "algorithm": "flora", "fresh_lora": True}
    prompt = torch.randn(4, 8)
    rd = _wire(
        serde.start_to_recorddict(
            adapters=ad,
            parts="ab",
            base_delta=base_delta,
            extras={"prompt": prompt},
            config=config,
        )
    )
    adapters, delta, extras, cfg = serde.start_from_recorddict(rd)
    for m in MODULES:
        _same(ad[m], adapters[m])
    got0 = delta[MODULES[0]]
    assert isinstance(got0, LoraFactors)
    _same(stacked, got0)
    got1 = delta[MODULES[1]]
    assert isinstance(got1, torch.Tensor) and torch.equal(got1, base_delta[MODULES[1]])
    assert list(extras) == ["prompt"] and torch.equal(extras["prompt"], prompt)
    assert cfg == config and isinstance(cfg["fresh_lora"], bool) and isinstance(cfg["round"], int)


def test_start_with_b_only_needs_the_clients_reference() -> None:
    shared = _adapters(seed=5)
    rd = serde.start_to_recorddict(adapters=shared, parts="b", base_delta={}, extras={}, config={})
    with pytest.raises(SerdeError, match="needs the reference"):
        serde.start_from_recorddict(rd)
    adapters, delta, extras, cfg = serde.start_from_recorddict(rd, reference=shared)
    assert delta == {} and extras == {} and cfg == {}
    for m in MODULES:
        _same(shared[m], adapters[m])
    with pytest.raises(SerdeError, match="expected kind 'update', got 'start'"):
        serde.update_from_recorddict(rd, client_id="x", parts="b", reference=shared)


# --- byte accounting ------------------------------------------------------------------------------


def test_nbytes_is_the_proto_size_and_grows_with_rank() -> None:
    sizes = []
    for rank in (2, 4, 8, 16):
        rd = serde.update_to_recorddict(
            ClientUpdate(client_id="c", adapters=_adapters(rank=rank), num_examples=3),
            parts="ab",
        )
        n = serde.recorddict_nbytes(rd)
        assert (
            n
            == recorddict_to_proto(rd).ByteSize()
            == len(recorddict_to_proto(rd).SerializeToString())
        )
        payload = sum(len(a.data) for a in rd[serde.ADAPTERS].values())
        assert payload == 4 * rank * sum(10 + 2 * i + 12 + i for i in range(len(MODULES)))
        assert payload < n < payload + 2048  # framing is small next to the tensors
        sizes.append(n)
    assert sizes == sorted(sizes) and len(set(sizes)) == 4
    # the growth is the extra tensor bytes (plus at most a few bytes of length prefixes)
    extra = 4 * (16 - 8) * sum(10 + 2 * i + 12 + i for i in range(len(MODULES)))
    assert extra <= sizes[3] - sizes[2] <= extra + 8


def test_fedsb_and_ffa_uploads_are_smaller_than_full_factors() -> None:
    shared = _adapters(rank=8, with_r=True)
    upd = ClientUpdate(client_id="c", adapters=shared, num_examples=3)
    n_abr = serde.recorddict_nbytes(serde.update_to_recorddict(upd, parts="abr"))
    n_r = serde.recorddict_nbytes(serde.update_to_recorddict(upd, parts="r"))
    plain = ClientUpdate(
        client_id="c",
        adapters={m: LoraFactors(a=f.a, b=f.b, scaling=f.scaling) for m, f in shared.items()},
        num_examples=3,
    )
    n_ab = serde.recorddict_nbytes(serde.update_to_recorddict(plain, parts="ab"))
    n_b = serde.recorddict_nbytes(serde.update_to_recorddict(plain, parts="b"))
    assert n_r < n_b < n_ab < n_abr


# --- Flower run config ----------------------------------------------------------------------------


def test_run_config_round_trip_and_errors() -> None:
    cfg = build_config(
        {"name": "t", "federation": {"rounds": 2}, "aggregation": {"algorithm": "ffa"}}
    )
    rc = to_run_config(cfg)
    assert set(rc) == {RUN_CONFIG_KEY} and isinstance(rc[RUN_CONFIG_KEY], str)
    assert read_run_config(rc) == cfg
    assert read_run_config({**rc, "other": 1}) == cfg
    assert read_run_config(to_run_config(RunConfig())) == RunConfig()
    with pytest.raises(ConfigError, match="no 'fedft-config' key"):
        read_run_config({})
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_run_config({RUN_CONFIG_KEY: "{nope"})
    with pytest.raises(ConfigError, match="is not allowed"):
        read_run_config({RUN_CONFIG_KEY: 3})
    with pytest.raises(ConfigError, match="federation.rounds"):
        read_run_config({RUN_CONFIG_KEY: '{"federation": {"rounds": 0}}'})


def test_config_record_values_are_type_checked() -> None:
    with pytest.raises(SerdeError, match="values must be"):
        serde.start_to_recorddict(
            adapters={},
            parts="ab",
            base_delta={},
            extras={},
            config={"x": [1, 2]},  # type: ignore[dict-item]
        )
    rd = serde.start_to_recorddict(adapters={}, parts="ab", base_delta={}, extras={}, config={})
    rd[serde.SCALING] = ConfigRecord({"m": "big"})
    with pytest.raises(SerdeError, match="not a number"):
        serde.start_from_recorddict(rd)
    rd[serde.SCALING] = ConfigRecord()
    rd[serde.ADAPTERS] = ArrayRecord({"noseparator": serde.tensor_to_array(torch.ones(1))})
    with pytest.raises(SerdeError, match="unexpected entry 'noseparator'"):
        serde.start_from_recorddict(rd)


def test_start_parts_send_frozen_factors_only_to_clients_without_them() -> None:
    assert serde.start_parts("ab", holds_frozen=False) == "ab"
    assert serde.start_parts("ab", holds_frozen=True) == "ab"  # nothing frozen: all trained
    assert serde.start_parts("b", holds_frozen=False) == "ab"  # FFA: A once
    assert serde.start_parts("b", holds_frozen=True) == "b"
    assert serde.start_parts("r", holds_frozen=False) == "abr"  # Fed-SB: B, A once
    assert serde.start_parts("r", holds_frozen=True) == "r"


def test_start_base_delta_with_a_fedsb_middle_round_trips() -> None:
    with_r = _adapters(rank=3, with_r=True, seed=9)[MODULES[0]]
    base_delta = {MODULES[0]: with_r, MODULES[1]: torch.randn(13, 12)}
    rd = _wire(
        serde.start_to_recorddict(
            adapters={}, parts="ab", base_delta=base_delta, extras={}, config={}
        )
    )
    _, delta, _, _ = serde.start_from_recorddict(rd)
    got = delta[MODULES[0]]
    assert isinstance(got, LoraFactors) and got.r is not None
    _same(with_r, got)
    assert torch.equal(delta[MODULES[1]], base_delta[MODULES[1]])  # type: ignore[arg-type]


def test_bad_base_deltas_are_refused_naming_the_module() -> None:
    f = _adapters(rank=2)[MODULES[0]]
    with pytest.raises(SerdeError, match="module name 'a::b' must not contain '::'"):
        serde._base_delta_to_records({"a::b": f})
    with pytest.raises(SerdeError, match=r"base_delta 'm': dense delta must be \(out, in\)"):
        serde._base_delta_to_records({"m": torch.zeros(2, 3, 4)})
    with pytest.raises(SerdeError, match="base_delta 'm': expected a Tensor or LoraFactors"):
        serde._base_delta_to_records({"m": [1.0]})  # type: ignore[dict-item]

    def decode(arrays: dict[str, torch.Tensor], scalings: dict[str, float]) -> object:
        record = ArrayRecord()
        for key, t in arrays.items():
            record[key] = serde.tensor_to_array(t)
        return serde._base_delta_from_records(
            record, scalings, max_numel=10_000, check_finite=False
        )

    with pytest.raises(SerdeError, match="base_delta m: dense delta must be 2-D"):
        decode({"m::dense": torch.zeros(2, 2, 2)}, {})
    with pytest.raises(SerdeError, match="base_delta m: factored delta without a scaling"):
        decode({"m::a": f.a, "m::b": f.b}, {})
    with pytest.raises(SerdeError, match=r"base_delta m: got \['a'\]; expected dense"):
        decode({"m::a": f.a}, {"m": 1.0})
    with pytest.raises(SerdeError, match="base_delta m: "):
        decode({"m::a": f.a, "m::b": torch.zeros(4, 3)}, {"m": 1.0})  # ranks 2 vs 3
    ok = decode({"m::a": f.a, "m::b": f.b, "m::r": torch.eye(2)}, {"m": 0.5})
    assert isinstance(ok, dict) and isinstance(ok["m"], LoraFactors)
    assert ok["m"].scaling == 0.5 and torch.equal(ok["m"].r, torch.eye(2))


def test_start_base_delta_is_bounded_and_checked_like_every_tensor() -> None:
    poisoned = torch.randn(13, 12)
    poisoned[0, 0] = float("nan")
    rd = serde.start_to_recorddict(
        adapters={}, parts="ab", base_delta={MODULES[1]: poisoned}, extras={}, config={}
    )
    _, delta, _, _ = serde.start_from_recorddict(rd)  # finiteness is checked only when asked
    assert torch.isnan(delta[MODULES[1]]).sum() == 1  # type: ignore[union-attr]
    key = f"base_delta {MODULES[1]}::dense"
    with pytest.raises(SerdeError, match=f"'{key}': contains NaN or infinite"):
        serde.start_from_recorddict(rd, check_finite=True)
    with pytest.raises(SerdeError, match=f"'{key}'.*156 elements, more than the limit of 100"):
        serde.start_from_recorddict(rd, max_numel=100)


def test_start_with_unknown_parts_is_refused() -> None:
    rd = serde.start_to_recorddict(adapters={}, parts="ab", base_delta={}, extras={}, config={})
    rd[serde.META]["parts"] = "xyz"  # type: ignore[index]
    with pytest.raises(SerdeError, match=r"start message: parts = 'xyz' is not one of \["):
        serde.start_from_recorddict(rd)


# --- every refusal names what was wrong, and every bound reaches every entry ------------------


def _update_rd(
    adapters: dict[str, LoraFactors] | None = None, **extras: torch.Tensor
) -> RecordDict:
    update = ClientUpdate(
        client_id="c", adapters=adapters or _adapters(), num_examples=5, extras=dict(extras)
    )
    return _wire(serde.update_to_recorddict(update, parts="ab"))


def test_decoding_refusals_name_the_entry_and_the_reason() -> None:
    with pytest.raises(SerdeError, match=r"^entry 'w': expected a Flower Array, got Tensor$"):
        serde.array_to_tensor(torch.ones(2), key="w")  # type: ignore[arg-type]
    with pytest.raises(SerdeError, match=r"^entry '\?': 4 bytes of data"):
        serde.array_to_tensor(_raw("float32", (2,), b"\0" * 4))  # no key given: '?'
    with pytest.raises(SerdeError, match="only decodes tensors encoded by fedft.transport.serde$"):
        serde.array_to_tensor(_raw("float32", (1,), b"\0" * 4, stype="numpy.ndarray"))
    with pytest.raises(SerdeError, match=r"shape \(-1, 2\) is not a list of at most 8 sizes >= 0"):
        serde.array_to_tensor(_raw("float32", (-1, 2), b""))
    with pytest.raises(SerdeError, match=r"shape \(True, 2\) is not a list"):
        serde.array_to_tensor(_raw("float32", (True, 2), b"\0" * 8))  # type: ignore[arg-type]
    with pytest.raises(SerdeError, match="at most 8 sizes"):
        serde.array_to_tensor(_raw("float32", (1,) * 9, b"\0" * 4))
    not_bytes = _raw("float32", (1,), b"\0" * 4)
    not_bytes.data = "abcd"  # type: ignore[assignment]
    with pytest.raises(SerdeError, match=r"^entry 'x': data is str, not bytes$"):
        serde.array_to_tensor(not_bytes, key="x")
    with pytest.raises(SerdeError, match=r"^expected an ArrayRecord, got dict$"):
        serde.tensors_from_record({})  # type: ignore[arg-type]
    with pytest.raises(SerdeError, match=r"^expected an ArrayRecord of adapters, got dict$"):
        serde.adapters_from_record({}, parts="ab")  # type: ignore[arg-type]
    with pytest.raises(SerdeError, match=r"^expected a RecordDict, got dict$"):
        serde.update_from_recorddict({}, client_id="c", parts="ab")  # type: ignore[arg-type]
    rd = _update_rd()
    rd[serde.META] = ArrayRecord()
    with pytest.raises(SerdeError, match=r"^record 'fedft.meta' is a ArrayRecord, not a Config"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")


def test_encoding_refusals_name_the_entry_and_the_reason() -> None:
    with pytest.raises(
        SerdeError, match=r"allowed dtypes: \[.*\] \(and float64, cast to float32\)"
    ):
        serde.tensor_to_array(torch.ones(3, dtype=torch.bool))
    with pytest.raises(SerdeError, match=r"^entry 'x': expected a Tensor, got list$"):
        serde.tensors_to_record({"x": [1.0]})  # type: ignore[dict-item]
    with pytest.raises(SerdeError, match=r"^parts = 'ba' is not allowed: one of \['ab', 'b', 'r'"):
        serde.adapters_to_record(_adapters(), parts="ba")  # type: ignore[arg-type]
    with pytest.raises(SerdeError, match=r"^module name 'a::b' must not contain '::'$"):
        serde.adapters_to_record({"a::b": _adapters()[MODULES[0]]}, parts="ab")
    with pytest.raises(SerdeError, match=r"^adapter 'm': expected LoraFactors, got <class 'dict'>"):
        serde.adapters_to_record({"m": {}}, parts="ab")  # type: ignore[dict-item]
    with pytest.raises(
        SerdeError,
        match=rf"^adapter '{MODULES[0]}' has a Fed-SB r matrix that parts='ab' would drop; "
        r"use parts='abr' or 'r'$",
    ):
        serde.adapters_to_record(_adapters(with_r=True), parts="ab")
    with pytest.raises(SerdeError, match=r"^metric 'acc' = 'high' is not a number$"):
        serde.metrics_to_record({"acc": "high"})  # type: ignore[dict-item]


def test_a_float64_cast_is_logged_with_its_shape(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="fedft.transport.serde"):
        serde.tensor_to_array(torch.zeros(2, 3, dtype=torch.float64))
    assert caplog.messages == ["casting a float64 tensor (2, 3) to float32 for the wire"]


def test_shape_bounds_are_inclusive_and_empty_tensors_decode() -> None:
    eight = serde.array_to_tensor(_raw("float32", (1,) * 8, b"\0" * 4))  # MAX_NDIM dims
    assert eight.shape == (1,) * 8
    empty = serde.array_to_tensor(_raw("float32", (0, 3), b""))
    assert empty.shape == (0, 3)
    at_limit = serde.array_to_tensor(_raw("float32", (4, 4), b"\0" * 64), max_numel=16)
    assert at_limit.shape == (4, 4)


def test_a_decoded_tensor_is_a_writable_copy_not_a_view_of_the_message() -> None:
    arr = serde.tensor_to_array(torch.tensor([1.0, 2.0]))
    t = serde.array_to_tensor(arr)
    t.add_(1.0)  # a view of the (immutable) message bytes would write into them
    assert t.tolist() == [2.0, 3.0]
    assert serde.array_to_tensor(arr).tolist() == [1.0, 2.0]


def test_record_decoders_pass_the_bounds_to_every_entry() -> None:
    poisoned = torch.tensor([1.0, math.nan, 2.0, 3.0])
    rec = serde.tensors_to_record({"head": poisoned})
    assert torch.isnan(serde.tensors_from_record(rec)["head"]).any()  # checked only when asked
    with pytest.raises(SerdeError, match=r"^entry 'head': contains NaN"):
        serde.tensors_from_record(rec, check_finite=True)
    with pytest.raises(SerdeError, match=r"^entry 'head': .* more than the limit of 3$"):
        serde.tensors_from_record(rec, max_numel=3)
    ad = _adapters(rank=2)
    ad[MODULES[0]].b[0, 0] = math.nan
    rec = serde.adapters_to_record(ad, parts="ab")
    back = serde.adapters_from_record(rec, parts="ab", reference=ad)  # checked only when asked
    assert torch.isnan(back[MODULES[0]].b).any()
    with pytest.raises(SerdeError, match=rf"'{MODULES[0]}::b': contains NaN"):
        serde.adapters_from_record(rec, parts="ab", reference=ad, check_finite=True)
    with pytest.raises(SerdeError, match=rf"'{MODULES[0]}::a'.* more than the limit of 19$"):
        serde.adapters_from_record(rec, parts="ab", reference=ad, max_numel=19)


def test_an_update_checks_its_extras_like_its_adapters() -> None:
    head = torch.randn(2, 12)
    head[1, 3] = math.inf
    with pytest.raises(SerdeError, match=r"^entry 'head': contains NaN or infinite values$"):
        serde.update_from_recorddict(_update_rd(head=head), client_id="c", parts="ab")
    big = _update_rd(head=torch.zeros(100, 100))
    with pytest.raises(SerdeError, match=r"^entry 'head': .* more than the limit of 1000$"):
        serde.update_from_recorddict(big, client_id="c", parts="ab", max_numel=1000)
    with pytest.raises(SerdeError, match=rf"'{MODULES[0]}::a'.* more than the limit of 30$"):
        serde.update_from_recorddict(_update_rd(), client_id="c", parts="ab", max_numel=30)


def test_a_start_message_checks_adapters_and_extras_when_asked() -> None:
    ad = _adapters(rank=2)
    prompt = torch.randn(3, 8)
    prompt[0, 0] = math.nan
    rd = serde.start_to_recorddict(
        adapters=ad, parts="ab", base_delta={}, extras={"prompt": prompt}, config={}
    )
    with pytest.raises(SerdeError, match=r"^entry 'prompt': contains NaN"):
        serde.start_from_recorddict(rd, check_finite=True)
    rd = serde.start_to_recorddict(
        adapters=ad, parts="ab", base_delta={}, extras={"prompt": torch.zeros(30, 8)}, config={}
    )
    with pytest.raises(SerdeError, match=r"^entry 'prompt': .* more than the limit of 100$"):
        serde.start_from_recorddict(rd, max_numel=100)  # each adapter factor holds <= 26
    ad[MODULES[1]].a[0, 0] = math.inf
    rd = serde.start_to_recorddict(adapters=ad, parts="ab", base_delta={}, extras={}, config={})
    with pytest.raises(SerdeError, match=rf"'{MODULES[1]}::a': contains NaN or infinite"):
        serde.start_from_recorddict(rd, check_finite=True)
    with pytest.raises(SerdeError, match=rf"'{MODULES[0]}::a'.* more than the limit of 19$"):
        serde.start_from_recorddict(rd, max_numel=19)
    rd = serde.start_to_recorddict(adapters={}, parts="ab", base_delta={}, extras={}, config={})
    rd[serde.CONFIG]["x"] = [1, 2]  # type: ignore[index]
    with pytest.raises(SerdeError, match=r"^config 'x' = \[1, 2\]: expected int, float, str or"):
        serde.start_from_recorddict(rd)


def test_adapter_keys_modules_and_references_are_checked_with_clear_refusals() -> None:
    one = serde.tensor_to_array(torch.ones(1, 1))
    for key in ("::a", "x::y::a"):  # no module; a module name holding the separator
        with pytest.raises(SerdeError, match=f"^unexpected entry '{key}': keys must be"):
            serde.adapters_from_record(ArrayRecord({key: one}), parts="ab")
    sent = {f"m{i}{'x' * 100}": _adapters(rank=2)[MODULES[0]] for i in range(4)}
    rec = serde.adapters_to_record(sent, parts="ab")
    shown = ", ".join(repr(f"m{i}{'x' * 78}") for i in range(3))  # 80 characters of each
    with pytest.raises(SerdeError) as info:
        serde.adapters_from_record(rec, parts="ab", modules=MODULES)
    assert str(info.value) == (
        f"4 adapter module(s) the receiver never sent ({shown}, ...); refused before decoding"
    )
    del rec[f"m3{'x' * 100}::a"], rec[f"m3{'x' * 100}::b"]
    with pytest.raises(SerdeError, match=r"^3 adapter module\(s\) .*'\); refused before"):
        serde.adapters_from_record(rec, parts="ab", modules=MODULES)
    r_only = serde.adapters_to_record(_adapters(rank=2, with_r=True), parts="r")
    with pytest.raises(SerdeError, match=r"^parts='r' needs the reference factors"):
        serde.adapters_from_record(r_only, parts="r")
    no_r = _adapters(rank=2)
    with pytest.raises(SerdeError, match=r"r\(2, 2\) does not match the reference's None$"):
        serde.adapters_from_record(r_only, parts="r", reference=no_r)
    b_only = serde.adapters_to_record(_adapters(rank=2), parts="b")
    with pytest.raises(SerdeError, match=r"b\(12, 2\) does not match the reference's \(12, 4\)$"):
        serde.adapters_from_record(b_only, parts="b", reference=_adapters(rank=4))
    ab = serde.adapters_to_record(_adapters(rank=2), parts="ab")
    with pytest.raises(SerdeError, match=rf"^adapter '{MODULES[0]}': no scaling was sent and no"):
        serde.adapters_from_record(ab, parts="ab", scalings={})
    ab[f"{MODULES[0]}::b"] = serde.tensor_to_array(torch.zeros(12, 3))  # rank 2 vs 3
    with pytest.raises(SerdeError, match=rf"^adapter '{MODULES[0]}': .*\S"):
        serde.adapters_from_record(ab, parts="ab", scalings={MODULES[0]: 1.0})


def test_an_ab_update_of_another_rank_is_decoded_for_the_aggregator_to_judge() -> None:
    """HetLoRA / FLoRA clients train their own ranks: "ab" is never compared to a reference."""
    global_rank4 = _adapters(rank=4)
    rd = _update_rd(_adapters(rank=2, scaling=9.0))
    back = serde.update_from_recorddict(rd, client_id="c", parts="ab", reference=global_rank4)
    assert back.adapters[MODULES[0]].a.shape == (2, 10)
    # the scaling the client sent reaches the caller (validation compares it to the global one)
    assert back.adapters[MODULES[0]].scaling == 9.0 != global_rank4[MODULES[0]].scaling
    extra = dict(_adapters(rank=4))
    extra["layers.9.injected"] = extra[MODULES[0]]
    with pytest.raises(SerdeError, match=r"^1 adapter module\(s\) the receiver never sent"):
        serde.update_from_recorddict(
            _update_rd(extra), client_id="c", parts="ab", reference=global_rank4
        )


def test_update_meta_scalings_and_metrics_are_checked_exactly() -> None:
    rd = _update_rd()
    rd[serde.META]["num_examples"] = 1  # type: ignore[index]
    assert serde.update_from_recorddict(rd, client_id="c", parts="ab").num_examples == 1
    rd[serde.META]["num_examples"] = True  # type: ignore[index]
    with pytest.raises(SerdeError, match=r"^client 'c': num_examples = True is not an integer"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")
    rd[serde.META]["num_examples"] = 5  # type: ignore[index]
    rd[serde.SCALING][MODULES[0]] = math.inf  # type: ignore[index]
    with pytest.raises(SerdeError, match=rf"^fedft.scaling\['{MODULES[0]}'\] = inf is not finite$"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")
    rd = _update_rd()
    rd[serde.METRICS]["loss"] = [1.0, 2.0]  # type: ignore[index]
    with pytest.raises(SerdeError, match=r"^metric 'loss': lists are not accepted, send scalars$"):
        serde.update_from_recorddict(rd, client_id="c", parts="ab")
