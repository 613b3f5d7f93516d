"""The ``--no-pip`` environment check: its judgement, its script under a bare Python, and a real head
whose ``python`` lacks the project (the submission fails with one line, and only the probe reaches Ray)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cluster import submit as api
from cluster.probe import PROBE_MARKER, PROBE_SCRIPT, judge, parse_report
from cluster.runtime_env import REPO_ROOT, dependency_names
from tests.cluster.ray_head import running_head
from tests.cluster.scores import write_scores

GOOD = {"python": "/opt/venv/bin/python", "python_version": "3.11.9", "cascade_data": "0.1.0", "missing": []}


def probe_report(driver: dict[str, Any] | None = None, worker: dict[str, Any] | None = None,
                 worker_error: str | None = None) -> dict[str, Any]:  # fmt: skip
    return {"driver": {**GOOD, **(driver or {})}, "worker": {**GOOD, **(worker or {})},
            "worker_error": worker_error}  # fmt: skip


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory) -> Path:
    """A virtualenv with nothing installed, not even pip (fast to make)."""
    path = tmp_path_factory.mktemp("envs") / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    return path


def test_judge_all_good_and_a_cascade_data_that_is_not_installed() -> None:
    assert judge(probe_report(), "0.1.0") == []
    assert judge(probe_report({"cascade_data": None}, {"cascade_data": None}), "0.1.0") == []


def test_judge_names_the_python_and_what_it_lacks() -> None:
    problems = judge(probe_report({"missing": ["fsspec", "s3fs"]}, {"missing": ["fsspec", "s3fs"]}), "0.1.0")
    assert problems == ["the job's python /opt/venv/bin/python (3.11.9) lacks fsspec, s3fs"]  # said once
    driver = {"python": "/usr/bin/python3", "missing": ["ray", "fsspec"]}
    report = {**probe_report(driver), "worker": None}  # no ray there: no worker report
    assert judge(report, "0.1.0") == ["the job's python /usr/bin/python3 (3.11.9) lacks ray, fsspec"]


def test_judge_names_another_cascade_data_and_a_failing_ray_task() -> None:
    worker = {"python": "/srv/old/bin/python", "cascade_data": "0.0.9"}
    assert judge(probe_report(worker=worker, worker_error="RuntimeError: version mismatch"), "0.1.0") == [
        "the Ray workers' python /srv/old/bin/python (3.11.9) has cascade-data 0.0.9, this checkout is 0.1.0",
        "a Ray task from the job's python failed (RuntimeError: version mismatch)",
    ]


def test_the_probe_script_under_a_bare_python_reports_every_dependency_missing(bare_venv) -> None:
    names = dependency_names()
    done = subprocess.run(  # in the checkout, whose cascade_data.egg-info must not count as installed
        [str(bare_venv / "bin" / "python"), "-c", PROBE_SCRIPT, PROBE_MARKER, *names],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    report = parse_report("some log line\n" + done.stdout)
    assert report is not None and report["worker"] is None and report["worker_error"] is None
    assert report["driver"]["python"] == str(bare_venv / "bin" / "python")
    assert report["driver"]["cascade_data"] is None and report["driver"]["missing"] == names
    (problem,) = judge(report, "0.1.0")
    assert str(bare_venv / "bin" / "python") in problem and "fsspec" in problem and "ray" in problem
    assert parse_report("no marker here\n") is None


@pytest.mark.timeout(300)
def test_no_pip_submit_to_a_head_without_the_project_fails_in_one_line(bare_venv, tmp_path) -> None:
    write_scores(tmp_path / "scores" / "part-00000.parquet")
    config = tmp_path / "filter.yaml"
    config.write_text(
        f"scores_dir: {tmp_path / 'scores'}\noutput_dir: {tmp_path / 'kept'}\n"
        "rules:\n  - {field: width, op: '>=', value: 500}\n"
    )
    with running_head(default_auth=True, path_first=[bare_venv / "bin"]) as head:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH") and k != "RAY_ADDRESS"}
        env["HOME"] = str(head.home)  # the client finds the head's ~/.ray/auth_token, as on one machine
        done = subprocess.run(
            [str(Path(sys.executable).parent / "cascade"), "submit", "filter", "--config", str(config),
             "--address", head.address, "--no-pip"],
            env=env, capture_output=True, text=True, timeout=240, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stdout + done.stderr
        (line,) = done.stderr.splitlines()
        assert line.startswith("cascade submit: error: the cluster cannot run this project with --no-pip: ")
        assert f"the job's python {bare_venv / 'bin' / 'python'}" in line and "lacks torch," in line
        assert "fsspec" in line and "ray start --head" in line and "--image" in line
        assert "auth: token from ~/.ray/auth_token" in done.stdout and "runtime_env" not in done.stdout
        assert head.token not in done.stdout + done.stderr
        (job,) = api.list_jobs(head.address, token=head.token)  # the probe, and nothing else
        assert job["submission_id"].startswith("cascade-env-check-") and job["status"] == "SUCCEEDED"
        info = api.connect(head.address, head.token).get_job_info(job["submission_id"])
        assert "working_dir" not in info.runtime_env and "pip" not in info.runtime_env  # nothing uploaded
    assert not (tmp_path / "kept").exists()
