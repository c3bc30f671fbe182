"""The wire between a deployed client's per-message ClientApp and its resident worker.

A Flower SuperNode starts a fresh ``flwr-clientapp`` process for every message. ``fedft
client`` also starts one long-lived worker (``client/worker.py``) that keeps the base model
and the client's encoded data in memory; the per-message ClientApp hands each message to it
over a Unix socket in the client's private folder and relays the reply. This module is that
hand-over, and imports neither torch nor transformers (the ClientApp process must start
fast).

One exchange per connection:

- request: header ``{"kind": "train" | "train.secagg" | "query", "code": <digest>, "files": [...]}``
  (the digest of the bundle's sources and their paths, :func:`code_digest`) and two
  blobs, the Flower ``Context`` (node config, the node's state, the run config) and the
  message's ``RecordDict``, both in Flower's own protobuf form;
- reply: header ``{"ok": true}`` with the reply's ``RecordDict`` and the ``Context`` after
  the handler (its state is what the SuperNode keeps for the next message), or
  ``{"ok": false, "error": ..., "code_mismatch": bool}`` and no blobs.

A frame is ``b"FFW1"``, the header's length (u32, at most :data:`MAX_HEADER`), the header
(JSON, with ``"sizes"``: the blobs' lengths), then the blobs. Every length is checked
against its limit before anything is allocated; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    recorddict_from_proto,
    recorddict_to_proto,
)
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

__all__ = [
    "DEFAULT_MAX_BYTES",
    "KINDS",
    "MAX_HEADER",
    "WORKER_KEY",
    "WireError",
    "code_digest",
    "source_files",
    "decode_context",
    "decode_content",
    "encode_context",
    "encode_content",
    "read_frame",
    "write_frame",
]

#: node config: the Unix socket of this client's resident worker (``fedft client``).
WORKER_KEY = "worker-socket"
#: the message kinds the worker serves (Flower's ``message_type``).
KINDS = ("query", "train", "train.secagg")
MAGIC = b"FFW1"
#: largest header (JSON) accepted.
MAX_HEADER = 64 * 1024
#: largest total of a frame's blobs accepted by default (2 GiB).
DEFAULT_MAX_BYTES = 2 * 1024**3
#: at most this many blobs in a frame.
MAX_BLOBS = 4
#: what the code digest covers (the app bundle's ``fab-include`` in pyproject.toml).
CODE_PACKAGES = ("fedft", "server", "client")


class WireError(RuntimeError):
    """A malformed, oversized or truncated frame (or the peer went away mid-frame)."""


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Exactly ``n`` bytes (``n`` already checked against its limit)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise WireError(f"the peer closed the connection after {got} of {n} bytes")
        got += k
    return buf


def write_frame(sock: socket.socket, header: dict[str, Any], blobs: Sequence[bytes] = ()) -> None:
    """Send one frame: ``header`` (JSON) with the blobs' sizes, then the blobs."""
    head = json.dumps({**header, "sizes": [len(b) for b in blobs]}).encode()
    if len(head) > MAX_HEADER:
        raise WireError(f"header of {len(head)} bytes is over {MAX_HEADER}")
    sock.sendall(MAGIC + struct.pack(">I", len(head)) + head)
    for blob in blobs:
        if blob:  # an empty send after the peer has read the frame and closed raises EPIPE
            sock.sendall(blob)


def read_frame(
    sock: socket.socket, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> tuple[dict[str, Any], list[bytes]]:
    """Receive one frame: (header, blobs). Sizes are checked before any allocation.

    Raises:
        WireError: bad magic, a header over :data:`MAX_HEADER` or not a JSON object, blob
            sizes that are not a list of at most :data:`MAX_BLOBS` non-negative integers
            summing to at most ``max_bytes``, or a connection closed mid-frame.
    """
    start = _recv_exact(sock, len(MAGIC) + 4)
    if bytes(start[:4]) != MAGIC:
        raise WireError("not a fedft worker frame (bad magic)")
    (head_len,) = struct.unpack(">I", bytes(start[4:]))
    if head_len > MAX_HEADER:
        raise WireError(f"header of {head_len} bytes is over {MAX_HEADER}")
    try:
        header = json.loads(bytes(_recv_exact(sock, head_len)))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    sizes = header.pop("sizes", None)
    if (
        not isinstance(sizes, list)
        or len(sizes) > MAX_BLOBS
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in sizes)
    ):
        raise WireError(f"blob sizes {sizes!r}: a list of at most {MAX_BLOBS} sizes >= 0")
    if sum(sizes) > max_bytes:
        raise WireError(f"frame of {sum(sizes)} bytes is over the limit of {max_bytes}")
    return header, [bytes(_recv_exact(sock, s)) for s in sizes]


def encode_context(context: Context) -> bytes:
    """A Flower ``Context`` in Flower's protobuf form."""
    return bytes(context_to_proto(context).SerializeToString())


def decode_context(blob: bytes) -> Context:
    """The ``Context`` of :func:`encode_context` (protobuf parse; raises WireError)."""
    try:
        return context_from_proto(ProtoContext.FromString(blob))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise WireError(f"not a Flower Context: {exc}") from None


def encode_content(content: RecordDict) -> bytes:
    """A message's ``RecordDict`` in Flower's protobuf form."""
    return bytes(recorddict_to_proto(content).SerializeToString())


def decode_content(blob: bytes) -> RecordDict:
    """The ``RecordDict`` of :func:`encode_content` (protobuf parse; raises WireError)."""
    try:
        return recorddict_from_proto(ProtoRecordDict.FromString(blob))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others
        raise WireError(f"not a Flower RecordDict: {exc}") from None


_SOURCE = re.compile(r"^(?:fedft|server|client)(?:/[A-Za-z0-9_.-]+)*/[A-Za-z0-9_-]+\.py$")


def source_files(root: Path, packages: Iterable[str] = CODE_PACKAGES) -> list[str]:
    """The project's Python sources under ``root`` (paths relative to it, sorted)."""
    found = (p for pkg in packages for p in (root / pkg).rglob("*.py") if p.is_file())
    return sorted(p.relative_to(root).as_posix() for p in found)


def code_digest(root: Path, files: Sequence[str]) -> str:
    """SHA-256 over ``files`` (relative paths of the project's sources) read under ``root``.

    The ClientApp (from the run's app bundle) sends the digest of its own sources with
    their paths; the worker digests the same paths in the client's installed project and
    serves only a bundle of its own code version. A missing file digests as absent.

    Raises:
        WireError: a path that is not a relative ``fedft/``, ``server/`` or ``client/``
            source path.
    """
    digest = hashlib.sha256()
    for rel in files:
        if not isinstance(rel, str) or not _SOURCE.match(rel) or ".." in rel.split("/"):
            raise WireError(f"{rel!r} is not a project source path")
        path = root / rel
        data = path.read_bytes() if path.is_file() else b"\xff(absent)"
        name = rel.encode()
        digest.update(struct.pack(">Q", len(name)) + name + struct.pack(">Q", len(data)) + data)
    return digest.hexdigest()
