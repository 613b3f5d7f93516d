"""Submit a shell entrypoint to a Ray cluster through the Ray Jobs API, and follow, stop and list jobs.

This module knows nothing of cascade's job configs: ``jobs.submit`` checks a job's config, builds the
entrypoint and the environment it travels in, and calls ``submit`` here.

The address is the dashboard / Jobs API URL (``http://127.0.0.1:8265`` through ``kubectl port-forward`` or
``ray dashboard``); an explicit address wins over ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS``.

Authentication: the token is ``token=``, else ``RAY_AUTH_TOKEN``, else the file named by
``RAY_AUTH_TOKEN_PATH``, else Ray's default file ``~/.ray/auth_token`` (Ray's own order), whatever this
process's ``RAY_AUTH_MODE``. Ray 2.60 turns token auth on by default: ``ray.init()`` writes
``~/.ray/auth_token`` when it starts a local cluster, and ``ray start --head`` enables token auth whenever a
token exists. The token goes as a bearer header (harmless to a cluster without auth); ``submit`` prints
where it came from (``resolve_token``), never the token itself.

With ``pip=False`` and no image, ``submit`` first runs ``cluster.probe``'s environment check, which
uploads nothing.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from cluster.runtime_env import build_runtime_env, format_runtime_env, redact_text

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


class ClusterError(RuntimeError):
    """The Jobs API at an address cannot be reached or refused a request; the message names the address."""


def api_url(address: str) -> str:
    """``http://host:8265`` from ``host:8265`` or a full http(s) URL (ValueError for anything else)."""
    address = address.strip().rstrip("/")
    if not address:
        raise ValueError("address is empty; give the Ray dashboard URL, e.g. http://127.0.0.1:8265")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise ValueError(
            f"address={address!r}: the Ray Jobs API needs the dashboard's http(s) URL, e.g. http://127.0.0.1:8265"
        )
    return address


@contextmanager
def _explicit_address() -> Iterator[None]:
    """Hide RAY_ADDRESS / RAY_API_SERVER_ADDRESS, which Ray would otherwise prefer to the given address."""
    saved = {k: os.environ.pop(k) for k in _ADDRESS_VARS if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


DEFAULT_TOKEN_FILE = "~/.ray/auth_token"  # Ray's default: ray.init() and `ray get-auth-token --generate`
NO_TOKEN = "none (no RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"


def resolve_token(token: str | None = None) -> tuple[str | None, str]:
    """The token to send and where it came from, e.g. ``(token, "token from ~/.ray/auth_token")``.

    Order: ``token``, ``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``;
    ``(None, NO_TOKEN)`` when there is none. The description never holds the token.

    Raises:
        ValueError: ``RAY_AUTH_TOKEN_PATH`` names a missing or empty file.
    """
    if token:
        return token, "token from the token argument"
    if env_token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return env_token, "token from RAY_AUTH_TOKEN"
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip():
        file = Path(path).expanduser()
        if not file.is_file() or not (file_token := file.read_text().strip()):
            raise ValueError(
                f"RAY_AUTH_TOKEN_PATH={path}: no such file, or it is empty; it must hold the token"
            )
        return file_token, f"token from RAY_AUTH_TOKEN_PATH ({path})"
    file = Path(DEFAULT_TOKEN_FILE).expanduser()
    if file.is_file() and (file_token := file.read_text().strip()):
        return file_token, f"token from {DEFAULT_TOKEN_FILE}"
    return None, NO_TOKEN


def connect(address: str, token: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for ``address``, sending ``token`` (default: ``resolve_token``'s).

    Raises:
        ClusterError: the address is unreachable or refuses the token.
    """
    from ray.job_submission import JobSubmissionClient

    url = api_url(address)
    sent, _ = resolve_token(token)
    headers = {"Authorization": f"Bearer {sent}"} if sent else None
    with _explicit_address():
        return _call(address, lambda: JobSubmissionClient(url, headers=headers), token=token)


def _connection_errors() -> tuple[type[BaseException], ...]:
    import aiohttp
    import requests

    return (
        ConnectionError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        aiohttp.ClientConnectionError,
    )


def _call(address: str, fn: Any, *args: Any, token: str | None = None) -> Any:
    """``fn(*args)``, with unreachable or refusing Jobs APIs turned into ``ClusterError`` naming ``address``.

    ``token`` is the caller's ``token=`` argument: a refusal names the token source it led to.
    """
    from ray.exceptions import AuthenticationError

    url = api_url(address)
    try:
        return fn(*args)
    except AuthenticationError as exc:
        raise ClusterError(
            f"the Ray Jobs API at {url} refused the request ({redact_text(str(exc)).splitlines()[0]}; "
            f"auth: {resolve_token(token)[1]}); set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the "
            "cluster's token (`ray get-auth-token` on the head prints it)"
        ) from None
    except _connection_errors() as exc:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {url} ({type(exc).__name__}): is the head running and its "
            "dashboard port forwarded (kubectl port-forward svc/<cluster>-head-svc 8265, or "
            "ray dashboard cluster/launcher.yaml)?"
        ) from None


def submit_entrypoint(
    entrypoint: str, address: str, runtime_env: dict[str, Any], *, submission_id: str | None = None,
    token: str | None = None, metadata: dict[str, str] | None = None,
) -> str:  # fmt: skip
    """Submit any shell ``entrypoint`` with ``runtime_env``; returns the submission id."""
    client = connect(address, token)
    return _call(
        address,
        lambda: client.submit_job(
            entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id, metadata=metadata
        ),
        token=token,
    )


def submit(
    entrypoint: str, address: str, *, env_vars: dict[str, str] | None = None, image: str | None = None,
    pip: bool = True, follow: bool = False, submission_id: str | None = None, token: str | None = None,
    metadata: dict[str, str] | None = None, out: TextIO | None = None,
) -> str:  # fmt: skip
    """Submit the shell ``entrypoint`` to the cluster at ``address``, with the project as its runtime_env.

    Args:
        entrypoint: the command the cluster runs (e.g. ``python -m jobs.entrypoint encode``).
        address: the Ray dashboard / Jobs API URL, e.g. ``http://127.0.0.1:8265``.
        env_vars: environment variables the job gets (besides the offline switches).
        image: container image with the project installed (Ray ``image_uri``; no upload, no pip).
        pip: install the project's requirements on the cluster (False: the nodes have them, which
            ``cluster.probe.check_environment`` checks first, uploading nothing).
        follow: stream the logs until the job ends; raise RuntimeError unless it SUCCEEDED.
        submission_id: an id of your choosing (Ray refuses a duplicate), default: Ray generates one.
        token: Ray auth token (default: ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``).
        metadata: job metadata shown by ``ray job list``.
        out: where progress and followed logs go (default: stdout).

    Returns:
        The submission id.

    Raises:
        ClusterEnvironmentError: (a ValueError) with ``pip=False``, the cluster's Python lacks the project.
    """
    from cluster.probe import check_environment

    out = out or sys.stdout
    runtime_env = build_runtime_env(image=image, pip=pip, env_vars=env_vars or {})
    print(f"submitting to {api_url(address)}: {redact_text(entrypoint)}", file=out)
    print(f"auth: {resolve_token(token)[1]}", file=out)
    if not pip and not image:
        check_environment(address, token=token, out=out)
    print(f"runtime_env: {format_runtime_env(runtime_env)}", file=out)
    sid = submit_entrypoint(
        entrypoint, address, runtime_env, submission_id=submission_id, token=token, metadata=metadata
    )
    print(f"submitted {sid}", file=out)
    if follow:
        logs(address, sid, follow=True, token=token, out=out)
        final = wait(address, sid, timeout_s=60, token=token)
        if final != "SUCCEEDED":
            info = connect(address, token).get_job_info(sid)
            raise RuntimeError(f"job {sid} ended {final}: {redact_text(info.message or '')}")
    return sid


def status(address: str, submission_id: str, *, token: str | None = None) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    client = connect(address, token)
    return str(_call(address, client.get_job_status, submission_id, token=token).value)


def wait(
    address: str, submission_id: str, *, timeout_s: float = 600, poll_s: float = 0.5, token: str | None = None
) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status (TimeoutError after timeout_s)."""
    client = connect(address, token)
    deadline = time.monotonic() + timeout_s
    while True:
        current = str(_call(address, client.get_job_status, submission_id, token=token).value)
        if current in TERMINAL:
            return current
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {current} after {timeout_s} s")
        time.sleep(poll_s)


def logs(
    address: str, submission_id: str, follow: bool = False, *, token: str | None = None,
    out: TextIO | None = None,
) -> str:  # fmt: skip
    """The job's logs (secrets of this process masked); also written to ``out`` when given.

    With ``follow``, streams them (``tail_job_logs``) until the job ends, writing to ``out`` or stdout.
    """
    client = connect(address, token)
    if not follow:
        text = redact_text(_call(address, client.get_job_logs, submission_id, token=token))
        if out is not None:
            out.write(text)
        return text
    out = out or sys.stdout
    chunks: list[str] = []

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            chunks.append(redact_text(chunk))
            out.write(chunks[-1])
            out.flush()

    _call(address, lambda: asyncio.run(_tail()), token=token)
    return "".join(chunks)


def stop(address: str, submission_id: str, *, token: str | None = None) -> bool:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL); False when it had already ended."""
    client = connect(address, token)
    return bool(_call(address, client.stop_job, submission_id, token=token))


def list_jobs(address: str, *, token: str | None = None) -> list[dict[str, Any]]:
    """The cluster's jobs, oldest first: submission_id, status, entrypoint, start/end time (ms), message."""
    client = connect(address, token)
    rows = []
    for job in _call(address, client.list_jobs, token=token):
        rows.append(
            {
                "submission_id": job.submission_id,
                "status": str(job.status.value),
                "entrypoint": redact_text(job.entrypoint or ""),
                "start_time": job.start_time,
                "end_time": job.end_time,
                "message": redact_text(job.message or ""),
            }
        )
    return sorted(rows, key=lambda r: r["start_time"] or 0)
