"""The demo's outputs, made once per session: ``test_demo`` checks them and ``test_app`` serves them."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class DemoRun:
    output: Path
    printed: str  # what the demo printed to stdout


@pytest.fixture(scope="session")
def demo_run(ray_local, tmp_path_factory) -> DemoRun:
    from jobs.cli import main

    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--output", str(out), "--steps", "6"]) == 0
    return DemoRun(out, printed.getvalue())
