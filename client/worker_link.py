"""The per-message ClientApp's side of the hand-over to the client's resident worker.

:func:`ask_worker` sends one message (kind, the node's context, the content) over the
worker's Unix socket and returns the reply content and the context after the handler.
When the worker is not there (``fedft client`` is starting it again after a crash) it waits
for it; when the worker dies during the message it tries once more with the restarted
worker, and then refuses the message with :class:`WorkerUnavailable`, which Flower turns
into an error reply to the server (the round goes on without this client). Imports
neither torch nor transformers.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from pathlib import Path

from flwr.app import Context, RecordDict

from fedft.transport import worker_wire as wire

logger = logging.getLogger(__name__)

#: how long a message waits for a (re)starting worker to accept it.
CONNECT_WAIT_S = 180.0
#: tries of one message: the first, and one more after a worker crash.
TRIES = 2
#: the project root of this code (the run's app bundle, when Flower runs it).
ROOT = Path(__file__).resolve().parent.parent


class WorkerUnavailable(RuntimeError):
    """The worker did not answer this message (gone, or crashed on it twice)."""


class CodeMismatch(RuntimeError):
    """The worker runs another code version than this app bundle."""


_FILES: list[str] | None = None
_DIGEST = ""


def bundle_code() -> tuple[str, list[str]]:
    """(digest, files) of this code's sources (computed once per process)."""
    global _FILES, _DIGEST
    if _FILES is None:
        _FILES = wire.source_files(ROOT)
        _DIGEST = wire.code_digest(ROOT, _FILES)
    return _DIGEST, _FILES


def _connect(path: str, wait_s: float) -> socket.socket:
    """A connection to the worker's socket, waiting up to ``wait_s`` for it to listen."""
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.ENOENT, errno.ECONNREFUSED):
                raise WorkerUnavailable(f"cannot reach the worker at {path}: {exc}") from None
            if time.monotonic() >= deadline:
                raise WorkerUnavailable(
                    f"the worker at {path} did not listen within {wait_s:.0f} s"
                ) from None
            time.sleep(0.2)


def _exchange(path: str, kind: str, request: list[bytes], wait_s: float) -> list[bytes]:
    digest, files = bundle_code()
    with _connect(path, wait_s) as sock:
        wire.write_frame(sock, {"kind": kind, "code": digest, "files": files}, request)
        header, blobs = wire.read_frame(sock)
    if header.get("ok") is True and len(blobs) == 2:
        return blobs
    if header.get("code_mismatch"):
        raise CodeMismatch(str(header.get("error", "")))
    raise RuntimeError(f"the worker refused the {kind} message: {header.get('error', '?')}")


def ask_worker(
    path: str, kind: str, context: Context, content: RecordDict, *, wait_s: float = CONNECT_WAIT_S
) -> RecordDict:
    """Have the worker at ``path`` handle one message; the reply content.

    ``context.state`` is replaced by the state after the handler (what the SuperNode keeps).

    Raises:
        WorkerUnavailable: no worker within ``wait_s``, or it died on this message twice.
        CodeMismatch: the worker runs another code version (the caller runs it itself).
        RuntimeError: the handler failed in the worker (its message).
    """
    request = [wire.encode_context(context), wire.encode_content(content)]
    for attempt in range(1, TRIES + 1):
        try:
            blobs = _exchange(path, kind, request, wait_s)
        except (wire.WireError, ConnectionError) as exc:
            if attempt == TRIES:
                raise WorkerUnavailable(
                    f"the worker died during this {kind} message {TRIES} times ({exc}); refusing it"
                ) from None
            logger.warning("the worker died during the %s message (%s); trying again", kind, exc)
            continue
        context.state = wire.decode_context(blobs[1]).state
        return wire.decode_content(blobs[0])
    raise AssertionError("unreachable")
