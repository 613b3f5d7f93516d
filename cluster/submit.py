"""Submit ``cascade`` jobs to a Ray cluster through the Ray Jobs API, and follow, stop and list them.

How the config travels: the YAML file's text goes into the job's ``runtime_env.env_vars`` as
``CASCADE_JOB_CONFIG_YAML`` (it is small; ``MAX_CONFIG_BYTES``). The entrypoint
``python -m cluster.entrypoint <job> [--set K=V ...]`` writes it to a file on the cluster and runs
``cascade <job> --config <file> [--set K=V ...]`` there. This works the same with a working_dir upload and
with a container image (where Ray 2.60 allows no working_dir). The config is checked locally before
anything is submitted, so a bad field fails here with its name.

The address is the dashboard / Jobs API URL (``http://127.0.0.1:8265`` through ``kubectl port-forward`` or
``ray dashboard``); an explicit address wins over ``RAY_ADDRESS`` / ``RAY_API_SERVER_ADDRESS``. On a
cluster with token authentication (``RAY_AUTH_MODE=token``) pass ``token=`` or set ``RAY_AUTH_TOKEN``; the
token is sent as a bearer header and never printed.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from cluster.runtime_env import build_runtime_env, format_runtime_env, redact_text

CONFIG_ENV_VAR = "CASCADE_JOB_CONFIG_YAML"
MAX_CONFIG_BYTES = 64 * 1024
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


def default_token() -> str | None:
    """``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else None.

    With None, Ray's client still sends ``~/.ray/auth_token`` when this process has ``RAY_AUTH_MODE=token``.
    """
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return Path(path).expanduser().read_text().strip() or None
    return None


def connect(address: str, token: str | None = None) -> Any:
    """A ``JobSubmissionClient`` for ``address``, sending ``token`` (default: ``default_token()``).

    Raises:
        ClusterError: the address is unreachable or refuses the token.
    """
    from ray.job_submission import JobSubmissionClient

    url = api_url(address)
    token = token or default_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with _explicit_address():
        return _call(address, lambda: JobSubmissionClient(url, headers=headers))


def _connection_errors() -> tuple[type[BaseException], ...]:
    import aiohttp
    import requests

    return (
        ConnectionError,
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        aiohttp.ClientConnectionError,
    )


def _call(address: str, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, with unreachable or refusing Jobs APIs turned into ``ClusterError`` naming ``address``."""
    from ray.exceptions import AuthenticationError

    url = api_url(address)
    try:
        return fn(*args)
    except AuthenticationError as exc:
        raise ClusterError(
            f"the Ray Jobs API at {url} refused the request ({redact_text(str(exc)).splitlines()[0]}); "
            "set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token"
        ) from None
    except _connection_errors() as exc:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {url} ({type(exc).__name__}): is the head running and its "
            "dashboard port forwarded (kubectl port-forward svc/<cluster>-head-svc 8265, or "
            "ray dashboard cluster/launcher.yaml)?"
        ) from None


def job_entrypoint(job: str, overrides: Sequence[str] = ()) -> str:
    """The shell command run on the cluster: ``python -m cluster.entrypoint <job> [--set K=V ...]``."""
    words = ["python", "-m", "cluster.entrypoint", job]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)


def check_job_config(job: str, config_path: str | Path | None, overrides: Sequence[str]) -> None:
    """Build the job's config locally exactly as ``cascade <job>`` will (ValueError naming the field)."""
    from jobs.config import load_config
    from jobs.pipeline_jobs import JOBS

    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; jobs: {', '.join(JOBS)}")
    load_config(JOBS[job].config_cls, config_path, [*overrides, *JOBS[job].fixed])


def _read_config(config_path: str | Path) -> str:
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config {config_path}: no such file")
    text = path.read_text()
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ValueError(f"config {config_path} is over {MAX_CONFIG_BYTES // 1024} KiB; keep data out of it")
    return text


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
    )


def submit(
    job: str, config_path: str | None, overrides: list[str], address: str, *, image: str | None = None,
    pip: bool = True, follow: bool = False, submission_id: str | None = None, token: str | None = None,
    validate: bool = True, out: TextIO | None = None,
) -> str:  # fmt: skip
    """Submit ``cascade <job> --config <config_path> [--set ...]`` to the cluster at ``address``.

    Args:
        job: a ``cascade`` job (``ingest``, ``score``, ``filter``, ``encode``, ``train-c``, ...).
        config_path: the job's YAML file (its text travels with the job), or None for ``--set`` only.
        overrides: ``KEY=VALUE`` strings, applied on the cluster as ``--set``.
        address: the Ray dashboard / Jobs API URL, e.g. ``http://127.0.0.1:8265``.
        image: container image with the project installed (Ray ``image_uri``; no upload, no pip).
        pip: install the project's requirements on the cluster (False: the nodes have them).
        follow: stream the logs until the job ends; raise RuntimeError unless it SUCCEEDED.
        submission_id: an id of your choosing (Ray refuses a duplicate), default: Ray generates one.
        token: Ray auth token for ``RAY_AUTH_MODE=token`` clusters (default: ``RAY_AUTH_TOKEN``).
        validate: build the config locally first, so a bad field fails before submission.
        out: where progress and followed logs go (default: stdout).

    Returns:
        The submission id.
    """
    out = out or sys.stdout
    config_text = _read_config(config_path) if config_path is not None else None
    if validate:
        check_job_config(job, config_path, overrides)
    env_vars = {CONFIG_ENV_VAR: config_text} if config_text is not None else {}
    runtime_env = build_runtime_env(image=image, pip=pip, env_vars=env_vars)
    entrypoint = job_entrypoint(job, overrides)
    print(f"submitting to {api_url(address)}: {redact_text(entrypoint)}", file=out)
    print(f"runtime_env: {format_runtime_env(runtime_env)}", file=out)
    sid = submit_entrypoint(
        entrypoint, address, runtime_env, submission_id=submission_id, token=token,
        metadata={"cascade_job": job},
    )  # fmt: skip
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
    return str(_call(address, client.get_job_status, submission_id).value)


def wait(
    address: str, submission_id: str, *, timeout_s: float = 600, poll_s: float = 0.5, token: str | None = None
) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; returns that status (TimeoutError after timeout_s)."""
    client = connect(address, token)
    deadline = time.monotonic() + timeout_s
    while True:
        current = str(_call(address, client.get_job_status, submission_id).value)
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
        text = redact_text(_call(address, client.get_job_logs, submission_id))
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

    _call(address, lambda: asyncio.run(_tail()))
    return "".join(chunks)


def stop(address: str, submission_id: str, *, token: str | None = None) -> bool:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL); False when it had already ended."""
    client = connect(address, token)
    return bool(_call(address, client.stop_job, submission_id))


def list_jobs(address: str, *, token: str | None = None) -> list[dict[str, Any]]:
    """The cluster's jobs, oldest first: submission_id, status, entrypoint, start/end time (ms), message."""
    client = connect(address, token)
    rows = []
    for job in _call(address, client.list_jobs):
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
