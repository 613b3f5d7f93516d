"""``cascade submit``: check a job's config here, then run ``cascade <job>`` on a Ray cluster.

How the config travels: the YAML file's text goes into the job's environment as ``CASCADE_JOB_CONFIG_YAML``
(it is small; ``MAX_CONFIG_BYTES``). The entrypoint ``python -m jobs.entrypoint <job> [--set K=V ...]``
writes it to a file on the cluster and runs ``cascade <job> --config <file> [--set K=V ...]`` there. This
works the same with a working_dir upload and with a container image (where Ray 2.60 allows no
working_dir). The config is checked locally before anything is submitted, so a bad field fails here with
its name. ``cluster.submit`` does the submitting and knows nothing of job configs.
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

CONFIG_ENV_VAR = "CASCADE_JOB_CONFIG_YAML"
MAX_CONFIG_BYTES = 64 * 1024


def job_entrypoint(job: str, overrides: Sequence[str] = ()) -> str:
    """The shell command run on the cluster: ``python -m jobs.entrypoint <job> [--set K=V ...]``."""
    words = ["python", "-m", "jobs.entrypoint", job]
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


def read_config(config_path: str | Path) -> str:
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"config {config_path}: no such file")
    text = path.read_text()
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ValueError(f"config {config_path} is over {MAX_CONFIG_BYTES // 1024} KiB; keep data out of it")
    return text


def submit_job(
    job: str, config_path: str | None, overrides: list[str], address: str, *, image: str | None = None,
    pip: bool = True, follow: bool = False, submission_id: str | None = None, token: str | None = None,
    validate: bool = True, out: TextIO | None = None,
) -> str:  # fmt: skip
    """Submit ``cascade <job> --config <config_path> [--set ...]`` to the cluster at ``address``.

    Args:
        job: a ``cascade`` job (``ingest``, ``score``, ``filter``, ``encode``, ``train-c``, ...).
        config_path: the job's YAML file (its text travels with the job), or None for ``--set`` only.
        overrides: ``KEY=VALUE`` strings, applied on the cluster as ``--set``.
        address, image, pip, follow, submission_id, token, out: as in ``cluster.submit.submit``.
        validate: build the config locally first, so a bad field fails before submission.

    Returns:
        The submission id.
    """
    from cluster.submit import submit

    config_text = read_config(config_path) if config_path is not None else None
    if validate:
        check_job_config(job, config_path, overrides)
    return submit(
        job_entrypoint(job, overrides), address, env_vars={CONFIG_ENV_VAR: config_text} if config_text else {},
        image=image, pip=pip, follow=follow, submission_id=submission_id, token=token,
        metadata={"cascade_job": job}, out=out,
    )  # fmt: skip


def cmd_submit(args: argparse.Namespace) -> int:
    """``cascade submit``: prints the submission id last."""
    sid = submit_job(
        args.job, args.config, list(args.set or ()), args.address, image=args.image, pip=not args.no_pip,
        follow=args.follow, submission_id=args.submission_id,
    )  # fmt: skip
    print(sid)
    return 0


def add_submit_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``cascade submit`` (the Jobs API address option comes from ``cluster.cli``)."""
    from cluster.cli import add_address

    p = sub.add_parser(
        "submit",
        help="submit a job (ingest, score, filter, encode, train-*) to a Ray cluster via the Jobs API",
        description="Upload the code (or use --image), send the YAML config with the job, and run "
        "`cascade JOB --config ...` on the cluster.",
    )
    p.add_argument("job", help="the cascade job to run, e.g. encode")
    p.add_argument("--config", help="YAML file with the job config (it travels with the job)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    add_address(p)
    p.add_argument("--image", default=None, help="container image with the project installed (Ray image_uri)")
    p.add_argument("--no-pip", action="store_true",
                   help="the cluster nodes already have the dependencies (a probe job checks the head's python "
                   "first; nothing is uploaded when it lacks them)")  # fmt: skip
    p.add_argument("--follow", action="store_true", help="stream the logs; exit 1 unless the job succeeds")
    p.add_argument("--submission-id", default=None, help="your own unique id for the job")
    p.set_defaults(func=cmd_submit)
