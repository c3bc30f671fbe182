"""``fedft server --wait-clients``: how long the ServerApp waits for its clients, then fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedft.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_wait_clients_flag_sets_the_config_key(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import server.deploy

    seen = []

    def fake_run_server(cfg, plan):  # type: ignore[no-untyped-def]
        seen.append(cfg.federation.client_wait_s)
        return 0

    monkeypatch.setattr(server.deploy, "run_server", fake_run_server)
    argv = ["server", str(ROOT / "simulations/quickstart.toml"), "--insecure"]
    argv += ["--out", str(tmp_path / "out")]
    assert main([*argv, "--wait-clients", "7.5"]) == 0
    assert main(argv) == 0
    assert seen == [7.5, 600.0]
    assert main([*argv, "--wait-clients", "0"]) == 2  # must be > 0: a config error


def test_discovery_gives_up_after_the_wait_naming_the_fix() -> None:
    from server.federation import discover_clients

    class TwoNodes:
        def get_node_ids(self) -> list[int]:
            return [11, 12]

    with pytest.raises(RuntimeError, match=r"only 2 of federation.num_clients=3 .* within 1 s"):
        discover_clients(TwoNodes(), num_clients=3, timeout_s=1.0)  # type: ignore[arg-type]
