"""The README's example configs are real: each ``# <job>.yaml`` block loads into its job's config class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.config import load_config
from jobs.pipeline_jobs import JOBS

README = Path(__file__).resolve().parents[2] / "README.md"
BLOCKS = re.findall(r"```yaml\n# ([\w-]+)\.yaml[^\n]*\n(.*?)```", README.read_text(), flags=re.S)


def test_every_job_has_an_example() -> None:
    names = {name.split("-urls")[0] for name, _ in BLOCKS}
    assert names >= {"ingest", "score", "dedup", "filter", "encode", "train-c", "train-b", "export", "report"}


@pytest.mark.parametrize(("name", "body"), BLOCKS, ids=[name for name, _ in BLOCKS])
def test_readme_config_loads(name, body, tmp_path) -> None:
    job = JOBS["ingest" if name.startswith("ingest") else name]
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    config = load_config(job.config_cls, path, job.fixed)
    assert type(config) is job.config_cls
