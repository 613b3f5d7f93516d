"""Real job submission: a real Ray head with the dashboard and Ray 2.60's default token auth (a token in the
head's ~/.ray/auth_token, which a client on the same machine sends), jobs sent through jobs.submit."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests

from cluster import submit as api
from cluster.runtime_env import build_runtime_env
from jobs.submit import submit_job
from tests.cluster.ray_head import free_ports, running_head
from tests.cluster.scores import write_scores

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def head():
    with running_head(default_auth=True) as h:
        yield h


@pytest.fixture
def fake_secret(monkeypatch) -> str:
    """A credential in the submitting process's environment, which must never reach the cluster or stdout."""
    value = "FAKE" + secrets.token_hex(16)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", value)
    return value


@pytest.fixture
def same_machine(head, monkeypatch) -> None:
    """The client on the head's machine: its HOME (with ~/.ray/auth_token), and no RAY_AUTH_* variable."""
    monkeypatch.setenv("HOME", str(head.home))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)


def test_filter_job_runs_on_the_cluster_with_its_config(head, tmp_path, fake_secret, same_machine) -> None:
    # Ray turned token auth on by itself, because ~/.ray/auth_token existed when the head started ...
    assert requests.get(f"{head.address}/api/jobs/", timeout=10).status_code == 401
    write_scores(tmp_path / "scores" / "part-00000.parquet")
    config = tmp_path / "filter.yaml"
    config.write_text(
        f"# a filter job, as a user writes it\nscores_dir: {tmp_path / 'scores'}\n"
        f"output_dir: {tmp_path / 'not-used'}\nrules:\n  - {{field: width, op: '>=', value: 500}}\n"
    )
    start = time.monotonic()
    done = subprocess.run(  # through the CLI, as a user types it; no token is given: it sends that file's
        [str(Path(sys.executable).parent / "cascade"), "submit", "filter", "--config", str(config),
         "--set", f"output_dir={tmp_path / 'kept'}", "--address", head.address, "--no-pip", "--follow",
         "--submission-id", f"cascade-filter-{secrets.token_hex(4)}"],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # Ray's packaging, upload and websocket lines stay off the terminal
    sid = done.stdout.splitlines()[-1]
    assert api.status(head.address, sid) == "SUCCEEDED", done.stdout
    logs = api.logs(head.address, sid)
    summary = json.loads(logs[logs.index("{") : logs.rindex("}") + 1])
    assert (summary["n_input"], summary["n_kept"]) == (3, 2)  # the YAML's rule ran ...
    kept = pq.read_table(tmp_path / "kept" / "parquet")["key"].to_pylist()
    assert sorted(kept) == ["huge", "wide"]  # ... and the --set override won over the YAML's output_dir
    assert not (tmp_path / "not-used").exists()
    assert "config from the submission" in logs
    printed = done.stdout
    assert sid in printed and "jobs.entrypoint filter" in printed and '"working_dir"' in printed
    assert "auth: token from ~/.ray/auth_token" in printed
    assert "environment check (cascade-env-check-" in printed  # --no-pip: the head's python has the project
    raw = api.connect(head.address, head.token)
    info = raw.get_job_info(sid)
    assert "HF_HUB_OFFLINE" in info.runtime_env["env_vars"]
    for text in (printed, raw.get_job_logs(sid), json.dumps(info.runtime_env), info.entrypoint):
        assert fake_secret not in text and head.token not in text
    assert time.monotonic() - start < 120


def test_stop_a_long_running_job(head, fake_secret) -> None:
    # prints its AWS_* variable names, the offline switch and a marker that the command itself does not contain
    entrypoint = (
        "python -c \"import os, time; aws = sorted(k for k in os.environ if k.startswith('AWS_')); "
        "print('AWS=' + repr(aws), 'OFFLINE=' + os.environ.get('HF_HUB_OFFLINE', '-'), 'STATE=' + 'up', "
        'flush=True); time.sleep(600)"'
    )
    sid = api.submit_entrypoint(entrypoint, head.address, build_runtime_env(pip=False), token=head.token)
    raw = api.connect(head.address, head.token)
    deadline = time.monotonic() + 60
    while "STATE=up" not in raw.get_job_logs(sid):
        assert api.status(head.address, sid, token=head.token) in ("PENDING", "RUNNING")
        assert time.monotonic() < deadline, raw.get_job_logs(sid)
        time.sleep(0.5)
    assert "AWS=[] OFFLINE=1 STATE=up" in raw.get_job_logs(sid)  # no AWS_* travelled; the offline switch did
    assert api.status(head.address, sid, token=head.token) == "RUNNING"
    assert api.stop(head.address, sid, token=head.token) is True
    assert api.wait(head.address, sid, timeout_s=60, token=head.token) == "STOPPED"
    assert fake_secret not in raw.get_job_logs(sid)
    rows = {r["submission_id"]: r for r in api.list_jobs(head.address, token=head.token)}
    assert rows[sid]["status"] == "STOPPED"


def test_wrong_token_is_refused_with_the_address(head) -> None:
    with pytest.raises(api.ClusterError, match=head.address) as err:
        api.status(head.address, "raysubmit_x", token="0" * 64)
    assert "RAY_AUTH_TOKEN" in str(err.value) and "0" * 64 not in str(err.value)


def test_unreachable_address_names_it() -> None:
    (port,) = free_ports(1)
    with pytest.raises(api.ClusterError, match=f"http://127.0.0.1:{port}"):
        api.list_jobs(f"127.0.0.1:{port}")


def test_bad_config_fails_before_submitting(tmp_path) -> None:
    (tmp_path / "filter.yaml").write_text("scores_dir: s3://b/scores\nrules: []\n")
    (port,) = free_ports(1)  # nothing listens: a submission attempt would raise ClusterError instead
    with pytest.raises(ValueError, match="output_dir"):
        submit_job("filter", str(tmp_path / "filter.yaml"), [], f"http://127.0.0.1:{port}", pip=False)
    with pytest.raises(ValueError, match="unknown job 'flter'"):
        submit_job("flter", None, [], f"http://127.0.0.1:{port}", pip=False)
