"""Run the split-training service for a run's model: in a background thread, or standalone.

:class:`SplitServerThread` serves a :class:`~server.split_service.SplitService` on its own
asyncio event loop in a background thread (what ``fedft simulate`` starts on loopback for a
split run and stops afterwards). :func:`serve_forever` is the ``fedft split-server`` recipe:
parse config -> load the model -> cut it -> serve the body until stopped.

:func:`mtls_server_credentials` / :func:`server_credentials_from_dir` build mutual-TLS
credentials from ``fedft certs`` files (``ca.crt``, ``server.crt``, ``server.key``): the
server then admits only clients whose certificate the deployment CA signed, and binds each
session to the certificate's identity (see :mod:`server.split_service`).

The server loads its own copy of the base model (its body is the shared frozen middle;
clients never send weights), on the CPU.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import grpc

from fedft import builders
from fedft.certs import read_pem
from fedft.config import RunConfig, load_config
from fedft.models import load_base_model
from fedft.training.runtime import get_data
from fedft.transport.split_wire import Limits
from server.split_service import RunningServer, SplitService, build_service, start_server

logger = logging.getLogger(__name__)


def split_limits(cfg: RunConfig) -> Limits:
    """The server's limits for ``cfg``: the run's own batch, sequence (+ prompt) and
    in-flight bounds, not generic maxima (a client asking for 0 gets these, and a client
    asking for more gets these too: one session's activations stay what the run needs)."""
    return Limits(
        max_batch=cfg.federation.batch_size,
        max_seq_len=cfg.data.max_length + cfg.adapter.prompt_tokens,
        max_in_flight=cfg.split.micro_batches_in_flight,
    )


def mtls_server_credentials(
    *, ca_cert: str | Path, cert: str | Path, key: str | Path
) -> grpc.ServerCredentials:
    """Server credentials for mutual TLS: clients must present a certificate signed by the CA.

    Args:
        ca_cert: PEM certificate of the deployment CA (verifies client certificates).
        cert: PEM server certificate (its SANs must cover the address clients dial).
        key: PEM private key of ``cert``.

    Returns:
        ``grpc.ssl_server_credentials(..., require_client_auth=True)``; a client without a
        certificate, or with one from another CA, fails the handshake (UNAVAILABLE for it).
    """
    return grpc.ssl_server_credentials(
        [(read_pem(Path(key), "server TLS key"), read_pem(Path(cert), "server certificate"))],
        root_certificates=read_pem(Path(ca_cert), "CA certificate"),
        require_client_auth=True,
    )


def server_credentials_from_dir(certs: str | Path) -> grpc.ServerCredentials:
    """:func:`mtls_server_credentials` from ``certs/ca.crt``, ``server.crt``, ``server.key``."""
    d = Path(certs)
    return mtls_server_credentials(
        ca_cert=d / "ca.crt", cert=d / "server.crt", key=d / "server.key"
    )


def build_split_service(
    cfg: RunConfig,
    *,
    session_timeout_s: float = 60.0,
    require_client_identity: bool = False,
    admission_file: Path | None = None,
) -> SplitService:
    """Load ``cfg``'s base model and serve the body between its client front and back.

    The model id clients must name is ``cfg.model.name``. ``require_client_identity``: refuse
    sessions from peers without a verified client certificate (set it under mutual TLS).
    ``admission_file``: admit only the identities the round wrote there (see
    :func:`server.split_service.write_admission`; needs mutual TLS).
    """
    if cfg.adapter.method != "split":
        raise ValueError(
            f"adapter.method = {cfg.adapter.method!r}: a split server needs method = 'split'"
        )
    num_labels = get_data(**builders.data_kwargs(cfg)).num_labels
    model, _ = load_base_model(
        cfg.model.name, task=cfg.model.task, num_labels=num_labels, seed=cfg.seed
    )
    return build_service(
        model,
        model_id=cfg.model.name,
        front_layers=cfg.split.front_layers,
        back_layers=cfg.split.back_layers,
        limits=split_limits(cfg),
        session_timeout_s=session_timeout_s,
        require_client_identity=require_client_identity,
        admission_file=admission_file,
    )


class SplitServerThread:
    """A split server on its own event loop in a background thread.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.

    Args:
        service: what to serve.
        address: ``host:port`` to bind (port 0 = any free port).
        server_credentials: TLS / mTLS credentials (plaintext when None).
        interceptors: grpc.aio server interceptors (auditing, auth).
        start_timeout_s: how long :meth:`start` waits for the port to be bound.
    """

    def __init__(
        self,
        service: SplitService,
        *,
        address: str = "127.0.0.1:0",
        server_credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        start_timeout_s: float = 30.0,
    ) -> None:
        self.service = service
        self._bind = address
        self._credentials = server_credentials
        self._interceptors = tuple(interceptors)
        self._timeout = start_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._running: RunningServer | None = None
        self._grace: float | None = 1.0
        self._thread = threading.Thread(target=self._main, name="fedft-split-server", daemon=True)

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (the bound port, never 0)."""
        if self._running is None:
            raise RuntimeError("the split server is not running; call start() first")
        host = self._bind.rsplit(":", 1)[0]
        return f"{host}:{self._running.port}"

    @property
    def port(self) -> int:
        """The bound port."""
        if self._running is None:
            raise RuntimeError("the split server is not running; call start() first")
        return self._running.port

    def is_alive(self) -> bool:
        """Whether the server thread is still running."""
        return self._thread.is_alive()

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for the server thread to end (at most ``timeout_s`` seconds)."""
        self._thread.join(timeout_s)

    def start(self) -> SplitServerThread:
        """Start the thread and wait until the port is bound; raises what the start raised."""
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise TimeoutError(f"the split server did not start within {self._timeout} s")
        if self._error is not None:
            self._thread.join()
            raise RuntimeError(f"the split server failed to start: {self._error}") from (
                self._error
            )
        logger.info("split server thread serving on %s", self.address)
        return self

    def stop(self, grace_s: float | None = 1.0) -> None:
        """Stop serving, close the port and join the thread (idempotent)."""
        loop, stopped = self._loop, self._stopped
        if loop is not None and stopped is not None and self._thread.is_alive():
            self._grace = grace_s
            loop.call_soon_threadsafe(stopped.set)
        if self._thread.is_alive():
            self._thread.join()  # the running server's stop ended the body's worker thread

    def __enter__(self) -> SplitServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to start() or logged
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                logger.exception("the split server thread failed")

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._running = await start_server(
            self.service,
            address=self._bind,
            server_credentials=self._credentials,
            interceptors=self._interceptors,
        )
        if self._running.port == 0:
            await self._running.stop(None)
            raise OSError(f"could not bind the split server to {self._bind!r}")
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            await self._running.stop(self._grace)
            logger.info("split server on %s stopped", self._bind)


def serve_forever(
    config: str | Path | RunConfig,
    *,
    address: str,
    overrides: Sequence[str] = (),
    server_credentials: grpc.ServerCredentials | None = None,
    session_timeout_s: float = 60.0,
    stop: threading.Event | None = None,
    require_client_identity: bool | None = None,
) -> None:
    """``fedft split-server``: serve the body of ``config``'s model on ``address``.

    Args:
        config: a TOML path (``overrides`` applied) or a built :class:`RunConfig`.
        address: ``host:port`` to bind, e.g. ``"0.0.0.0:9092"``.
        overrides: ``section.key=value`` overrides for a path.
        server_credentials: TLS / mTLS credentials (plaintext when None), e.g.
            :func:`server_credentials_from_dir`.
        session_timeout_s: idle sessions (killed clients) are freed after this.
        stop: returns after this event is set (None: until interrupted).
        require_client_identity: refuse sessions without a verified client certificate;
            None = whenever ``server_credentials`` is given (pass False to serve plain
            server-authenticated TLS).
    """
    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides)
    if require_client_identity is None:
        require_client_identity = server_credentials is not None
    service = build_split_service(
        cfg, session_timeout_s=session_timeout_s, require_client_identity=require_client_identity
    )
    server = SplitServerThread(service, address=address, server_credentials=server_credentials)
    with server:
        logger.info(
            "split server for %s (front %d, back %d blocks) on %s",
            cfg.model.name,
            cfg.split.front_layers,
            cfg.split.back_layers,
            server.address,
        )
        try:
            while server.is_alive():
                if stop is None:
                    server.join(0.5)
                elif stop.wait(0.5):
                    break
        except KeyboardInterrupt:
            logger.info("interrupted: stopping the split server")
