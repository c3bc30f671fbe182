"""Fault injection for real-process tests: freeze a process in the middle of a checkpoint swap.

A test puts this folder first on ``PYTHONPATH`` of the ``fedft server`` it starts; every
Python process of that server (SuperLink, SuperExec, ServerApp) then runs this at start-up.
With ``FEDFT_TEST_FREEZE_CHECKPOINT=N``, the process that saves round N's checkpoint stops
itself (SIGSTOP) between the two renames that swap it in (the old checkpoint already moved
aside to ``.checkpoint.old``, the new one not yet in place), after writing its PID to
``<out>/frozen-at-checkpoint-write``. The test then kills the server there, as a crash
would.
"""

import json
import os
import signal
from pathlib import Path

_ROUND = os.environ.get("FEDFT_TEST_FREEZE_CHECKPOINT")

if _ROUND is not None:
    _real_replace = os.replace

    def _replace(src, dst, *args, **kwargs):
        target = Path(os.fsdecode(dst))
        if target.name == "checkpoint":
            try:
                state = json.loads((Path(os.fsdecode(src)) / "state.json").read_text())
            except (OSError, ValueError):
                state = {}
            if state.get("round") == int(_ROUND):
                (target.parent / "frozen-at-checkpoint-write").write_text(f"{os.getpid()}\n")
                os.kill(os.getpid(), signal.SIGSTOP)
        return _real_replace(src, dst, *args, **kwargs)

    os.replace = _replace
