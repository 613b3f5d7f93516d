"""The `cascade` console script: flavors and doctor, run as a user would."""

from __future__ import annotations

import subprocess
import sys

import pytest

from jobs.cli import main


def test_flavors_lists_exact_counts(capsys) -> None:
    assert main(["flavors"]) == 0
    out = capsys.readouterr().out
    assert "stage_c/3.6b                        3,589,103,632  stage_c_bf16.safetensors" in out
    assert "effnet/tiny" in out and "random init only" in out


def test_flavors_unknown_family_exits_2(capsys) -> None:
    assert main(["flavors", "--family", "stage_d"]) == 2
    assert "unknown family 'stage_d'" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_doctor_runs_as_console_script() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "doctor"], capture_output=True, text=True, timeout=170, check=False
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "torch " in out and "ray " in out and "cuda: " in out
    assert "ray: ok at local" in out, out
    assert "stage_b/700m" in out and "699,471,248" in out
