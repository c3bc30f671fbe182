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


class _Reply:
    def __init__(self, node: int, index: int | None) -> None:
        from flwr.app import ConfigRecord, RecordDict

        self.metadata = type("Meta", (), {"src_node_id": node})()
        self.content = RecordDict({"info": ConfigRecord({"client_index": index or 0})})
        self.error = "Node Unavailable" if index is None else None

    def has_error(self) -> bool:
        return self.error is not None


class _Msg:  # Flower's Message needs a running app; discovery reads only the address
    def __init__(self, *, content: object, dst_node_id: int, message_type: str) -> None:
        self.metadata = type("Meta", (), {"dst_node_id": dst_node_id})()


class _StaleThenBack:
    """Three bound nodes; node 12 (client 2) is a killed client's stale entry for its first
    ``stale`` queries (no answer), then its restarted client answers."""

    def __init__(self, stale: int) -> None:
        self.stale = stale
        self.asked: list[int] = []

    def get_node_ids(self) -> list[int]:
        return [10, 11, 12]

    def send_and_receive(self, messages, timeout=None):  # type: ignore[no-untyped-def]
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.asked.append(node)
            late = node == 12 and self.asked.count(12) <= self.stale
            replies.append(_Reply(node, None if late else node - 10))
        return replies


def test_a_node_that_does_not_answer_yet_is_asked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # after a crash the SuperLink lists a killed client's node until its heartbeat expires;
    # the resumed run used to fail at once with "no node serves client indices [2]"
    import server.federation as federation

    monkeypatch.setattr(federation, "DISCOVERY_RETRY_S", 0.01, raising=False)
    monkeypatch.setattr(federation, "Message", _Msg)
    grid = _StaleThenBack(stale=2)
    nodes = federation.discover_clients(
        grid,  # type: ignore[arg-type]
        num_clients=3,
        timeout_s=30,
        bound={10: 0, 11: 1, 12: 2},
    )
    assert nodes == {0: 10, 1: 11, 2: 12}
    assert grid.asked == [10, 11, 12, 12, 12]  # those that answered are not asked again


def test_a_node_that_never_answers_fails_discovery_after_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.federation as federation

    monkeypatch.setattr(federation, "DISCOVERY_RETRY_S", 0.01, raising=False)
    monkeypatch.setattr(federation, "Message", _Msg)
    with pytest.raises(RuntimeError, match=r"no node serves client indices \[2\] within 0 s"):
        federation.discover_clients(
            _StaleThenBack(stale=10**9),  # type: ignore[arg-type]
            num_clients=3,
            timeout_s=0.2,
            bound={10: 0, 11: 1, 12: 2},
        )
