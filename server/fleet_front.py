"""The server's public address: a reverse proxy that forwards the Fleet API and nothing else.

A flwr 1.41 SuperLink serves three APIs on one HTTP port: the Fleet API (SuperNodes), the
Control API (``flwr`` CLI: register-node, start-run, stop-run, ls) and the runtime API (the
ServerApp). Its Control API accepts any caller (``NoOpControlAuthnPlugin``), so whoever
reaches that port can register a node key of their own and start a run whose app bundle
then executes on the server and on every SuperNode.

``fedft server`` therefore binds the SuperLink to 127.0.0.1 and puts this front on the
public address. It is an ordinary ASGI app served by uvicorn (TLS from Python's ``ssl``
through uvicorn, the same stack the SuperLink itself uses); it forwards ``POST`` requests
to the twelve Fleet API paths a SuperNode calls (:data:`FLEET_PATHS`) with httpx to the
SuperLink, verified against the deployment CA, and answers everything else with 404.
Node authentication is untouched: a SuperNode signs its requests (public key, timestamp
and signature headers), the front passes those headers through and the SuperLink checks
them as before.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

logger = logging.getLogger(__name__)

#: the Fleet API a SuperNode calls (flwr 1.41 ``flwr/supernode/fleet_http_client.py``).
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
#: headers that belong to one connection, never forwarded (RFC 9110 section 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
#: largest request body forwarded (bytes); the SuperLink's own gRPC cap is 2 GiB.
MAX_BODY_BYTES = 1 << 30


class BodyTooLarge(ValueError):
    """A request body over :data:`MAX_BODY_BYTES`."""


def _forward_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise BodyTooLarge(f"content-length {declared!r} over the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def fleet_front_app(
    upstream: str,
    *,
    ca_cert: Path | None,
    timeout_s: float = 120.0,
    max_body: int = MAX_BODY_BYTES,
) -> Starlette:
    """The proxy as an ASGI app.

    Args:
        upstream: base URL of the SuperLink (``https://127.0.0.1:PORT``).
        ca_cert: the CA that signed the SuperLink's certificate (None: plaintext upstream).
        timeout_s: per-request timeout towards the SuperLink.
        max_body: largest request body forwarded, in bytes.
    """
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        verify: ssl.SSLContext | bool = False
        if ca_cert is not None:
            verify = ssl.create_default_context(cafile=str(ca_cert))
        async with httpx.AsyncClient(base_url=upstream, verify=verify, timeout=timeout_s) as client:
            state["client"] = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        peer = f"{request.client.host}:{request.client.port}" if request.client else "?"
        if request.method != "POST" or path not in FLEET_PATHS:
            logger.warning("refused %s %s from %s (Fleet API only)", request.method, path, peer)
            return PlainTextResponse(
                "this address serves the Flower Fleet API only; the Control API is "
                "reachable on the server machine alone\n",
                status_code=404,
            )
        try:
            body = await _read_body(request, max_body)
        except BodyTooLarge as exc:
            logger.warning("refused %s from %s: %s", path, peer, exc)
            return PlainTextResponse(f"{exc}\n", status_code=413)
        except ClientDisconnect:
            return PlainTextResponse("client disconnected\n", status_code=400)
        try:
            reply = await state["client"].post(
                path, content=body, headers=_forward_headers(request.headers)
            )
        except httpx.HTTPError as exc:
            logger.warning("SuperLink unreachable for %s from %s: %s", path, peer, exc)
            return PlainTextResponse("SuperLink unavailable\n", status_code=503)
        return Response(
            content=reply.content,
            status_code=reply.status_code,
            headers=_forward_headers(reply.headers),
        )

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST", "PUT", "DELETE"])],
        lifespan=lifespan,
    )


@dataclass(frozen=True, kw_only=True)
class FrontTls:
    """The public address's TLS files (the SuperLink's own certificate and key)."""

    cert: Path
    key: Path
    ca_cert: Path


class FleetFront:
    """The proxy served by uvicorn in a background thread of this process."""

    def __init__(self, *, host: str, port: int, upstream_port: int, tls: FrontTls | None) -> None:
        scheme = "http" if tls is None else "https"
        app = fleet_front_app(
            f"{scheme}://127.0.0.1:{upstream_port}",
            ca_cert=None if tls is None else tls.ca_cert,
        )
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=None if tls is None else str(tls.cert),
            ssl_keyfile=None if tls is None else str(tls.key),
            log_config=None,
            access_log=False,
            lifespan="on",
        )
        self.host, self.port, self.tls = host, port, tls
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fleet-front", daemon=True)

    def start(self, *, timeout_s: float = 30.0) -> FleetFront:
        """Start serving; return once the socket listens (raise if it cannot)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Fleet front could not listen on {self.host}:{self.port} "
                    "(port in use, or TLS files unreadable?)"
                )
            time.sleep(0.05)
        logger.info(
            "Fleet API on %s:%d (%s); Control and runtime APIs on 127.0.0.1 only",
            self.host,
            self.port,
            "TLS" if self.tls is not None else "plaintext",
        )
        return self

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout=10.0)
