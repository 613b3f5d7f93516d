"""The ``cascade`` command line: one subcommand per job.

Heavy imports (torch, ray, transformers) happen inside each subcommand so ``cascade --help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_job_parsers(sub)
    from cluster.cli import add_parsers as add_cluster_parsers
    from jobs.submit import add_submit_parser

    add_submit_parser(sub)
    add_cluster_parsers(sub)
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("doctor", "print versions, flavors, the Ray status and whether CUDA is present", _cmd_doctor),
        ("flavors", "list every model flavor with its exact parameter count (meta device)", _cmd_flavors),
        (
            "demo",
            "ingest → score → filter → encode → train-c → export → report on bundled CC0 photos",
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:
        print(f"cascade {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"cascade {args.command}: failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
