"""Flower ConfigRecords <-> the SecAgg message dataclasses of :mod:`fedft.secagg`.

Wire format (version 1): every SecAgg message travels as one ``ConfigRecord`` under the key
``"fedft.secagg"`` of a message's ``RecordDict``. Values are ints, bytes and lists of them
only (no pickle, no floats except the fixed-point ``clip``). Mappings (ciphertexts, shares)
travel as two parallel lists: ``<name>_ids`` (client indices) and ``<name>`` (bytes).

Every decoder checks types, lengths and index ranges *before* building a message, and
raises :class:`SecAggSerdeError` (a ``ValueError``) naming the field. The protocol objects
then check the cryptographic content (AEAD tags, commitments, public keys).

:func:`client_state_to_record` / :func:`client_state_from_record` keep one client's SecAgg
state between the four stages of a round in the node's own ``context.state`` (a Flower
SuperNode keeps it locally and may start a fresh process per message, so process memory
cannot hold it). The state holds private keys: it never leaves the node.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, get_args

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from fedft.secagg import (
    AdvertiseKeys,
    KeyDirectory,
    MaskedInput,
    MaskRequest,
    RoutedShares,
    SecAggClient,
    SecAggClientState,
    SecAggParams,
    ShareCheck,
    ShareKeys,
    UnmaskRequest,
    UnmaskShares,
    feldman,
    shamir,
)

__all__ = [
    "RECORD",
    "SecAggSerdeError",
    "Stage",
    "advertise_from_record",
    "advertise_to_record",
    "check_from_record",
    "check_to_record",
    "client_state_from_record",
    "client_state_to_record",
    "directory_from_record",
    "directory_to_record",
    "masked_from_record",
    "masked_to_record",
    "mask_request_from_record",
    "mask_request_to_record",
    "params_from_record",
    "params_to_record",
    "request_from_record",
    "request_to_record",
    "routed_from_record",
    "round_of",
    "routed_to_record",
    "share_keys_from_record",
    "share_keys_to_record",
    "stage_of",
    "unmask_from_record",
    "unmask_to_record",
]

RECORD = "fedft.secagg"
"""Key of the SecAgg ConfigRecord in a message's RecordDict."""

WIRE_VERSION = 2
"""Version of the record layout in this module."""

Stage = Literal["advertise", "share", "verify", "masked", "unmask"]
"""The five SecAgg stages, in order (see :mod:`fedft.secagg.protocol`)."""

MAX_CLIENTS = 100_000
"""Largest cohort a record may describe (bounds every list before it is read)."""

_KEY_BYTES = 32
_HASH_BYTES = 32
_MAX_BLOB = 4096  # an encrypted share pair is 12 + 8 + 2 * 256 + 16 = 548 bytes
_ELEMENT_BYTES = feldman.ELEMENT_BYTES


class SecAggSerdeError(ValueError):
    """A SecAgg record that cannot be decoded; the message names the field."""


# --- field readers ----------------------------------------------------------------------


def _record(rd: RecordDict) -> ConfigRecord:
    if not isinstance(rd, RecordDict):
        raise SecAggSerdeError(f"expected a RecordDict, got {type(rd).__name__}")
    rec = rd.get(RECORD)
    if not isinstance(rec, ConfigRecord):
        raise SecAggSerdeError(f"record {RECORD!r} is missing or not a ConfigRecord")
    if rec.get("version") != WIRE_VERSION:
        raise SecAggSerdeError(
            f"secagg wire version {rec.get('version')!r} is not {WIRE_VERSION}; run the same "
            "fedft version on server and clients"
        )
    return rec


def _int(rec: ConfigRecord, key: str, lo: int, hi: int) -> int:
    v = rec.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise SecAggSerdeError(f"secagg field {key!r} = {v!r} is not an integer in [{lo}, {hi}]")
    return v


def _bytes(rec: ConfigRecord, key: str, *, size: int | None = None, max_size: int = 0) -> bytes:
    v = rec.get(key)
    if not isinstance(v, bytes):
        raise SecAggSerdeError(f"secagg field {key!r} is {type(v).__name__}, not bytes")
    if size is not None and len(v) != size:
        raise SecAggSerdeError(f"secagg field {key!r} has {len(v)} bytes, expected {size}")
    if max_size and len(v) > max_size:
        raise SecAggSerdeError(f"secagg field {key!r} has {len(v)} bytes > {max_size}")
    return v


def _ints(rec: ConfigRecord, key: str, *, hi: int) -> list[int]:
    v = rec.get(key)
    if not isinstance(v, list) or len(v) > MAX_CLIENTS:
        raise SecAggSerdeError(f"secagg field {key!r} is not a list of at most {MAX_CLIENTS}")
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= hi:
            raise SecAggSerdeError(f"secagg field {key!r} holds {x!r}, not an index in [1, {hi}]")
    if len(set(v)) != len(v):
        raise SecAggSerdeError(f"secagg field {key!r} repeats an index")
    return list(v)  # type: ignore[arg-type]


def _blobs(rec: ConfigRecord, key: str, count: int, *, size: int | None = None) -> list[bytes]:
    v = rec.get(key)
    if not isinstance(v, list) or len(v) != count:
        raise SecAggSerdeError(f"secagg field {key!r} is not a list of {count} byte strings")
    for x in v:
        if not isinstance(x, bytes) or len(x) > _MAX_BLOB or (size is not None and len(x) != size):
            raise SecAggSerdeError(f"secagg field {key!r} holds a malformed byte string")
    return list(v)  # type: ignore[arg-type]


def _mapping(rec: ConfigRecord, key: str, *, hi: int, size: int | None = None) -> dict[int, bytes]:
    ids = _ints(rec, f"{key}_ids", hi=hi)
    return dict(zip(ids, _blobs(rec, key, len(ids), size=size), strict=True))


def _elements(rec: ConfigRecord, key: str, *, max_count: int) -> list[bytes]:
    v = rec.get(key)
    if not isinstance(v, list) or not 1 <= len(v) <= max_count:
        raise SecAggSerdeError(f"secagg field {key!r} is not a list of 1 to {max_count} elements")
    return _blobs(rec, key, len(v), size=_ELEMENT_BYTES)


def _nested(
    rec: ConfigRecord, prefix: str, rows: int, *, hi: int, size: int
) -> list[dict[int, bytes]]:
    """``rows`` mappings stored flat: ``<prefix>_counts``, ``<prefix>_ids``, ``<prefix>_public``."""
    raw = rec.get(f"{prefix}_counts")
    if not isinstance(raw, list) or len(raw) != rows:
        raise SecAggSerdeError(f"secagg field {prefix + '_counts'!r} is not a list of {rows}")
    counts: list[int] = []
    for c in raw:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= hi:
            raise SecAggSerdeError(f"secagg field {prefix + '_counts'!r} holds a bad count")
        counts.append(c)
    raw_ids = rec.get(f"{prefix}_ids")
    if not isinstance(raw_ids, list) or len(raw_ids) != sum(counts):
        raise SecAggSerdeError(f"secagg field {prefix + '_ids'!r} is not a list of {sum(counts)}")
    ids: list[int] = []
    for x in raw_ids:
        if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x <= hi:
            raise SecAggSerdeError(f"secagg field {prefix + '_ids'!r} holds {x!r}")
        ids.append(x)
    blobs = _blobs(rec, f"{prefix}_public", len(ids), size=size)
    out: list[dict[int, bytes]] = []
    at = 0
    for c in counts:
        row = dict(zip(ids[at : at + c], blobs[at : at + c], strict=True))
        if len(row) != c:
            raise SecAggSerdeError(f"secagg field {prefix + '_ids'!r} repeats an index")
        out.append(row)
        at += c
    return out


def _put_mapping(out: dict[str, object], key: str, m: Mapping[int, bytes]) -> None:
    ids = sorted(m)
    out[f"{key}_ids"] = ids
    out[key] = [bytes(m[i]) for i in ids]


def _make(stage: Stage | None, fields: Mapping[str, object]) -> ConfigRecord:
    body: dict[str, object] = {"version": WIRE_VERSION, **fields}
    if stage is not None:
        body["stage"] = stage
    return ConfigRecord(body)  # type: ignore[arg-type]


def stage_of(rd: RecordDict) -> Stage:
    """The stage a server message asks for (``"advertise"``, ``"share"``, ...)."""
    stage = _record(rd).get("stage")
    if stage not in get_args(Stage):
        raise SecAggSerdeError(f"secagg stage {stage!r} is not one of {list(get_args(Stage))}")
    return stage  # type: ignore[return-value]


def round_of(rd: RecordDict) -> int:
    """The SecAgg round id a server message is for."""
    return _int(_record(rd), "round_id", 0, 2**63 - 1)


# --- stage 0: params (server -> client) and advertised keys (client -> server) ---------


def params_to_record(
    params: SecAggParams, *, index: int, clip_delta: float = 0.0, weighted: bool = True
) -> ConfigRecord:
    """The ``advertise`` stage's settings for the client with SecAgg index ``index``.

    Args:
        params: the round's shared parameters.
        index: this client's index in [1, n].
        clip_delta: L2 bound the client applies to its own update delta before masking
            (user-level DP's C, or robust ``norm_bound``); 0 for none.
        weighted: False sends weight 1 instead of n_k (user-level DP).
    """
    return _make(
        "advertise",
        {
            "index": int(index),
            "num_clients": params.num_clients,
            "max_dropouts": params.max_dropouts,
            "vector_length": params.vector_length,
            "round_id": params.round_id,
            "frac_bits": params.frac_bits,
            "clip": float(params.clip),
            "clip_delta": float(clip_delta),
            "weighted": bool(weighted),
        },
    )


def params_from_record(rd: RecordDict) -> tuple[SecAggParams, int, float, bool]:
    """Decode :func:`params_to_record`: ``(params, index, clip_delta, weighted)``."""
    rec = _record(rd)
    n = _int(rec, "num_clients", 2, MAX_CLIENTS)
    clip, clip_delta, weighted = rec.get("clip"), rec.get("clip_delta"), rec.get("weighted")
    for key, val in (("clip", clip), ("clip_delta", clip_delta)):
        if not isinstance(val, float) or not math.isfinite(val) or val < 0:
            raise SecAggSerdeError(f"secagg field {key!r} = {val!r} is not a finite float >= 0")
    if not isinstance(weighted, bool):
        raise SecAggSerdeError(f"secagg field 'weighted' = {weighted!r} is not a bool")
    try:
        params = SecAggParams(
            num_clients=n,
            max_dropouts=_int(rec, "max_dropouts", 0, n),
            vector_length=_int(rec, "vector_length", 1, 2**62),
            round_id=_int(rec, "round_id", 0, 2**63 - 1),
            frac_bits=_int(rec, "frac_bits", 0, 62),
            clip=float(clip),  # type: ignore[arg-type]
        )
    except ValueError as exc:
        raise SecAggSerdeError(f"secagg params rejected: {exc}") from exc
    return params, _int(rec, "index", 1, n), float(clip_delta), weighted  # type: ignore[arg-type]


def advertise_to_record(m: AdvertiseKeys) -> ConfigRecord:
    """Encode a client's two public keys."""
    out: dict[str, object] = {
        "index": m.index,
        "enc_public": m.enc_public,
        "mask_public": m.mask_public,
    }
    _put_mapping(out, "recv_public", m.recv_publics)
    return _make(None, out)


def advertise_from_record(rd: RecordDict, *, num_clients: int) -> AdvertiseKeys:
    """Decode :func:`advertise_to_record` (32-byte keys, index in [1, num_clients])."""
    rec = _record(rd)
    return AdvertiseKeys(
        index=_int(rec, "index", 1, num_clients),
        enc_public=_bytes(rec, "enc_public", size=_KEY_BYTES),
        mask_public=_bytes(rec, "mask_public", size=_KEY_BYTES),
        recv_publics=_mapping(rec, "recv_public", hi=num_clients, size=_KEY_BYTES),
    )


# --- stage 1: key directory (server -> client) and shares (client -> server) -----------


def directory_to_record(d: KeyDirectory, *, round_id: int) -> ConfigRecord:
    """Encode the directory U1 as parallel lists."""
    return _make(
        "share",
        {
            "round_id": round_id,
            "ids": [k.index for k in d.keys],
            "enc_public": [k.enc_public for k in d.keys],
            "mask_public": [k.mask_public for k in d.keys],
            "recv_counts": [len(k.recv_publics) for k in d.keys],
            "recv_ids": [v for k in d.keys for v in sorted(k.recv_publics)],
            "recv_public": [k.recv_publics[v] for k in d.keys for v in sorted(k.recv_publics)],
        },
    )


def directory_from_record(rd: RecordDict, *, num_clients: int) -> KeyDirectory:
    """Decode :func:`directory_to_record`."""
    rec = _record(rd)
    ids = _ints(rec, "ids", hi=num_clients)
    enc = _blobs(rec, "enc_public", len(ids), size=_KEY_BYTES)
    mask = _blobs(rec, "mask_public", len(ids), size=_KEY_BYTES)
    recv = _nested(rec, "recv", len(ids), hi=num_clients, size=_KEY_BYTES)
    return KeyDirectory(
        keys=tuple(
            AdvertiseKeys(i, e, m, r) for i, e, m, r in zip(ids, enc, mask, recv, strict=True)
        )
    )


def share_keys_to_record(m: ShareKeys) -> ConfigRecord:
    """Encode a client's encrypted shares and seed commitment."""
    out: dict[str, object] = {
        "index": m.index,
        "seed_commitment": m.seed_commitment,
        "key_commitments": list(m.key_commitments),
        "seed_commitments": list(m.seed_commitments),
    }
    _put_mapping(out, "ciphertexts", m.ciphertexts)
    return _make(None, out)


def share_keys_from_record(rd: RecordDict, *, num_clients: int) -> ShareKeys:
    """Decode :func:`share_keys_to_record`."""
    rec = _record(rd)
    return ShareKeys(
        index=_int(rec, "index", 1, num_clients),
        seed_commitment=_bytes(rec, "seed_commitment", size=_HASH_BYTES),
        ciphertexts=_mapping(rec, "ciphertexts", hi=num_clients),
        key_commitments=tuple(_elements(rec, "key_commitments", max_count=num_clients)),
        seed_commitments=tuple(_elements(rec, "seed_commitments", max_count=num_clients)),
    )


# --- stage 1b: routed shares and commitments (server -> client) -------------------------


def routed_to_record(m: RoutedShares, *, round_id: int) -> ConfigRecord:
    """Encode the ciphertexts addressed to one client and every sender's commitments."""
    out: dict[str, object] = {"round_id": round_id}
    _put_mapping(out, "ciphertexts", m.ciphertexts)
    senders = sorted(m.commitments)
    counts = {len(c) for pair in m.commitments.values() for c in pair}
    out["commit_ids"] = senders
    out["commit_count"] = counts.pop() if len(counts) == 1 else 0
    out["key_commitments"] = [e for u in senders for e in m.commitments[u][0]]
    out["seed_commitments"] = [e for u in senders for e in m.commitments[u][1]]
    return _make("verify", out)


def routed_from_record(rd: RecordDict, *, num_clients: int) -> RoutedShares:
    """Decode :func:`routed_to_record` (every sender's commitments, t of each kind)."""
    rec = _record(rd)
    senders = _ints(rec, "commit_ids", hi=num_clients)
    count = _int(rec, "commit_count", 1, num_clients)
    keys = _blobs(rec, "key_commitments", len(senders) * count, size=_ELEMENT_BYTES)
    seeds = _blobs(rec, "seed_commitments", len(senders) * count, size=_ELEMENT_BYTES)
    return RoutedShares(
        ciphertexts=_mapping(rec, "ciphertexts", hi=num_clients),
        commitments={
            u: (
                tuple(keys[k * count : (k + 1) * count]),
                tuple(seeds[k * count : (k + 1) * count]),
            )
            for k, u in enumerate(senders)
        },
    )


# --- stage 2: share check (client -> server) and the qualified set (server -> client) ---


def check_to_record(m: ShareCheck) -> ConfigRecord:
    """Encode a client's complaints (dealer -> revealed 32-byte receiving key)."""
    out: dict[str, object] = {"index": m.index}
    _put_mapping(out, "complaints", m.complaints)
    return _make(None, out)


def check_from_record(rd: RecordDict, *, num_clients: int) -> ShareCheck:
    """Decode :func:`check_to_record`."""
    rec = _record(rd)
    return ShareCheck(
        index=_int(rec, "index", 1, num_clients),
        complaints=_mapping(rec, "complaints", hi=num_clients, size=_KEY_BYTES),
    )


def mask_request_to_record(m: MaskRequest, *, round_id: int) -> ConfigRecord:
    """Encode U2', the clients that mask with each other."""
    return _make("masked", {"round_id": round_id, "qualified": list(m.qualified)})


def mask_request_from_record(rd: RecordDict, *, num_clients: int) -> MaskRequest:
    """Decode :func:`mask_request_to_record`."""
    return MaskRequest(qualified=tuple(_ints(_record(rd), "qualified", hi=num_clients)))


def masked_to_record(m: MaskedInput) -> ConfigRecord:
    """Encode a masked vector (8 * D little-endian bytes)."""
    return _make(None, {"index": m.index, "masked": m.masked})


def masked_from_record(rd: RecordDict, *, num_clients: int, vector_length: int) -> MaskedInput:
    """Decode :func:`masked_to_record`; the byte length must be exactly 8 * D."""
    rec = _record(rd)
    return MaskedInput(
        index=_int(rec, "index", 1, num_clients),
        masked=_bytes(rec, "masked", size=8 * vector_length),
    )


# --- stage 3: masked input (client -> server) ------------------------------------------


# --- stage 4: unmask request (server -> client) and shares (client -> server) ----------


def request_to_record(m: UnmaskRequest, *, round_id: int) -> ConfigRecord:
    """Encode U3, the clients whose masked input arrived."""
    return _make("unmask", {"round_id": round_id, "survivors": list(m.survivors)})


def request_from_record(rd: RecordDict, *, num_clients: int) -> UnmaskRequest:
    """Decode :func:`request_to_record`."""
    return UnmaskRequest(survivors=tuple(_ints(_record(rd), "survivors", hi=num_clients)))


def unmask_to_record(m: UnmaskShares) -> ConfigRecord:
    """Encode a client's seed shares (of survivors) and key shares (of dropped clients)."""
    out: dict[str, object] = {"index": m.index}
    _put_mapping(out, "seed_shares", m.seed_shares)
    _put_mapping(out, "key_shares", m.key_shares)
    return _make(None, out)


def unmask_from_record(rd: RecordDict, *, num_clients: int) -> UnmaskShares:
    """Decode :func:`unmask_to_record` (each share exactly ``shamir.SHARE_BYTES`` bytes)."""
    rec = _record(rd)
    return UnmaskShares(
        index=_int(rec, "index", 1, num_clients),
        seed_shares=_mapping(rec, "seed_shares", hi=num_clients, size=shamir.SHARE_BYTES),
        key_shares=_mapping(rec, "key_shares", hi=num_clients, size=shamir.SHARE_BYTES),
    )


# --- one client's state between stages (stays on the node) ------------------------------


def client_state_to_record(client: SecAggClient, *, vector: np.ndarray) -> ConfigRecord:
    """Everything one :class:`SecAggClient` needs for its next stage, plus its vector.

    Args:
        client: the client after any of its steps (its ``export_state()`` is stored).
        vector: float64 (D,), the weighted vector it will mask (see
            :func:`fedft.secagg.encoding.encode_update`).
    """
    st = client.export_state()
    p, held, directory = st.params, st.held, st.directory
    out: dict[str, object] = {
        "index": st.index,
        "num_clients": p.num_clients,
        "max_dropouts": p.max_dropouts,
        "vector_length": p.vector_length,
        "round_id": p.round_id,
        "frac_bits": p.frac_bits,
        "clip": float(p.clip),
        "step": st.step,
        "enc_private": st.enc_private,
        "mask_private": st.mask_private,
        "seed": st.seed,
        "u2": list(st.u2),
        "dir_ids": sorted(directory),
        "dir_enc": [directory[i].enc_public for i in sorted(directory)],
        "dir_mask": [directory[i].mask_public for i in sorted(directory)],
        "held_ids": sorted(held),
        "held_key": [shamir.encode_share(held[i][0]) for i in sorted(held)],
        "held_seed": [shamir.encode_share(held[i][1]) for i in sorted(held)],
        "recv_private_ids": sorted(st.recv_private),
        "recv_private": [st.recv_private[i] for i in sorted(st.recv_private)],
        "vector": np.asarray(vector, dtype="<f8").tobytes(),
    }
    return _make(None, out)


def client_state_from_record(rec: ConfigRecord) -> tuple[SecAggClient, np.ndarray]:
    """Rebuild the client saved by :func:`client_state_to_record`: ``(client, vector)``."""
    rd = RecordDict({RECORD: rec})
    rec = _record(rd)
    n = _int(rec, "num_clients", 2, MAX_CLIENTS)
    params = SecAggParams(
        num_clients=n,
        max_dropouts=_int(rec, "max_dropouts", 0, n),
        vector_length=_int(rec, "vector_length", 1, 2**62),
        round_id=_int(rec, "round_id", 0, 2**63 - 1),
        frac_bits=_int(rec, "frac_bits", 0, 62),
        clip=float(rec["clip"]),  # type: ignore[arg-type]
    )
    ids = _ints(rec, "dir_ids", hi=n)
    enc = _blobs(rec, "dir_enc", len(ids), size=_KEY_BYTES)
    mask = _blobs(rec, "dir_mask", len(ids), size=_KEY_BYTES)
    held_ids = _ints(rec, "held_ids", hi=n)
    keys = _blobs(rec, "held_key", len(held_ids), size=shamir.SHARE_BYTES)
    seeds = _blobs(rec, "held_seed", len(held_ids), size=shamir.SHARE_BYTES)
    client = SecAggClient.from_state(
        SecAggClientState(
            index=_int(rec, "index", 1, n),
            params=params,
            step=_int(rec, "step", 0, 5),
            enc_private=_bytes(rec, "enc_private", size=32),
            mask_private=_bytes(rec, "mask_private", size=32),
            seed=_bytes(rec, "seed", size=shamir.SECRET_BYTES),
            u2=tuple(_ints(rec, "u2", hi=n)),
            directory={i: AdvertiseKeys(i, e, m) for i, e, m in zip(ids, enc, mask, strict=True)},
            held={
                i: (shamir.decode_share(k), shamir.decode_share(s))
                for i, k, s in zip(held_ids, keys, seeds, strict=True)
            },
            recv_private=_mapping(rec, "recv_private", hi=n, size=32),
        )
    )
    raw = _bytes(rec, "vector", size=8 * params.vector_length)
    vector = np.frombuffer(raw, dtype="<f8").astype(np.float64)
    return client, vector
