"""A real Ray head (GCS + dashboard + Jobs API) in its own processes, for job-submission tests.

It runs with its own short temp dir (Unix socket paths must stay under 107 characters), its own free ports
and token authentication (explicit, or Ray 2.60's default from a token file under its own HOME), so it
never touches the test session's ``ray.init(address="local")`` cluster or
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
from collections.abc import Iterator, Sequence
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
    home: Path | None = None  # the head's HOME (with .ray/auth_token) under default_auth


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


def _default_auth_token(home: Path, env: dict[str, str]) -> str:
    """Write ``home/.ray/auth_token`` with Ray's own ``ray get-auth-token --generate``; returns the token."""
    ray_cli = Path(sys.executable).parent / "ray"
    subprocess.run([str(ray_cli), "get-auth-token", "--generate"], env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=60, check=True)  # fmt: skip
    return (home / ".ray" / "auth_token").read_text().strip()


def _head_env(marker: str, home: Path | None, path_first: Sequence[str | Path]) -> tuple[dict[str, str], str]:
    """The head's environment and token: explicit ``RAY_AUTH_*``, or (``home``) Ray's default token file."""
    bin_dir = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k not in _DROP}
    path = os.pathsep.join([*map(str, path_first), bin_dir, env.get("PATH", "")])
    env.update({MARKER_VAR: marker, "RAY_USAGE_STATS_ENABLED": "0", "PATH": path})
    if home is None:
        token = secrets.token_hex(32)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
        return env, token
    env.pop("RAY_AUTH_MODE", None)  # the test session's own ray.init() sets it in this process
    env["HOME"] = str(home)
    return env, _default_auth_token(home, env)


@contextmanager
def running_head(
    num_cpus: int = 1, *, default_auth: bool = False, path_first: Sequence[str | Path] = ()
) -> Iterator[Head]:
    """Start ``ray start --head`` with the dashboard on 127.0.0.1; always kill it and remove its files.

    Args:
        num_cpus: the head's CPUs.
        default_auth: Ray 2.60's default token auth instead of ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN``:
            the head runs with ``HOME=<temp dir>/home`` and no ``RAY_AUTH_*`` variable. Ray writes
            ``~/.ray/auth_token`` there first (as ``ray.init()`` does on a user's machine), and
            ``ray start --head`` turns token auth on because the file exists (it never writes one itself:
            without a token it starts with auth disabled).
        path_first: folders put first on the head's PATH, where a job's entrypoint finds ``python``.
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    marker = secrets.token_hex(8)
    try:
        home = temp_dir / "home" if default_auth else None
        env, token = _head_env(marker, home, path_first)
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
               "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--num-cpus={num_cpus}",
               "--num-gpus=0", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               *(f"{k}={v}" for k, v in ports.items())]  # fmt: skip
        head = Head(f"http://127.0.0.1:{ports['--dashboard-port']}", token, temp_dir, home)
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
