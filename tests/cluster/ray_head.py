"""A real Ray head (GCS + dashboard + Jobs API) in its own processes, for job-submission tests.

It runs with its own short temp dir (Unix socket paths must stay under 107 characters), its own free ports
and token authentication, so it never touches the test session's ``ray.init(address="local")`` cluster or
``/tmp/ray/ray_current_cluster``. ``ray stop`` would kill every Ray process on the machine, so shutdown
instead kills exactly the processes that carry this head's marker in their environment.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

MARKER_VAR = "CASCADE_TEST_RAY_HEAD"
_PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
               "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port",
               "--node-manager-port", "--object-manager-port")  # fmt: skip
# never handed to the head: credentials of this process and addresses of other clusters
_DROP = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclass(frozen=True)
class Head:
    address: str  # http://127.0.0.1:<dashboard port>
    token: str
    temp_dir: Path


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports that were free a moment ago (held open together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_pids(marker: str | None) -> list[int]:
    """PIDs of this user's processes whose environment holds ``MARKER_VAR=marker`` (any marker: None)."""
    prefix = f"{MARKER_VAR}={marker or ''}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(v == prefix or (marker is None and v.startswith(prefix)) for v in variables):
            pids.append(int(entry.name))
    return pids


def kill_marked(marker: str, grace_s: float = 4.0) -> None:
    """SIGTERM the marked processes, then SIGKILL whatever is still marked after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for pid in marked_pids(marker):
            with suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not marked_pids(marker):
            return


def _wait_ready(head: Head, timeout_s: float = 60) -> None:
    from cluster.submit import ClusterError, list_jobs

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            list_jobs(head.address, token=head.token)
            return
        except ClusterError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@contextmanager
def running_head(num_cpus: int = 1) -> Iterator[Head]:
    """Start ``ray start --head`` with the dashboard on 127.0.0.1; always kill it and remove its files."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    marker = secrets.token_hex(8)
    token = secrets.token_hex(32)
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in _DROP}
    env.update({MARKER_VAR: marker, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
                "RAY_USAGE_STATS_ENABLED": "0", "PATH": bin_dir + os.pathsep + env.get("PATH", "")})  # fmt: skip
    ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
    cmd = [str(Path(bin_dir) / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}", "--num-gpus=0",
           f"--temp-dir={temp_dir}", "--disable-usage-stats", *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
    head = Head(f"http://127.0.0.1:{ports['--dashboard-port']}", token, temp_dir)
    try:
        with open(temp_dir / "ray-start.log", "wb") as log:
            done = subprocess.run(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=120, check=False
            )
        if done.returncode != 0:
            raise RuntimeError(f"ray start failed:\n{(temp_dir / 'ray-start.log').read_text()[-3000:]}")
        _wait_ready(head)
        yield head
    finally:
        kill_marked(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
