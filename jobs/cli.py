"""The ``cascade`` command line: one subcommand per job.

Heavy imports (torch, ray, transformers) happen inside each subcommand so ``cascade --help`` is instant.
A user error prints one line and exits 2; ``--verbose`` (anywhere on the line) adds tracebacks and the
libraries' logs. Exit codes are in ``jobs.console``.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

# Offline by construction: nothing in this project downloads weights at run time.
for _var, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("NO_ALBUMENTATIONS_UPDATE", "1"),
    ("RAY_USAGE_STATS_ENABLED", "0"),
):
    os.environ.setdefault(_var, _value)


def _cmd_doctor(args: argparse.Namespace) -> int:
    from jobs.doctor import run_doctor

    return run_doctor(check_ray=not args.no_ray)


def _cmd_flavors(args: argparse.Namespace) -> int:
    from jobs.doctor import print_flavors

    print_flavors(family=args.family)
    return 0


def _cmd_job(args: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.pipeline_jobs import JOBS, run_job

    job = JOBS[args.command]
    config = load_config(job.config_cls, args.config, [*(args.set or ()), *job.fixed])
    run_job(args.command, config, address=args.address)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import DemoConfig, run_demo

    run_demo(DemoConfig(output_dir=args.output, weights=args.weights, train_steps=args.steps), args.address)
    return 0


def _job_epilog(name: str) -> str:
    from jobs.config import describe
    from jobs.pipeline_jobs import JOBS

    fields = "\n".join(f"  {line}" for line in describe(JOBS[name].config_cls))
    return f"config fields (YAML keys, or --set KEY=VALUE):\n{fields}"


def _add_job_parsers(sub: argparse._SubParsersAction) -> None:
    from jobs.pipeline_jobs import JOBS

    for name, job in JOBS.items():
        p = sub.add_parser(
            name, help=job.help, description=job.help, epilog=_job_epilog(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        p.add_argument("--config", help="YAML file with the job config")
        p.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"
        )
        p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS, else a local Ray)")
        p.set_defaults(func=_cmd_job)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cascade",
        description="cascade-data: encode image–text datasets into Stable Cascade latents on Ray, "
        "then train on the cache.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show tracebacks, Ray's logs and library warnings (any position on the line)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_job_parsers(sub)
    from cluster.cli import add_parsers as add_cluster_parsers
    from jobs.app.main import add_app_parser
    from jobs.convert import add_convert_parser
    from jobs.sample import add_sample_parser
    from jobs.submit import add_submit_parser

    add_app_parser(sub)
    add_submit_parser(sub)
    add_convert_parser(sub)
    add_sample_parser(sub)
    add_cluster_parsers(sub)
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("doctor", "print versions, flavors, the Ray status and whether CUDA is present", _cmd_doctor),
        ("flavors", "list every model flavor with its exact parameter count (meta device)", _cmd_flavors),
        (
            "demo",
            "ingest → score → dedup → filter → encode → train-c → export → report on bundled CC0 photos",
            _cmd_demo,
        ),
    ]
    for name, help_text, fn in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=fn)
        if name == "doctor":
            p.add_argument("--no-ray", action="store_true", help="skip starting a local Ray to check it")
        if name == "flavors":
            p.add_argument("--family", default=None, help="only this family, e.g. stage_c or controlnet")
        if name == "demo":
            p.add_argument("--output", default="cascade-demo", help="output folder (default: ./cascade-demo)")
            p.add_argument("--weights", default=None, metavar="DIR",
                           help="released checkpoints under their official file names (default: tiny flavors, "
                           "seeded random weights)")  # fmt: skip
            p.add_argument("--steps", type=int, default=30, help="Stage C training steps (default: 30)")
            p.add_argument("--address", default=None, help="Ray address (default: a local Ray)")
    return parser


USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def _from_cluster(exc: BaseException) -> bool:
    """A Ray task or actor error (it may subclass the user's exception type, but the job failed)."""
    return any(cls.__module__.startswith("ray.") for cls in type(exc).__mro__)


def main(argv: Sequence[str] | None = None) -> int:
    from jobs import console

    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    args = build_parser().parse_args([a for a in argv if a != "--verbose"])
    console.configure(verbose)
    if args.command in ("submit", "cluster"):
        console.mute_ray_logger()
    native = None
    if not verbose and args.command in _ray_commands():
        native = console.NativeLogFilter(console.log_path(args.command, "ray-native"))
    try:
        return _run(args, verbose)
    finally:
        if native is not None:
            native.close()


def _ray_commands() -> set[str]:
    from jobs.pipeline_jobs import JOBS

    return {*JOBS, "demo"}


def _run(args: argparse.Namespace, verbose: bool) -> int:
    from jobs import console

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"cascade {args.command}: interrupted", file=sys.stderr)
        return console.EXIT_INTERRUPTED
    except USER_ERRORS as exc:
        if not _from_cluster(exc):
            if verbose:
                traceback.print_exc()
            print(f"cascade {args.command}: error: {console.first_line(exc)}", file=sys.stderr)
            return console.EXIT_USAGE
        return _failed(args.command, exc, verbose)
    except Exception as exc:
        return _failed(args.command, exc, verbose)


def _failed(command: str, exc: BaseException, verbose: bool) -> int:
    from jobs import console

    log = console.write_traceback(command, exc)
    if verbose:
        traceback.print_exception(exc)
    print(f"cascade {command}: failed: {console.first_line(exc)} (traceback: {log}; Ray logs: "
          "/tmp/ray/session_latest/logs)", file=sys.stderr)  # fmt: skip
    return console.EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
