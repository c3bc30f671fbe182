"""Checkpoints without pickle: tensors in safetensors, the rest in JSON, written atomically.

A state is a nested structure of dicts, lists, str/int/float/bool/None and tensors. Tensors
are replaced in the JSON skeleton by ``{"__tensor__": key}`` and stored under that key in
``tensors.safetensors``. A checkpoint is written into a temporary folder that is renamed over
the old one only when complete (``os.replace`` of a symlink-free folder pair), so a crash
while writing leaves the previous checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

_TENSOR = "__tensor__"
_MAX_JSON_BYTES = 64 * 1024 * 1024


def _split(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, Mapping):
        for k in obj:
            if not isinstance(k, str):
                raise TypeError(f"checkpoint keys must be strings, got {k!r} at {path}")
        return {k: _split(v, tensors, f"{path}/{k}") for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_split(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path}: use plain types")


def _join(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_TENSOR}:
            key = obj[_TENSOR]
            if key not in tensors:
                raise ValueError(f"checkpoint is missing tensor {key!r}")
            return tensors[key]
        return {k: _join(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join(v, tensors) for v in obj]
    return obj


def save_checkpoint(directory: str | Path, state: Mapping[str, Any]) -> Path:
    """Write ``state`` to ``directory`` atomically (the old checkpoint survives a crash)."""
    target = Path(directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(dict(state), tensors, "")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file(tensors, str(tmp / "tensors.safetensors"))
        with open(tmp / "state.json", "w", encoding="utf-8") as fh:
            json.dump(skeleton, fh)
            fh.flush()
            os.fsync(fh.fileno())
        old = target.with_name(f".{target.name}.old")
        if (target / "state.json").is_file():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        elif target.exists():  # a torn folder: the previous complete one is ``old``
            shutil.rmtree(target)
        # (no complete ``target``: ``old`` is the only good checkpoint; it stays until the
        # new one is in place)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _remove_stale_temporaries(target, keep=tmp)
    return target


def _remove_stale_temporaries(target: Path, *, keep: Path) -> None:
    """Temporary folders of writes that a kill interrupted (``.<name>.<random>``)."""
    for p in target.parent.glob(f".{target.name}.*"):
        if p.is_dir() and p != keep and p.name != f".{target.name}.old":
            shutil.rmtree(p, ignore_errors=True)


def checkpoint_exists(directory: str | Path) -> bool:
    """True when :func:`load_checkpoint` has a checkpoint to read.

    The previous one counts when a kill interrupted the swap.
    """
    target = Path(directory)
    old = target.with_name(f".{target.name}.old")
    return (target / "state.json").is_file() or (old / "state.json").is_file()


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """Read what :func:`save_checkpoint` wrote.

    Falls back to the previous checkpoint if a crash interrupted the swap.
    """
    target = Path(directory)
    if not (target / "state.json").is_file():
        old = target.with_name(f".{target.name}.old")
        if (old / "state.json").is_file():
            target = old
        else:
            raise FileNotFoundError(f"no checkpoint in {directory} (state.json missing)")
    json_path = target / "state.json"
    if json_path.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{json_path} is larger than {_MAX_JSON_BYTES} bytes; refusing")
    skeleton = json.loads(json_path.read_text(encoding="utf-8"))
    tensors = load_file(str(target / "tensors.safetensors"))
    return dict(_join(skeleton, tensors))
