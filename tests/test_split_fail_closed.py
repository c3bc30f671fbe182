"""The split channel fails closed: no TLS material means no split traffic, unless the
operator says ``--insecure``.

Attacks: a `fedft split-server` started without ``--certs`` used to serve the model body in
plaintext to anyone (real process here: it must exit 2 and never listen); a `fedft client
--certs DIR` whose folder lacks the client's split certificate used to dial the split
server in plaintext while its Flower link used TLS (the node config it hands the ClientApp
must now make the split round refuse).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from client.deploy import ClientPlan, node_config
from client.split_round import client_tls_from_node_config
from fedft.certs import write_deployment_certs
from server.deploy import free_port

ROOT = Path(__file__).resolve().parent.parent


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_split_server_without_certs_refuses_to_serve(tiny_bert_dir, tmp_path):
    cfg = tmp_path / "split.toml"
    cfg.write_text(
        f"[model]\nname = {json.dumps(tiny_bert_dir)}\n[adapter]\nmethod = 'split'\n"
        "[aggregation]\nalgorithm = 'fedit'\n[split]\nfront_layers = 1\nback_layers = 0\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedft.cli", "split-server", str(cfg)]
        + ["--address", f"127.0.0.1:{port}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        served = _listening(port)
        proc.kill()
        proc.wait()
        pytest.fail(f"split-server without --certs kept running (listening: {served})")
    assert proc.returncode == 2, out.decode(errors="replace")
    assert b"--certs" in out and b"--insecure" in out
    assert not _listening(port)


def test_tls_client_without_split_certificate_never_dials_plaintext(tmp_path):
    from flwr.common.config import parse_config_args

    certs = write_deployment_certs(tmp_path / "certs", clients=1).ca_cert.parent
    plan = ClientPlan(
        partition=0,
        server="127.0.0.1:9",
        root_cert=certs / "ca.crt",
        node_key=certs / "client-0.key",
        split_cert=None,  # client-0.crt / client-0-tls.key not handed over
        split_key=None,
    )
    conf = parse_config_args([node_config(plan)])
    with pytest.raises(ValueError, match="never falls back to plaintext"):
        client_tls_from_node_config(conf)
    # with its split files, the same client gets mutual TLS
    full = ClientPlan(
        partition=0,
        server="127.0.0.1:9",
        root_cert=certs / "ca.crt",
        node_key=certs / "client-0.key",
        split_cert=certs / "client-0.crt",
        split_key=certs / "client-0-tls.key",
    )
    tls = client_tls_from_node_config(parse_config_args([node_config(full)]))
    assert tls is not None and tls.client_id == "client-0"
    # plaintext only when the whole deployment is --insecure
    insecure = ClientPlan(partition=0, server="127.0.0.1:9")
    assert client_tls_from_node_config(parse_config_args([node_config(insecure)])) is None
