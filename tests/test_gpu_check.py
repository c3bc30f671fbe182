"""`make gpu-check` (bench/gpu_check.py) and the simulation's GPU refusals, on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench import gpu_check
from fedft.cli import main as fedft_main
from fedft.config import ConfigError, load_config
from simulations.simulate import check_devices

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "simulations" / "quickstart.toml")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


def _cfg(*overrides: str):  # type: ignore[no-untyped-def]
    return load_config(QUICKSTART, overrides)


def test_cuda_clients_that_reserve_no_gpu_are_refused_before_any_work(capsys) -> None:
    # Ray sets CUDA_VISIBLE_DEVICES="" for a virtual client with num_gpus = 0: it would fail
    # inside the run; the CLI refuses at once, naming both keys (exit 2, nothing written)
    code = fedft_main(["simulate", QUICKSTART, "--set", "federation.device='cuda'"])
    err = capsys.readouterr().err
    assert code == 2
    assert "federation.device = 'cuda'" in err and "gpus_per_client = 0" in err
    with pytest.raises(ConfigError, match="gpus_per_client"):
        check_devices(_cfg("federation.device='cuda'"))
    assert check_devices(_cfg("federation.device='cpu'")) is None


@NO_CUDA
def test_cuda_on_a_machine_without_it_is_refused_unless_a_ray_cluster_runs_the_clients() -> None:
    cuda = ("federation.device='cuda'", "federation.gpus_per_client=0.5")
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        check_devices(_cfg(*cuda))
    # the driver of an existing Ray cluster need not have the GPU its workers have
    assert check_devices(_cfg(*cuda, "federation.ray_address='127.0.0.1:6379'")) is None


def test_auto_on_a_gpu_machine_without_gpus_per_client_says_clients_use_the_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    notice = check_devices(_cfg("federation.device='auto'"))
    assert notice is not None and "train on the CPU" in notice
    assert check_devices(_cfg("federation.device='auto'", "federation.gpus_per_client=0.5")) is None


@NO_CUDA
def test_gpu_check_without_cuda_says_why_and_exits_0(capsys) -> None:
    before = gpu_check.DOC.read_text()
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert "gpu-check: skipped" in out and "CPU build" in out
    assert gpu_check.DOC.read_text() == before


@NO_CUDA
def test_a_failing_check_is_a_fail_row_with_the_runs_own_error(tmp_path) -> None:
    # on a machine without CUDA, the simulation check's run is refused (exit 2)
    r = gpu_check.run_check("simulation", device="cuda", model="minilm", work=tmp_path)
    assert not r.ok and r.detail == "exit 2" and r.step_s is None
    assert any("sees no CUDA device" in line for line in r.log)
    row = gpu_check.table([r]).splitlines()[2]
    assert row.startswith("| simulation |") and "| FAIL |" in row


def test_unknown_check_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--device", "cpu", "--only", "simulation,warp-drive"])
    assert exc.value.code == 2


@pytest.mark.slow
def test_every_gpu_check_runs_on_the_cpu(tiny_bert4_dir, tmp_path, capsys) -> None:
    """The four runs of `make gpu-check`, on the CPU with a tiny model (~10 min on 2 cores)."""
    before = gpu_check.DOC.read_text()
    code = gpu_check.main(["--device", "cpu", "--model", tiny_bert4_dir, "--work", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "| pass |" in line]
    assert code == 0, out
    assert [r.split("|")[1].strip() for r in rows] == list(gpu_check.CHECKS)
    assert "ε" in next(r for r in rows if r.startswith("| dp-sgd"))
    assert gpu_check.DOC.read_text() == before  # a CPU run writes nothing
