"""The Ray ``runtime_env`` of a job submission: code, dependencies and environment — never credentials.

Two ways to get the project onto the cluster:

* **working_dir** (default): the repository root is zipped and uploaded with the job (Ray caps an upload at
  512 MiB; we refuse anything over ``MAX_WORKING_DIR_MIB``). Virtualenvs, git data, caches, tests, outputs
  and binary data files are excluded, as is every file over ``MAX_FILE_MIB``. Dependencies come from
  ``pip`` (the ``[project].dependencies`` of pyproject.toml, Ray itself left out: the cluster's Ray must be
  the one the job runs on) or, with ``pip=False``, from what the nodes already have installed.
* **image_uri**: the job runs in a container image that already holds the project and its dependencies.
  Ray 2.60 accepts only ``env_vars`` and ``config`` next to ``image_uri``, so there is no working_dir and
  no pip in that mode.

``env_vars`` always carry the offline switches of ``BASE_ENV_VARS``. Credentials (AWS keys, Ray auth
tokens, passwords) are refused: workers take them from the nodes' environment or instance role (IAM).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tomllib
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent

BASE_ENV_VARS: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}

# gitwildmatch patterns (Ray's syntax for ``excludes``): a leading "/" anchors at the root, a trailing "/"
# matches directories only. Ray also honours the repository's .gitignore.
WORKING_DIR_EXCLUDES: tuple[str, ...] = (
    ".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/", ".ruff_cache/",
    ".mypy_cache/", ".ipynb_checkpoints/", "/build/", "/dist/", "/out/", "/outputs/", "/runs/",
    "/tests/", "/benchmarks/results/",
    # data and weights belong in object storage, not in the code upload
    "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.bin", "*.onnx", "*.npy", "*.npz", "*.parquet",
    "*.tar", "*.tar.gz", "*.tgz", "*.zip", "*.jpg", "*.jpeg", "*.png", "*.webp",
)  # fmt: skip
MAX_FILE_MIB = 10
MAX_WORKING_DIR_MIB = 100

_SECRET_NAME = re.compile(
    r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|API_?KEY|ACCESS_KEY|SESSION_KEY", re.IGNORECASE
)
_URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+@", re.IGNORECASE)
REDACTED = "***"


def is_secret_name(name: str) -> bool:
    """Whether an environment variable or key name looks like a credential (``AWS_SECRET_ACCESS_KEY``)."""
    return bool(_SECRET_NAME.search(name))


def _secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named variables of this process (longest first), to scrub from printed text."""
    environ = os.environ if environ is None else environ
    values = {v for k, v in environ.items() if is_secret_name(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with URL passwords and the values of this process's secret variables replaced by ``***``."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + REDACTED + "@", text)
    for value in _secret_values(environ):
        text = text.replace(value, REDACTED)
    return text


def redact(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """A copy of ``value`` (dicts, lists, strings) with secret-named keys and known secret values masked."""
    if isinstance(value, Mapping):
        return {k: REDACTED if is_secret_name(str(k)) else redact(v, environ) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, environ) for v in value]
    if isinstance(value, str):
        return redact_text(value, environ)
    return value


def format_runtime_env(runtime_env: Mapping[str, Any]) -> str:
    """The runtime_env as indented JSON, safe to print or log (see ``redact``)."""
    return json.dumps(redact(runtime_env), indent=2, sort_keys=True)


_REQUIREMENT_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def project_table(pyproject: str | Path | None = None) -> dict[str, Any]:
    """The ``[project]`` table of pyproject.toml (default: this repository's)."""
    path = Path(pyproject) if pyproject is not None else REPO_ROOT / "pyproject.toml"
    with open(path, "rb") as f:
        return dict(tomllib.load(f).get("project", {}))


def requirement_name(requirement: str) -> str:
    """The distribution name of a requirement: ``ray`` from ``ray[data]==2.60.0`` (the text itself if odd)."""
    m = _REQUIREMENT_NAME.match(requirement)
    return m.group(1) if m else requirement.strip()


def dependency_names(pyproject: str | Path | None = None) -> list[str]:
    """The distribution names of ``[project].dependencies``, Ray included (``torch``, ``ray``, ...)."""
    return [requirement_name(d) for d in project_table(pyproject).get("dependencies", [])]


def project_requirements(pyproject: str | Path | None = None) -> list[str]:
    """``[project].dependencies`` of pyproject.toml without Ray (the cluster's own Ray runs the job)."""
    deps = project_table(pyproject).get("dependencies", [])
    return [d for d in deps if requirement_name(d).lower() != "ray"]


def _matches(rel: str, is_dir: bool, pattern: str) -> bool:
    """The subset of gitwildmatch used by ``WORKING_DIR_EXCLUDES`` (``*`` globs, ``/`` anchors)."""
    if pattern.endswith("/"):
        if not is_dir:
            return False
        pattern = pattern[:-1]
    if pattern.startswith("/") or "/" in pattern:
        return fnmatch.fnmatchcase(rel, pattern.lstrip("/"))
    return fnmatch.fnmatchcase(rel.rsplit("/", 1)[-1], pattern)


def working_dir_files(root: str | Path, excludes: Iterable[str]) -> list[tuple[str, int]]:
    """``(relative path, bytes)`` of every file under ``root`` that the excludes leave in the upload."""
    root, patterns = Path(root), list(excludes)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root).as_posix()
        base = "" if base == "." else base + "/"
        dirnames[:] = [d for d in dirnames if not any(_matches(base + d, True, p) for p in patterns)]
        for name in filenames:
            rel = base + name
            path = Path(dirpath) / name
            if path.is_symlink() or any(_matches(rel, False, p) for p in patterns):
                continue
            files.append((rel, path.stat().st_size))
    return sorted(files)


def working_dir_excludes(
    root: str | Path, extra: Iterable[str] = (), *, max_file_mib: float = MAX_FILE_MIB,
    max_total_mib: float = MAX_WORKING_DIR_MIB,
) -> list[str]:  # fmt: skip
    """The excludes for uploading ``root``: the defaults, ``extra``, and every file over ``max_file_mib``.

    Raises:
        ValueError: what remains is over ``max_total_mib`` (the message lists the largest files).
    """
    excludes = [*WORKING_DIR_EXCLUDES, *extra]
    files = working_dir_files(root, excludes)
    big = [(rel, size) for rel, size in files if size > max_file_mib * 2**20]
    if big:
        names = ", ".join(f"{rel} ({size / 2**20:.1f} MiB)" for rel, size in big)
        warnings.warn(f"left out of the job's working_dir (over {max_file_mib} MiB): {names}", stacklevel=2)
        excludes += ["/" + rel for rel, _ in big]
    kept = [(rel, size) for rel, size in files if size <= max_file_mib * 2**20]
    total = sum(size for _, size in kept)
    if total > max_total_mib * 2**20:
        largest = ", ".join(f"{r} ({s / 2**20:.1f} MiB)" for r, s in sorted(kept, key=lambda x: -x[1])[:5])
        raise ValueError(
            f"working_dir {root} would upload {total / 2**20:.0f} MiB (limit {max_total_mib} MiB); "
            f"largest files: {largest}. Move data to object storage or add excludes."
        )
    return excludes


def check_env_vars(env_vars: Mapping[str, str]) -> None:
    """Refuse credentials and non-string values in ``env_vars`` (ValueError naming the variable)."""
    for name, value in env_vars.items():
        if is_secret_name(name):
            raise ValueError(
                f"env_vars[{name!r}] looks like a credential; credentials never travel in a runtime_env: "
                "give the cluster nodes an instance role (IAM) or their own environment instead"
            )
        if not isinstance(value, str):
            raise ValueError(f"env_vars[{name!r}] must be a string, got {type(value).__name__}")


def build_runtime_env(
    *, image: str | None = None, pip: bool = True, env_vars: Mapping[str, str] | None = None,
    excludes: Iterable[str] = (), root: str | Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The runtime_env of a submission.

    Args:
        image: container image holding the project and its dependencies (Ray's ``image_uri``); then no
            working_dir and no pip (``pip`` is ignored: the image carries the dependencies).
        pip: install ``project_requirements()`` in a Ray-managed virtualenv on each node (cached per
            requirement set). False: the nodes already have them (e.g. the cluster launcher's setup).
        env_vars: more variables for the job (never credentials); ``BASE_ENV_VARS`` always apply.
        excludes: more gitwildmatch patterns to leave out of the working_dir upload.
        root: the source tree to upload (default: this repository).
    """
    env = dict(env_vars or {})
    check_env_vars(env)
    runtime_env: dict[str, Any] = {"env_vars": {**env, **BASE_ENV_VARS}}
    if image:
        runtime_env["image_uri"] = image
        return runtime_env
    root = Path(root) if root is not None else REPO_ROOT
    if not (root / "pyproject.toml").is_file() or not (root / "jobs").is_dir():
        raise ValueError(
            f"{root} is not a cascade-data source tree (no pyproject.toml and jobs/): submit from a "
            "checkout, or name an image that holds the project"
        )
    runtime_env["working_dir"] = str(root)
    runtime_env["excludes"] = working_dir_excludes(root, excludes)
    if pip:
        runtime_env["pip"] = {"packages": project_requirements(root / "pyproject.toml"), "pip_check": False}
    return runtime_env
