"""The layout: our package names resolve to this repository, and imports only go one way.

``schemas ← stages ← pipelines ← jobs``; ``cluster`` stands apart (jobs may use it, never the reverse). Inside
``pipelines``, every job has its own sub-package over the shared ``core``; a job imports another job's
package only where its data comes from it (the report re-runs encode's steps and re-reads training crops).
"""

import ast
import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("stages", "pipelines", "schemas", "jobs", "cluster")
ALLOWED = {
    "schemas": {"schemas"},
    "stages": {"schemas", "stages"},
    "pipelines": {"schemas", "stages", "pipelines"},
    "jobs": {"schemas", "stages", "pipelines", "jobs", "cluster"},
    "cluster": {"cluster"},
}
JOB_PACKAGES = {
    "core": set(),
    "ingest": set(),
    "score": set(),
    "dedup": set(),
    "filter": set(),
    "encode": set(),
    "train_data": set(),
    "export": set(),
    "report": {"encode", "train_data"},
    "explore": {"filter"},  # the app's counts are filter's own rule code
}


def _imports(path: Path) -> set[str]:
    """Every absolute module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if n.split(".")[0] in PACKAGES}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_to_this_repository(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO_ROOT / name


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_one_way(package: str) -> None:
    offenders = [
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in sorted((REPO_ROOT / package).rglob("*.py"))
        for name in sorted(_ours(_imports(path)))
        if name.split(".")[0] not in ALLOWED[package]
    ]
    assert offenders == []


def test_pipelines_are_one_sub_package_per_job_over_a_shared_core() -> None:
    root = REPO_ROOT / "pipelines"
    assert sorted(p.name for p in root.glob("*.py")) == ["__init__.py"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(
        JOB_PACKAGES
    )
    offenders = []
    for job, may_use in JOB_PACKAGES.items():
        allowed = {"core", job} | may_use
        for path in sorted((root / job).rglob("*.py")):
            for name in sorted(_ours(_imports(path))):
                parts = name.split(".")
                if parts[0] == "pipelines" and len(parts) > 1 and parts[1] not in allowed:
                    offenders.append(f"{path.relative_to(REPO_ROOT)} imports {name}")
    assert offenders == []


def test_stages_never_imports_ray() -> None:
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "stages").rglob("*.py")
        if any(n == "ray" or n.startswith("ray.") for n in _imports(path))
    ]
    assert offenders == []
