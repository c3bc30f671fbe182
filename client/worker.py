"""A deployed client's resident worker: the base model and the data stay loaded across rounds.

``fedft client`` starts it (``python -m client.worker --socket PATH [--warm FILE]``) beside
its SuperNode and owns it (started again if it dies, stopped with the client). It listens on
a Unix socket (mode 0600, in a folder only this user can enter; a peer of another user is
refused), serves one message at a time handed over by the per-message ClientApp
(``client/worker_link.py``; wire format ``fedft.transport.worker_wire``) with the same
handlers a simulation runs (:func:`client.handlers.handle`), and keeps the process-wide
model and data caches warm. ``--warm`` names a JSON file (``{"run_config": ...,
"node_config": ...}``, written by ``fedft client`` from its own config) whose model and data
are loaded before the first message arrives.

The privacy ledger is still the client's file named in the node config (read and written
ahead of every DP round by the handler here); nothing leaves this machine but the reply.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from flwr.app import Context, RecordDict

from client.handlers import handle
from client.local_round import client_index, load
from fedft.transport import worker_wire as wire
from fedft.transport.flower_config import read_run_config

logger = logging.getLogger("fedft.worker")

ROOT = Path(__file__).resolve().parent.parent


def listen(path: Path) -> socket.socket:
    """A Unix socket at ``path`` (a stale one replaced), mode 0600, listening."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(8)
    return sock


def peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's user id (Linux ``SO_PEERCRED``; None elsewhere)."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, option, 12))
    return int(uid)


def warm(path: Path) -> None:
    """Load the model and data the file's config names (best effort: a failure is logged,
    the worker still serves, and the first round loads what the server's config needs)."""
    t0 = time.perf_counter()
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        run_config, node_config = dict(spec["run_config"]), dict(spec["node_config"])
        context = Context(
            run_id=0, node_id=0, node_config=node_config, state=RecordDict(), run_config=run_config
        )
        idx = client_index(context)
        load(read_run_config(run_config), idx, context)
    except Exception:  # noqa: BLE001 - warming is an optimisation, never a failure
        logger.exception("could not load the model and data ahead of the first round")
        return
    logger.info("model and data of client %d loaded in %.1f s", idx, time.perf_counter() - t0)


class Worker:
    """Serves messages one at a time; the code digests of bundles already checked."""

    def __init__(self, *, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._digests: dict[tuple[str, ...], str] = {}

    def _digest(self, files: object) -> str:
        if not isinstance(files, list) or not files or len(files) > 10_000:
            raise wire.WireError("the request names no source files")
        key = tuple(files)
        if key not in self._digests:
            self._digests[key] = wire.code_digest(ROOT, key)
        return self._digests[key]

    def answer(self, header: dict[str, object], blobs: list[bytes]) -> tuple[dict, list[bytes]]:
        """The reply frame (header, blobs) to one request frame."""
        kind = header.get("kind")
        if kind not in wire.KINDS or len(blobs) != 2:
            return {"ok": False, "error": f"not a request: kind {kind!r}, {len(blobs)} blobs"}, []
        if self._digest(header.get("files")) != header.get("code"):
            error = "the worker runs another code version than the run's app bundle"
            return {"ok": False, "code_mismatch": True, "error": error}, []
        context = wire.decode_context(blobs[0])
        content = wire.decode_content(blobs[1])
        try:
            reply = handle(str(kind), content, context)
        except Exception as exc:  # noqa: BLE001 - the ClientApp reports it to the server
            logger.exception("the %s message failed", kind)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, []
        return {"ok": True}, [wire.encode_content(reply), wire.encode_context(context)]

    def serve_one(self, conn: socket.socket) -> None:
        """Read one request from ``conn``, answer it (a malformed one is refused)."""
        uid = peer_uid(conn)
        if uid is not None and uid != os.getuid():
            logger.warning("refused a connection from user id %d", uid)
            return
        t0 = time.perf_counter()
        try:
            header, blobs = wire.read_frame(conn, max_bytes=self.max_bytes)
            reply, out = self.answer(header, blobs)
            if reply.get("ok"):
                logger.info(
                    "%s message answered in %.1f s", header["kind"], time.perf_counter() - t0
                )
        except wire.WireError as exc:
            logger.warning("refused a malformed request: %s", exc)
            reply, out = {"ok": False, "error": str(exc)}, []
        try:
            wire.write_frame(conn, reply, out)
        except OSError as exc:  # the ClientApp went away (its process was stopped)
            logger.warning("could not send the reply: %s", exc)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the worker until SIGTERM/SIGINT (or its parent's death)."""
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__)
    parser.add_argument("--socket", required=True, help="path of the Unix socket to serve")
    parser.add_argument("--warm", help="JSON file: the config whose model and data to preload")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, _stop)
    path = Path(args.socket)
    server = listen(path)
    if args.warm:
        warm(Path(args.warm))
    logger.info("serving on %s (pid %d)", path, os.getpid())
    worker = Worker()
    try:
        while True:
            conn, _ = server.accept()
            with conn:
                worker.serve_one(conn)
    finally:
        server.close()
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
