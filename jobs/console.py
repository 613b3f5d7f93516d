"""What a ``cascade`` command prints: its own lines, not the libraries'.

By default Ray's INFO lines, Ray Data's console log, the workers' forwarded output (core-worker errors, their
warnings) and Python warnings (deprecations, ``UserWarning``) stay off the terminal; Ray keeps its logs on
disk (``/tmp/ray/session_latest/logs``). ``--verbose`` shows everything. A user error is one line; an
unexpected error is one line plus the file holding its traceback.

Exit codes: 0 done; 1 the job failed (a task or worker error, an unexpected error); 2 a usage or config error
(found before any cluster work); 130 interrupted.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import threading
import time
import traceback
import warnings
from typing import Any

from jobs.config import random_weight_models

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_VERBOSE = False


def configure(verbose: bool) -> None:
    """Set what reaches the terminal for this process (and the Ray it starts: see ``log_to_driver``)."""
    global _VERBOSE
    _VERBOSE = verbose
    if verbose:
        return
    warnings.filterwarnings("ignore")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")  # processes this one starts (Ray workers, img2dataset)
    for name in ("ray", "ray.data", "ray.train", "ray.tune", "py.warnings"):
        logging.getLogger(name).setLevel(logging.ERROR)


def mute_ray_logger() -> None:
    """Ray sets its ``ray`` logger to INFO when it is first imported (``cascade submit``'s packaging and upload
    lines, the Jobs SDK's websocket lines), and some of its modules set their own loggers to INFO: import it
    now and raise the level of the logger and of the handler they all reach."""
    if _VERBOSE:
        return
    import ray  # noqa: F401

    logger = logging.getLogger("ray")
    logger.setLevel(logging.ERROR)
    for handler in logger.handlers:
        handler.setLevel(logging.ERROR)


def quiet_ray() -> None:
    """After Ray is imported: Ray turns its deprecation warnings back on at import, and Ray Data logs every
    dataset's plan and finish to the console at INFO. Keep Ray Data's file log, mute the console."""
    if _VERBOSE:
        return
    import ray.data  # noqa: F401  (configures the ray.data logger, adds Ray's warning filters)

    warnings.filterwarnings("ignore")
    logger = logging.getLogger("ray.data")
    logger.setLevel(logging.DEBUG)  # the file handler keeps everything
    for handler in logger.handlers:
        if not type(handler).__name__.startswith("Session"):
            handler.setLevel(logging.ERROR)


def log_to_driver() -> bool:
    """Whether Ray forwards workers' stdout/stderr to this terminal."""
    return _VERBOSE


def random_weights_line(config: Any) -> str | None:
    """The first line of a job that runs any random-weight model, or None."""
    models = random_weight_models(config)
    if not models:
        return None
    return (
        f"RANDOM WEIGHTS: {', '.join(models)} (seeded random init, no weights file): the outputs test the "
        "pipeline, not Stable Cascade"
    )


def first_line(exc: BaseException) -> str:
    """An exception as one line (a Ray task error's first line is the user's error)."""
    cause = getattr(exc, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def log_path(command: str, kind: str) -> str:
    """``$TMPDIR/cascade-logs/<command>-<time>-<pid>.<kind>.log``."""
    folder = os.path.join(tempfile.gettempdir(), "cascade-logs")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.{kind}.log")


def write_traceback(command: str, exc: BaseException) -> str:
    """The full traceback in a log file; returns its path."""
    path = log_path(command, "traceback")
    with open(path, "w") as f:
        f.write("".join(traceback.format_exception(exc)))
    return path


# Ray's C++ core writes its ERROR lines straight to file descriptor 2 (``[2026-01-01 12:00:00,123 E 123 456]
# core_worker.cc:...``), past Python's logging. Quiet mode moves them to a log file.
_RAY_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ [A-Z] \d+ \d+\] ")


class NativeLogFilter:
    """Put a pipe on fd 2; pass everything to the real stderr except Ray's native log lines, which go to
    ``log_path``. Partial lines that cannot be a native log line (a progress bar's ``\\r`` redraws) pass at once."""

    def __init__(self, log_path: str) -> None:
        self.log_path = log_path
        self.saved = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.read = read
        self.thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        pending = b""
        with open(self.log_path, "ab") as log:
            while chunk := os.read(self.read, 65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if _RAY_NATIVE_LINE.match(line):
                        log.write(line + b"\n")
                        log.flush()
                    else:
                        os.write(self.saved, line + b"\n")
                if pending and not pending.startswith(b"[") and b"\r" in pending:
                    os.write(self.saved, pending)
                    pending = b""
            if pending:
                os.write(self.saved, pending)

    def close(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)  # the pipe's last writer closes: the pump drains and ends
        self.thread.join(timeout=5)
        os.close(self.read)
        os.close(self.saved)
