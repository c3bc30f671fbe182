"""Where a client message's time goes, written only when measuring (``FEDFT_PHASE_LOG``).

With ``FEDFT_PHASE_LOG=PATH`` in the environment of ``fedft simulate`` or ``fedft client``
(it reaches the ClientApp processes and the worker), every message appends one JSON line to
PATH per process that handled it: the ClientApp's (``side = "app"``: when its process
started, when ``client.app`` began and finished importing, when the handler began and
ended, and how long it waited for the worker) and the handler's (``side = "handler"``: model
and data load, the local round, encoding the reply); the server adds one line per exchange
(``side = "server"``: when it began, when the messages were sent, when the last reply was
in). ``python -m bench --only deploy`` reads them. Without the variable nothing is measured
or written. Imports nothing heavy (no Flower, no torch).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

#: environment variable naming the JSONL file the phases go to.
PHASE_LOG_ENV = "FEDFT_PHASE_LOG"


def enabled() -> bool:
    """True when phases are being recorded."""
    return bool(os.environ.get(PHASE_LOG_ENV))


def process_started() -> float | None:
    """When this process started (epoch seconds, from /proc; None where unavailable)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # starttime (clock ticks after boot), field 22 of stat
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def record(side: str, **fields: Any) -> None:
    """Append one line (``side``, this PID, ``fields``) to the phase log, if enabled."""
    path = os.environ.get(PHASE_LOG_ENV)
    if not path:
        return
    line = json.dumps({"side": side, "pid": os.getpid(), "at": time.time(), **fields})
    with open(path, "a", encoding="utf-8") as fh:  # one short write: lines do not interleave
        fh.write(line + "\n")
