"""The submission runtime_env: small upload, offline switches, the project's pins, and no credentials."""

from __future__ import annotations

import argparse
import json

import pyarrow.parquet as pq
import pytest

from cluster.cli import add_parsers
from cluster.runtime_env import (
    BASE_ENV_VARS,
    REPO_ROOT,
    build_runtime_env,
    format_runtime_env,
    project_requirements,
    redact,
    redact_text,
    working_dir_excludes,
    working_dir_files,
)
from cluster.submit import api_url
from jobs.entrypoint import main as entrypoint_main
from jobs.submit import CONFIG_ENV_VAR, add_submit_parser, job_entrypoint
from tests.cluster.scores import write_scores


def test_default_runtime_env_uploads_the_code_and_pins_the_requirements() -> None:
    env = build_runtime_env()
    assert env["working_dir"] == str(REPO_ROOT)
    assert env["env_vars"] == BASE_ENV_VARS
    packages = env["pip"]["packages"]
    assert "torch==2.14.1" in packages and "pyarrow==26.0.1" in packages
    assert not any(p.lower().startswith("ray") for p in packages)  # the cluster's own Ray runs the job
    files = dict(working_dir_files(REPO_ROOT, env["excludes"]))
    assert "jobs/cli.py" in files and "jobs/entrypoint.py" in files and "pyproject.toml" in files
    assert not any(f.startswith((".venv/", ".git/", "tests/")) or "__pycache__" in f for f in files)
    assert sum(files.values()) < 20 * 2**20


def test_image_mode_has_no_working_dir_and_no_pip() -> None:
    env = build_runtime_env(image="ghcr.io/org/cascade-data:0.1.0", env_vars={"A": "1"})
    assert env == {"image_uri": "ghcr.io/org/cascade-data:0.1.0", "env_vars": {"A": "1", **BASE_ENV_VARS}}
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray 2.60 accepts it (it refuses working_dir or pip next to image_uri)
    RuntimeEnv(**build_runtime_env(pip=False))


@pytest.mark.parametrize(
    "name",
    ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "RAY_AUTH_TOKEN", "DB_PASSWORD"],
)
def test_credentials_are_refused_in_env_vars(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        build_runtime_env(env_vars={name: "x"})


def test_redaction_masks_secret_names_values_and_url_passwords() -> None:
    environ = {"AWS_SECRET_ACCESS_KEY": "s3cr3tvalue123", "HOME": "/home/me"}
    env = {"env_vars": {"MY_API_KEY": "k", "NOTE": "uses s3cr3tvalue123", "URL": "https://u:pw@host/x"}}
    shown = redact(env, environ)
    assert shown == {"env_vars": {"MY_API_KEY": "***", "NOTE": "uses ***", "URL": "https://u:***@host/x"}}
    assert redact_text("home /home/me", environ) == "home /home/me"


def test_printed_runtime_env_never_shows_this_process_secrets(monkeypatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "FAKE-very-secret-value")
    env = build_runtime_env(pip=False, env_vars={CONFIG_ENV_VAR: "endpoint: FAKE-very-secret-value"})
    assert "FAKE-very-secret-value" not in format_runtime_env(env)
    json.loads(format_runtime_env(env))


def test_big_files_are_left_out_and_a_huge_tree_is_refused(tmp_path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "code.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "blob.dat").write_bytes(b"\0" * (2 * 2**20))
    (tmp_path / "pkg" / "weights.safetensors").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning, match="blob.dat"):
        excludes = working_dir_excludes(tmp_path, max_file_mib=1)
    assert [f for f, _ in working_dir_files(tmp_path, excludes)] == ["pkg/code.py"]
    with pytest.raises(ValueError, match=r"largest files: pkg/blob.dat"):
        working_dir_excludes(tmp_path, max_file_mib=10, max_total_mib=1)


def test_requirements_come_from_pyproject(tmp_path) -> None:
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\ndependencies = ["ray[data]==2.60.0", "numpy>=2", "Ray==2.60.0", "raylib"]\n'
    )
    assert project_requirements(tmp_path / "pyproject.toml") == ["numpy>=2", "raylib"]


def test_addresses_and_entrypoint() -> None:
    assert api_url("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert api_url("https://ray.example.org/") == "https://ray.example.org"
    with pytest.raises(ValueError, match="http"):
        api_url("ray://head:10001")
    assert job_entrypoint("filter", ["rules=[{field: width, op: '>=', value: 5}]"]) == (
        "python -m jobs.entrypoint filter --set 'rules=[{field: width, op: '\"'\"'>='\"'\"', value: 5}]'"
    )


def test_entrypoint_runs_the_job_from_the_travelled_config(ray_local, tmp_path, monkeypatch, capsys) -> None:
    """What the cluster runs, run here: the config text in the environment becomes ``--config``."""
    write_scores(tmp_path / "scores" / "part-00000.parquet")
    text = f"scores_dir: {tmp_path / 'scores'}\noutput_dir: {tmp_path / 'x'}\nrules: [{{field: width, op: '<', value: 500}}]\n"
    monkeypatch.setenv(CONFIG_ENV_VAR, text)
    assert entrypoint_main(["filter", "--set", f"output_dir={tmp_path / 'kept'}"]) == 0
    assert pq.read_table(tmp_path / "kept" / "parquet")["key"].to_pylist() == ["tiny"]
    assert '"n_kept": 1' in capsys.readouterr().out


def test_cli_parsers() -> None:
    parser = argparse.ArgumentParser(prog="cascade")
    sub = parser.add_subparsers(dest="command", required=True)
    add_submit_parser(sub)
    add_parsers(sub)
    args = parser.parse_args(
        ["submit", "encode", "--config", "e.yaml", "--set", "a=1", "--no-pip", "--follow"]
    )
    assert (args.job, args.config, args.set, args.no_pip, args.follow, args.image) == (
        "encode", "e.yaml", ["a=1"], True, True, None,
    )  # fmt: skip
    args = parser.parse_args(["cluster", "logs", "raysubmit_1", "--follow", "--address", "http://h:8265"])
    assert (args.action, args.submission_id, args.follow, args.address) == (
        "logs",
        "raysubmit_1",
        True,
        "http://h:8265",
    )
    assert parser.parse_args(["cluster", "list"]).func.__name__ == "cmd_cluster"
