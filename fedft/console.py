"""What a command prints, and where everything else goes.

The console shows fedft's own story: what runs, one progress bar, one line per round (log
records marked ``extra={"console": True}``), warnings and errors of fedft itself, and the
final summary. Everything else (third-party INFO/DEBUG lines, Python warnings, Flower's
banners, what Ray actors print) goes to ``OUT/run.log``; ``-v`` shows it on the console too.

Only entry points call :func:`setup_console` and :func:`attach_run_log`; library code just
logs. Ray actors are separate processes: :func:`ray_worker_setup` is their
``worker_process_setup_hook`` and sends all they print to the same ``run.log``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

#: loggers whose warnings and errors are the user's business (the rest is third party).
OWN_LOGGERS = ("fedft", "server", "client", "simulations", "bench", "__main__")
#: third-party loggers whose DEBUG lines are worth keeping in run.log.
DEBUG_KEPT = ("flwr",)
#: libraries that attach their own console handler (and may stop propagation)
THIRD_PARTY_HANDLERS = ("flwr", "ray", "transformers", "huggingface_hub", "mlflow", "alembic")
#: file every Ray actor of the run appends its output to (set in the actors' environment).
RUN_LOG_ENV = "FEDFT_RUN_LOG"
RUN_LOG = "run.log"
#: environment for quiet third-party libraries (no progress bars from model loading).
QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "RAY_DEDUP_LOGS": "0"}

_FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


def _own(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in OWN_LOGGERS)


def _kept_in_log(record: logging.LogRecord) -> bool:
    """run.log: everything at INFO and above, plus Flower's DEBUG lines."""
    if record.levelno >= logging.INFO:
        return True
    return any(record.name == p or record.name.startswith(p + ".") for p in DEBUG_KEPT)


class _ConsoleFilter(logging.Filter):
    """Default console: fedft's warnings/errors and records marked ``console``."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return _kept_in_log(record)
        if getattr(record, "console", False):
            return True
        if not _own(record.name) or record.levelno < logging.WARNING:
            return False
        # An error logged with its traceback is re-raised and reported by the command in
        # one line; the traceback itself is in run.log.
        return record.exc_info is None


class _ConsoleFormatter(logging.Formatter):
    """``msg`` for console lines, ``warning: msg`` / ``error: msg`` for problems."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose:
            return super().format(record)
        msg = record.getMessage()
        if getattr(record, "console", False) and record.levelno < logging.WARNING:
            return msg
        return f"{record.levelname.lower()}: {msg}"


class _BarSafeHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes above a running tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - a log line must never kill the run
            self.handleError(record)


def setup_console(*, verbose: bool = False, stream: TextIO | None = None) -> None:
    """Route logging and Python warnings for a command run (call once, at start).

    Args:
        verbose: show third-party INFO/DEBUG lines and warnings on the console too.
        stream: the console (default: ``sys.stderr``).
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.DEBUG)
    console = _BarSafeHandler(stream or sys.stderr)
    console.addFilter(_ConsoleFilter(verbose))
    console.setFormatter(_ConsoleFormatter(verbose))
    root.addHandler(console)
    for noisy in ("matplotlib", "PIL", "urllib3", "filelock", "fsspec", "asyncio", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.INFO)
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings" -> run.log
    route_third_party_loggers()


def route_third_party_loggers() -> None:
    """Take over loggers that print by themselves (Flower, Ray, transformers, ...).

    Their records then reach the console and run.log only through the root handlers.
    Call again after importing such a library.
    """
    for name in THIRD_PARTY_HANDLERS:
        if name not in logging.Logger.manager.loggerDict:
            continue
        lg = logging.getLogger(name)
        for handler in list(lg.handlers):
            lg.removeHandler(handler)
        lg.propagate = True
        if name in DEBUG_KEPT:
            lg.setLevel(logging.DEBUG)


def attach_run_log(out: Path) -> Path:
    """Append every kept record (with tracebacks) to ``out/run.log``; return its path.

    Also sets :data:`RUN_LOG_ENV`, so Ray actors started afterwards append there too.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = (out / RUN_LOG).resolve()
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.addFilter(_kept_in_log)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with path.open("a", encoding="utf-8") as fh:  # a run boundary, even before any record
        fh.write(f"==== {stamp} fedft {' '.join(sys.argv[1:])}\n")
    os.environ[RUN_LOG_ENV] = str(path)
    return path


def ray_worker_setup() -> None:
    """Ray ``worker_process_setup_hook``: an actor's output goes to the run's run.log.

    Without :data:`RUN_LOG_ENV` in the actor's environment it does nothing and Ray forwards
    the actor's output to the console as usual. An actor on another machine of a Ray
    cluster, where the run's folder does not exist, keeps its output in Ray's session logs
    on that machine (``/tmp/ray/session_latest/logs/worker-*``).
    """
    target = os.environ.get(RUN_LOG_ENV)
    if not target or not Path(target).parent.is_dir():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)  # C-level writes too (tqdm, Ray's own prints)
    os.dup2(fd, 2)
    os.close(fd)
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_kept_in_log)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT.replace("[%(", "[actor %(")))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)
    route_third_party_loggers()
