"""What a submitted job runs on the cluster: ``python -m jobs.entrypoint <job> [--set K=V ...]``.

The job's YAML config arrives as the text of ``CASCADE_JOB_CONFIG_YAML`` (see ``jobs.submit``); it is
written to a private temp file and handed to ``cascade <job> --config <file>``, so the job runs exactly as
it does locally. Without that variable the job runs from its ``--set`` overrides alone.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from jobs.submit import CONFIG_ENV_VAR


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cascade <job> [--config <file from the env>] [rest...]``; returns its exit status."""
    from jobs.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0].startswith("-"):
        print("usage: python -m jobs.entrypoint JOB [--set KEY=VALUE ...]", file=sys.stderr)
        return 2
    text = os.environ.get(CONFIG_ENV_VAR)
    if text is None:
        return cli_main(args)
    job, rest = args[0], args[1:]
    with tempfile.TemporaryDirectory(prefix="cascade-job-") as tmp:
        path = Path(tmp) / f"{job}.yaml"
        path.write_text(text)
        print(f"cascade {job}: config from the submission ({len(text)} bytes)", flush=True)
        return cli_main([job, "--config", str(path), *rest])


if __name__ == "__main__":
    raise SystemExit(main())
