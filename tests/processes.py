"""Processes a test started and must end: everything that carries an environment marker (a killed driver's
Ray processes run in sessions of their own, so a process-group kill misses them)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def kill_marked_processes(marker: str) -> None:
    """SIGKILL every process whose environment holds ``marker`` (a killed driver's Ray processes), until none is left."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = []
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    found.append(int(pid))
            except OSError:
                continue
        if not found:
            return
        for pid in found:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    raise AssertionError(f"processes with {marker} survive")
