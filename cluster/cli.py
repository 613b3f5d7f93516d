"""``cascade cluster {status,logs,stop,list}``: parsers and handlers for the ``cascade`` command line.

Wire-up: ``from cluster.cli import add_parsers; add_parsers(sub)`` inside ``jobs.cli.build_parser``. The
parser sets ``func`` to a handler ``(argparse.Namespace) -> int``. Errors are ValueError (bad input, exit 2)
or RuntimeError (``ClusterError``: unreachable/refused, or a followed job that failed; exit 1), as
``jobs.cli.main`` expects. The auth token comes from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or Ray's
``~/.ray/auth_token`` (``cluster.submit.resolve_token``), never from a flag (flags end up in shell history
and ``ps``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def _default_address() -> str:
    return os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--address",
        default=_default_address(),
        help="Ray dashboard / Jobs API URL (default: RAY_API_SERVER_ADDRESS, else %(default)s); "
        "token auth: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token",
    )


def cmd_cluster(args: argparse.Namespace) -> int:
    """``cascade cluster ACTION``: status / logs / stop one job, or list them all."""
    from cluster import submit as api

    if args.action == "status":
        print(api.status(args.address, args.submission_id))
    elif args.action == "logs":
        api.logs(args.address, args.submission_id, follow=args.follow, out=sys.stdout)
    elif args.action == "stop":
        stopped = api.stop(args.address, args.submission_id)
        print(f"{args.submission_id}: {'stop requested' if stopped else 'already ended'}")
    else:
        for row in api.list_jobs(args.address):
            print(json.dumps(row))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``cluster`` on the ``cascade`` subparsers."""
    c = sub.add_parser("cluster", help="status, logs, stop or list jobs on a Ray cluster")
    actions = c.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("status", "print a job's status"), ("logs", "print a job's logs"),
                         ("stop", "stop a running job"), ("list", "list the cluster's jobs, one JSON line each")):  # fmt: skip
        a = actions.add_parser(action, help=text, description=text)
        if action != "list":
            a.add_argument("submission_id")
        if action == "logs":
            a.add_argument("--follow", action="store_true", help="stream until the job ends")
        add_address(a)
        a.set_defaults(func=cmd_cluster)
