"""fedft benchmarks: cost and scale measured side by side (issue 8).

Every benchmark module exposes ``run(*, size, doc) -> list[str]``: it measures ours and a
reference in the same process run, prints one ``RATIO <name>: ...`` line per headline
ratio and writes its table, the exact command, the machine and a reading into its own
section of ``docs/benchmarks.md`` (:func:`write_section`). ``python -m bench`` runs them all.

Sizes: ``"smoke"`` (seconds; what ``tests/test_bench.py`` runs), ``"default"`` (the suite,
< 30 min on 2 cores) and ``"full"`` (``python -m bench --full``; larger settings).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

logger = logging.getLogger(__name__)

Size = Literal["smoke", "default", "full"]
T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"

#: benchmark sections in the order they appear in docs/benchmarks.md.
SECTIONS = (
    "comm",
    "aggregation_cost",
    "sim_scale",
    "overhead",
    "dp_overhead",
    "quality",
    "profile_sim",
    "padding",
    "split",
    "secagg_round",
    "config_partition",
    "sim_paths",
    "deploy",
    "gpu_check",
)

_HEADER = """# fedft benchmarks

Measured, not estimated: every table below was produced by the command printed with it, on
the machine named with it. Each benchmark runs ours and a reference **in the same run**,
side by side, and reports their ratio. The development machine has 2 CPU cores shared
with other engineers working at the same time, so absolute timings are noisy (often
by 20-50 % between runs); ratios measured within one run are much steadier, and the
sections say where a number was repeated. Run everything with `make bench`
(`python -m bench`, < 30 min on 2 cores) or `python -m bench --full` (larger settings);
one benchmark with `python -m bench.<name>`.
"""


def machine() -> str:
    """One line naming the machine: cores, CPU model, RAM, Python, torch."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "?"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        ram = f"{kib / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    import torch

    return (
        f"nproc={os.cpu_count()}, CPU {cpu}, RAM {ram}, Python {platform.python_version()}, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )


def ratio_line(name: str, text: str) -> str:
    """Print and return the headline line ``RATIO <name>: <text>`` (tests grep for it)."""
    line = f"RATIO {name}: {text}"
    print(line, flush=True)
    return line


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def write_section(
    name: str, *, title: str, command: str, body: str, doc: Path | None = DOC
) -> None:
    """Replace (or add) benchmark ``name``'s section of ``doc`` (None: write nothing).

    The section is delimited by ``<!-- bench:name -->`` markers, so each benchmark rewrites
    only its own part and the sections keep the order of :data:`SECTIONS`. Text after the
    last section (sections written by hand) stays at the end.
    """
    if doc is None:
        return
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = (
        f"{start}\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n"
        f"{body.strip()}\n{end}"
    )
    text = doc.read_text() if doc.is_file() else _HEADER
    matches = list(re.finditer(r"<!-- bench:(\w+) -->.*?<!-- /bench:\1 -->", text, re.S))
    found = {m.group(1): m.group(0) for m in matches}
    found[name] = section
    head = text.split("<!-- bench:", 1)[0].rstrip() + "\n"
    tail = text[matches[-1].end() :].strip() if matches else ""
    order = [s for s in SECTIONS if s in found] + sorted(set(found) - set(SECTIONS))
    doc.parent.mkdir(parents=True, exist_ok=True)
    body_text = "\n\n".join(found[s] for s in order) + "\n"
    doc.write_text(head + "\n" + body_text + (f"\n{tail}\n" if tail else ""))
    logger.info("wrote section %s of %s", name, doc)


def best_of(fn: Callable[[], T], repeat: int) -> tuple[float, T]:
    """Run ``fn`` ``repeat`` times; return the fastest wall time (s) and the last result."""
    best, result = float("inf"), None
    for _ in range(max(repeat, 1)):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result  # type: ignore[return-value]


# --- memory ------------------------------------------------------------------------------


def _status_kib(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _trim() -> None:
    """Give freed heap back to the OS (glibc ``malloc_trim``) so RSS deltas are honest."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class PeakRss:
    """Peak resident memory of this process during a ``with`` block, over its start.

    Uses the kernel's own high-water mark: ``VmHWM`` is reset by writing 5 to
    ``/proc/self/clear_refs`` (Linux >= 4.0) after ``malloc_trim``; ``delta_mib`` is
    ``VmHWM - VmRSS(start)``. (tracemalloc cannot see torch's allocator.)
    """

    delta_mib: float = 0.0


@contextmanager
def peak_rss() -> Iterator[PeakRss]:
    """Measure the peak RSS increase of the block (MiB), see :class:`PeakRss`."""
    _trim()
    result = PeakRss()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        logger.warning("cannot reset VmHWM; the peak includes earlier allocations")
    base = _status_kib("VmRSS")
    try:
        yield result
    finally:
        result.delta_mib = max(_status_kib("VmHWM") - base, 0) / 1024


def _tree_rss_kib(root: int) -> int:
    """RSS (KiB) of ``root`` and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        try:
            total += _status_kib("VmRSS", pid)
        except OSError:
            pass
        stack.extend(children.get(pid, []))
    return total


class TreeRssSampler:
    """Peak of the summed RSS of this process and its descendants (Ray workers, raylet...),
    sampled every ``interval_s`` seconds in a background thread."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_mib = 0.0
        self.start_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, _tree_rss_kib(os.getpid()) / 1024)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeRssSampler:
        self.start_mib = _tree_rss_kib(os.getpid()) / 1024
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sim_env() -> None:
    """Environment every simulating benchmark needs (offline, quiet), set by the CLI."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_DEDUP_LOGS": "0",
    }.items():
        os.environ.setdefault(key, value)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a ``fedft`` child process: this tree's code first on PYTHONPATH,
    offline and quiet, no run log inherited from a parent run; ``extra`` on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("FEDFT_RUN_LOG", None)
    for key, value in (
        ("HF_HUB_OFFLINE", "1"),
        ("TRANSFORMERS_OFFLINE", "1"),
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        env.setdefault(key, value)
    return {**env, **extra}


def fedft_cli(*args: str) -> list[str]:
    """The argv of ``fedft ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "fedft.cli", *args]


def set_args(sets: Sequence[str]) -> list[str]:
    """``--set KEY=VALUE`` for each override."""
    return [a for s in sets for a in ("--set", s)]
