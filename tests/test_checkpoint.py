"""Checkpoints: a crash while writing leaves the previous checkpoint loadable; no pickle.

Three crashes: an exception in the middle of writing the tensors, an exception between the
two renames of the swap, and a SIGKILL of a subprocess while it rewrites a large
checkpoint in a loop. After each, ``load_checkpoint`` returns a complete checkpoint equal
to one that was written (the previous one, or the new one if the swap had finished).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import fedft.checkpoint as ckpt
from fedft.checkpoint import load_checkpoint, save_checkpoint


def _state(version: int, size: int = 16) -> dict[str, Any]:
    g = torch.Generator().manual_seed(version)
    return {
        "round": version,
        "coordinator": {"a": torch.randn(size, size, generator=g), "scaling": 2.0},
        "accountants": {"0": json.dumps({"history": [[1.0, 0.1, version]]})},
        "exhausted": [1, 2],
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["round"] == b["round"]
        and torch.equal(a["coordinator"]["a"], b["coordinator"]["a"])
        and a["accountants"] == b["accountants"]
        and a["exhausted"] == b["exhausted"]
    )


def test_exception_while_writing_tensors_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint"
    save_checkpoint(target, _state(1))
    real = ckpt.save_file

    def half_then_crash(tensors: Any, path: str, **kw: Any) -> None:
        real(tensors, path, **kw)
        with open(path, "r+b") as fh:  # a torn write: half the file, then the crash
            fh.truncate(os.path.getsize(path) // 2)
        raise OSError("disk full (injected)")

    monkeypatch.setattr(ckpt, "save_file", half_then_crash)
    with pytest.raises(OSError, match="injected"):
        save_checkpoint(target, _state(2))
    monkeypatch.undo()
    assert _same(load_checkpoint(target), _state(1))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # the temp folder is gone


def test_crash_between_the_two_renames_falls_back_to_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "checkpoint"
    save_checkpoint(target, _state(1))
    real = os.replace
    calls = []

    def crash_on_second(src: Any, dst: Any) -> None:
        calls.append((src, dst))
        if len(calls) == 2:  # old moved aside, new not yet in place
            raise KeyboardInterrupt("power cut (injected)")
        real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, _state(2))
    monkeypatch.undo()
    assert not (target / "state.json").exists()  # the crash hit in the window
    assert _same(load_checkpoint(target), _state(1))
    save_checkpoint(target, _state(3))  # and the next save recovers cleanly
    assert _same(load_checkpoint(target), _state(3))


def test_a_kill_in_the_save_after_a_torn_swap_keeps_the_last_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a kill between the renames only ``.checkpoint.old`` is good: the next save (of
    a resumed run) may not delete it before its own checkpoint is in place."""
    target = tmp_path / "checkpoint"
    save_checkpoint(target, _state(1))
    real = os.replace
    calls: list[Any] = []

    def crash(nth: int) -> Any:
        def replace(src: Any, dst: Any) -> None:
            calls.append(dst)
            if len(calls) == nth:
                raise KeyboardInterrupt("killed (injected)")
            real(src, dst)

        return replace

    monkeypatch.setattr(ckpt.os, "replace", crash(2))
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, _state(2))
    assert ckpt.checkpoint_exists(target) and not (target / "state.json").exists()
    calls.clear()
    monkeypatch.setattr(ckpt.os, "replace", crash(1))  # killed again, in the resumed run
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(target, _state(3))
    monkeypatch.undo()
    assert _same(load_checkpoint(target), _state(1))
    save_checkpoint(target, _state(4))
    assert _same(load_checkpoint(target), _state(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporaries left


_WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
from fedft.checkpoint import save_checkpoint
g = torch.Generator().manual_seed(0)
big = torch.randn(1024, 1024, generator=g)  # 4 MiB of tensors per write
v = 2
print("ready", flush=True)
while True:
    save_checkpoint({target!r}, {{"round": v, "coordinator": {{"a": big + v}}}})
    v += 1
"""


def test_sigkill_mid_write_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint"
    save_checkpoint(target, {"round": 1, "coordinator": {"a": torch.zeros(3)}})
    root = str(Path(__file__).resolve().parent.parent)
    code = _WRITER.format(root=root, target=str(target))
    seen = []
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(target)
        a = state["coordinator"]["a"]
        v = int(state["round"])
        seen.append(v)
        if v == 1:
            assert torch.equal(a, torch.zeros(3))
        else:  # a complete checkpoint of some round v: its tensor is big + v exactly
            g = torch.Generator().manual_seed(0)
            assert torch.equal(a, torch.randn(1024, 1024, generator=g) + v)
    assert max(seen) > 2  # the writer really was rewriting when it was killed


def test_checkpoint_files_are_json_and_safetensors_only(tmp_path: Path) -> None:
    target = save_checkpoint(tmp_path / "checkpoint", _state(4))
    names = sorted(p.name for p in target.iterdir())
    assert names == ["state.json", "tensors.safetensors"]
    json.loads((target / "state.json").read_text())  # plain JSON
    head = (target / "tensors.safetensors").read_bytes()[:16]
    assert not head.startswith(b"\x80")  # no pickle protocol header
    with pytest.raises(TypeError, match="plain types"):
        save_checkpoint(tmp_path / "other", {"bad": object()})  # nothing pickle-only gets in
    src = Path(ckpt.__file__).read_text()
    assert "pickle" not in src.replace("without pickle", "") and "torch.load" not in src


def test_fresh_run_sets_an_earlier_runs_outputs_aside(tmp_path):
    from server.federation import _set_aside_previous_run

    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n')
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "state.json").write_text("{}")
    (tmp_path / "plot_loss.png").write_bytes(b"png")
    (tmp_path / "notes.txt").write_text("mine")
    _set_aside_previous_run(tmp_path)
    assert not (tmp_path / "metrics.jsonl").exists()
    (moved,) = (tmp_path / "previous").iterdir()
    assert (moved / "metrics.jsonl").read_text() == '{"round": 0}\n'
    assert (moved / "checkpoint" / "state.json").is_file()
    assert (moved / "plot_loss.png").is_file()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # not ours: left where it was
