"""Check, before a ``--no-pip`` submission, that the cluster's ``python`` can run this project.

Without pip and without an image, a job runs its entrypoint with whatever ``python`` is first on the head's
PATH, and its Ray tasks with the Python the nodes started Ray from. A head started from the project's
virtualenv without activating it runs the entrypoint with another Python, and the job dies deep in a
traceback (``No module named 'fsspec'``). So a tiny probe job goes first, through the same Jobs API and
with nothing uploaded (its runtime_env holds only the base env vars: no working_dir, no pip). Its
entrypoint, ``python -c PROBE_SCRIPT``, prints one line ``PROBE_MARKER {json}``: for the entrypoint's own
Python and for a Ray worker that it reaches with one task (``num_cpus=0``, so a head that schedules no
work still runs it), the interpreter, the installed cascade-data version and which of the project's
dependencies are missing. ``judge`` turns that report into the problems a user must fix.

This module knows nothing of job configs; the dependency names come from pyproject.toml
(``cluster.runtime_env``).
"""

from __future__ import annotations

import json
import secrets
import shlex
from collections.abc import Sequence
from typing import Any, TextIO

from cluster.runtime_env import BASE_ENV_VARS, dependency_names, project_table
from cluster.submit import ClusterError, api_url, logs, stop, submit_entrypoint, wait

PROBE_MARKER = "CASCADE_ENV_PROBE"
PROBE_TIMEOUT_S = 120.0
PROBE_METADATA = {"cascade_probe": "environment"}

# Runs on the cluster under an unknown Python (3.8+), in the head's cwd: argv is the marker, then the
# distribution names.
PROBE_SCRIPT = """\
import json, sys
from importlib import metadata

sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # the installed environment, not the cwd's files


def report(names):
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"python": sys.executable, "python_version": sys.version.split()[0],
            "cascade_data": version("cascade-data"), "missing": [n for n in names if version(n) is None]}


marker, names = sys.argv[1], sys.argv[2:]
result = {"driver": report(names), "worker": None, "worker_error": None}
try:
    import ray
except ImportError:
    pass
else:
    try:
        ray.init(log_to_driver=False)
        result["worker"] = ray.get(ray.remote(num_cpus=0)(report).remote(names), timeout=60)
    except Exception as exc:
        result["worker_error"] = (type(exc).__name__ + ": " + str(exc)).splitlines()[0]
print(marker + " " + json.dumps(result), flush=True)
"""

FIX_HINT = (
    "start the head from the project's environment (source .venv/bin/activate, then ray start --head), "
    "or submit with --image IMAGE, or without --no-pip"
)


class ClusterEnvironmentError(ValueError):
    """The cluster's Python cannot run the project as it is (a user error: the message says the fix)."""


def probe_entrypoint(names: Sequence[str]) -> str:
    """``python -c PROBE_SCRIPT PROBE_MARKER NAME...``, the probe job's shell command."""
    return shlex.join(["python", "-c", PROBE_SCRIPT, PROBE_MARKER, *names])


def parse_report(logs: str) -> dict[str, Any] | None:
    """The probe's report from its job logs (the last marker line), or None when it printed none."""
    prefix = PROBE_MARKER + " "
    lines = [line for line in logs.splitlines() if line.startswith(prefix)]
    return json.loads(lines[-1][len(prefix) :]) if lines else None


def _describe(side: dict[str, Any], label: str, local_version: str | None) -> list[str]:
    """What is wrong with one Python of the report (``label`` says which), as sentence fragments."""
    where = f"{label} {side['python']} ({side['python_version']})"
    found = []
    if side["missing"]:
        found.append(f"{where} lacks {', '.join(side['missing'])}")
    installed = side["cascade_data"]
    if local_version and installed and installed != local_version:
        found.append(f"{where} has cascade-data {installed}, this checkout is {local_version}")
    return found


def judge(report: dict[str, Any], local_version: str | None) -> list[str]:
    """The problems in a probe report: missing dependencies, another cascade-data, a failing Ray task.

    A cascade-data that is not installed at all is no problem (the working_dir upload brings the code);
    an installed one of another version means the cluster's dependencies were set up for other code.
    """
    driver, worker = report["driver"], report.get("worker")
    problems = _describe(driver, "the job's python", local_version)
    if worker is not None and (worker["python"], worker["missing"], worker["cascade_data"]) != (
        driver["python"], driver["missing"], driver["cascade_data"]
    ):  # fmt: skip
        problems += _describe(worker, "the Ray workers' python", local_version)
    if report.get("worker_error"):
        problems.append(f"a Ray task from the job's python failed ({report['worker_error']})")
    return problems


def summary(report: dict[str, Any]) -> str:
    """One line on a good report: which Python runs the job and its Ray workers."""
    driver, worker = report["driver"], report.get("worker")
    text = f"python {driver['python']} ({driver['python_version']}), cascade-data {driver['cascade_data']}"
    if worker is not None and worker["python"] != driver["python"]:
        text += f"; Ray workers: {worker['python']} ({worker['python_version']})"
    return text


def check_environment(
    address: str, *, token: str | None = None, names: Sequence[str] | None = None,
    local_version: str | None = None, timeout_s: float = PROBE_TIMEOUT_S, out: TextIO | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the probe job on the cluster at ``address`` and judge its report; returns the report.

    Args:
        address, token: as in ``cluster.submit``.
        names: the distribution names to look for (default: pyproject's ``[project].dependencies``).
        local_version: the cascade-data version the submission carries (default: pyproject's).
        timeout_s: how long to wait for the probe job.
        out: where its progress and outcome go, a line each (default: nowhere).

    Raises:
        ClusterEnvironmentError: the probe found a problem, or ended without a report (``python``
            missing or too old); the one-line message says what is wrong and how to fix it.
        ClusterError: the cluster cannot be reached, or the probe did not finish within ``timeout_s``.
    """
    names = dependency_names() if names is None else names
    local_version = project_table().get("version") if local_version is None else local_version
    sid = submit_entrypoint(
        probe_entrypoint(names), address, {"env_vars": dict(BASE_ENV_VARS)}, token=token,
        submission_id=f"cascade-env-check-{secrets.token_hex(4)}", metadata=PROBE_METADATA,
    )  # fmt: skip
    if out is not None:
        print(
            f"environment check ({sid}): running the head's python, uploading nothing ...",
            file=out,
            flush=True,
        )
    try:
        final = wait(address, sid, timeout_s=timeout_s, token=token)
    except TimeoutError:
        stop(address, sid, token=token)
        raise ClusterError(
            f"the environment check {sid} on {api_url(address)} did not finish within {timeout_s:.0f} s; "
            f"see: cascade cluster logs {sid}"
        ) from None
    text = logs(address, sid, token=token)
    report = parse_report(text)
    if report is None:
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "no output")
        raise ClusterEnvironmentError(
            f"the cluster's python cannot run the --no-pip environment check (job {sid} ended {final}: "
            f"{last.strip()}); {FIX_HINT}"
        )
    problems = judge(report, local_version)
    if problems:
        raise ClusterEnvironmentError(
            f"the cluster cannot run this project with --no-pip: {'; '.join(problems)}. Fix: {FIX_HINT}"
        )
    if out is not None:
        print(f"environment check ({sid}): {summary(report)}", file=out)
    return report
