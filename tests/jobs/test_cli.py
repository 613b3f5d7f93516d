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


@pytest.mark.slow  # 32 s (it starts a local Ray); the console script itself runs by default in tests/cluster/test_probe.py
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


def test_train_help_lists_the_config_fields_with_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train-lora", "--help"])
    out = capsys.readouterr().out
    for line in ("lr (float) = 0.0001", "grad_clip (float) = 1.0", "lora.rank (int) = 4",
                 "data.path (str) = (required)", "scaling.strategy (str) = 'ddp'", "ema.beta (float) = 0.9"):  # fmt: skip
        assert line in out, line


def test_train_bad_config_exits_2_naming_the_field_before_ray(tmp_path, capsys) -> None:
    import time

    (tmp_path / "cache").mkdir()
    started = time.perf_counter()
    code = main(["train-c", "--set", f"data.path={tmp_path / 'cache'}", "--set", f"output_dir={tmp_path / 'out'}",
                 "--set", "flavor=stage_c/2b"])  # fmt: skip
    assert code == 2
    assert "flavor: unknown flavor 'stage_c/2b'" in capsys.readouterr().err
    code = main(["train-c", "--set", f"data.path={tmp_path / 'cache'}", "--set", f"output_dir={tmp_path / 'out'}",
                 "--set", "flavor=stage_c/tiny"])  # fmt: skip
    assert code == 2
    assert "data.path: no *.parquet latent files" in capsys.readouterr().err
    assert time.perf_counter() - started < 5, (
        "the checks ran before Ray starts (ray.init alone takes seconds)"
    )
    # the job's mode is fixed: train-lora trains a LoRA whatever the YAML says
    from jobs.config import load_config
    from jobs.pipeline_jobs import JOBS

    job = JOBS["train-lora"]
    config = load_config(
        job.config_cls,
        None,
        ["data.path=x", "output_dir=y", "mode=stage_c", "flavor=stage_c/tiny", *job.fixed],
    )
    assert config.mode == "lora" and config.run_name == "lora"
