"""The Fleet front (server/fleet_front.py) on loopback: a real uvicorn upstream standing in
for the SuperLink, the front in front of it, both with TLS from `fedft certs` files.

The front must forward the Fleet API byte for byte (body, node-auth headers, status) and
refuse every other path (Control API, runtime API, docs) and oversized bodies, without the
upstream ever seeing those requests.
"""

from __future__ import annotations

import ssl
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fedft.certs import write_deployment_certs
from server.deploy import free_port
from server.fleet_front import FleetFront, FrontTls, fleet_front_app


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    certs = write_deployment_certs(tmp_path_factory.mktemp("pki") / "certs", clients=1)
    seen: list[tuple[str, bytes, dict[str, str]]] = []

    async def upstream(request: Request) -> Response:
        body = await request.body()
        seen.append((request.url.path, body, dict(request.headers)))
        return Response(b"reply:" + body, status_code=200, headers={"x-up": "1"})

    app = Starlette(routes=[Route("/{p:path}", upstream, methods=["GET", "POST"])])
    up_port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=up_port,
            ssl_certfile=str(certs.server_cert),
            ssl_keyfile=str(certs.server_key),
            log_config=None,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    tls = FrontTls(cert=certs.server_cert, key=certs.server_key, ca_cert=certs.ca_cert)
    front = FleetFront(host="127.0.0.1", port=free_port(), upstream_port=up_port, tls=tls)
    front.start()
    client = httpx.Client(
        base_url=f"https://127.0.0.1:{front.port}",
        verify=ssl.create_default_context(cafile=str(certs.ca_cert)),
    )
    try:
        yield client, seen
    finally:
        client.close()
        front.stop()
        server.should_exit = True
        thread.join(timeout=10)


def test_fleet_calls_are_forwarded_with_their_auth_headers(setup):
    client, seen = setup
    seen.clear()
    headers = {"flwr-public-key-bin": "cHVi", "flwr-signature-bin": "c2ln", "x-other": "y"}
    res = client.post("/v1/fleet/pull-messages", content=b"\x00\x01proto", headers=headers)
    assert res.status_code == 200 and res.content == b"reply:\x00\x01proto"
    assert res.headers["x-up"] == "1"
    ((path, body, got),) = seen
    assert path == "/v1/fleet/pull-messages" and body == b"\x00\x01proto"
    for k, v in headers.items():
        assert got[k] == v


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/control/register-node"),
        ("POST", "/v1/control/start-run"),
        ("POST", "/v1/control/stop-run"),
        ("POST", "/v1/control/list-runs"),
        ("POST", "/v1/control/list-nodes"),
        ("POST", "/v1/runtime/pull-messages"),
        ("POST", "/v1/fleet/../control/register-node"),
        ("POST", "/v1/fleet/unknown"),
        ("GET", "/v1/fleet/pull-messages"),
        ("GET", "/docs"),
        ("GET", "/health"),
    ],
)
def test_everything_else_is_refused_before_the_superlink(setup, method, path):
    client, seen = setup
    seen.clear()
    res = client.request(method, path, content=b"x" if method == "POST" else None)
    assert res.status_code == 404
    assert "Fleet API only" in res.text
    assert seen == []


def test_oversized_body_is_refused_before_reading_it():
    app = fleet_front_app("http://127.0.0.1:9", ca_cert=None, max_body=10)
    from starlette.testclient import TestClient

    with TestClient(app) as tc:
        res = tc.post("/v1/fleet/push-object", content=b"y" * 11)
    assert res.status_code == 413
