"""Low-severity hardening, each with the attack it stops.

- `fedft certs` into a folder where someone planted a symlink at a key's name used to write
  the private key through the link (over the link's target); now the link is replaced and
  its target untouched, and a folder others can enter is refused.
- A reply naming adapter modules the server never sent used to have every tensor decoded
  before the names were compared; now the names are checked first.
- `fedft certs` without --server-name now says which names the certificate covers.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedft.certs import write_deployment_certs, write_file
from fedft.transport import serde
from fedft.types import ClientUpdate, LoraFactors

ROOT = Path(__file__).resolve().parent.parent


def test_planted_symlink_is_replaced_not_followed(tmp_path):
    out = tmp_path / "certs"
    out.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    os.symlink(victim, out / "server.key")  # planted by someone who could write there
    paths = write_deployment_certs(out, clients=1)
    assert victim.read_text() == "precious\n"
    assert not paths.server_key.is_symlink()
    assert paths.server_key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in paths.server_key.read_bytes()
    # write_file on its own: same
    os.symlink(victim, tmp_path / "k")
    write_file(tmp_path / "k", b"secret", private=True)
    assert victim.read_text() == "precious\n" and (tmp_path / "k").read_bytes() == b"secret"


def test_folder_others_can_enter_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(ValueError, match="chmod 700"):
        write_deployment_certs(shared, clients=1)
    assert list(shared.iterdir()) == []


def test_unknown_modules_refused_before_any_tensor_is_decoded(monkeypatch):
    start = {"q": LoraFactors(a=torch.zeros(2, 4), b=torch.zeros(3, 2), scaling=1.0)}
    forged = {
        f"evil{i}": LoraFactors(a=torch.ones(2, 4), b=torch.ones(3, 2), scaling=1.0)
        for i in range(5)
    }
    rd = serde.update_to_recorddict(
        ClientUpdate(client_id="x", adapters={**start, **forged}, num_examples=1), parts="ab"
    )
    calls = []
    real = serde.array_to_tensor
    monkeypatch.setattr(serde, "array_to_tensor", lambda *a, **k: calls.append(1) or real(*a, **k))
    with pytest.raises(serde.SerdeError, match="never sent"):
        serde.update_from_recorddict(rd, client_id="x", parts="ab", reference=start)
    assert calls == []  # nothing was decoded


def test_certs_without_server_name_says_what_it_covers(tmp_path):
    res = subprocess.run(
        [sys.executable, "-m", "fedft.cli", "certs", str(tmp_path / "c"), "--clients", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert "no --server-name" in res.stderr and "--server-name" in res.stderr
    assert "localhost, 127.0.0.1, ::1" in res.stdout
    named = subprocess.run(
        [sys.executable, "-m", "fedft.cli", "certs", str(tmp_path / "d"), "--clients", "1"]
        + ["--server-name", "fl.example.org"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert named.returncode == 0 and "no --server-name" not in named.stderr
    assert "--server fl.example.org:9092" in named.stdout
