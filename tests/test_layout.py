"""The top-level package names also exist on PyPI as unrelated projects: make sure ours are imported."""

import importlib
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = ("stages", "pipelines", "schemas", "jobs", "cluster")


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_to_this_repository(name: str) -> None:
    module = importlib.import_module(name)
    assert Path(module.__file__).resolve().parent == REPO_ROOT / name


def test_stages_never_imports_ray() -> None:
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "stages").rglob("*.py")
        if any(line.lstrip().startswith(("import ray", "from ray")) for line in path.read_text().splitlines())
    ]
    assert offenders == []
