"""Faults on a 3-node Ray cluster: a worker node dies mid-job, and the job still writes every key exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.core.latents_reader import list_latent_files
from tests.conftest import REPO_ROOT
from tests.pipelines.photos import photo_shards

N_SHARDS = 8


def run_with_node_kill(job: str, shards: Path, out: Path) -> dict:
    """Run the job in a subprocess on a 3-node cluster that loses a worker node mid-job."""
    result = subprocess.run([sys.executable, "-m", "tests.faults.node_kill", job, str(shards), str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=420, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("NODE_KILL_RESULT "))
    report = json.loads(line.removeprefix("NODE_KILL_RESULT "))
    assert report["killed_at"] is not None and report["killed_at"] < report["finished_at"], report
    assert report["alive"] == 2
    if job == "encode":  # killed mid-job: parts staged, not every shard committed
        assert report["done_before"] < N_SHARDS, report
    return report


@pytest.mark.timeout(480)
# score and encode commit through the same run_and_commit; score's driver kill is in tests/faults/test_driver_kill.py
@pytest.mark.slow  # 144 s per job; by default killed workers are tested in dedup, training and the S3 outage test
@pytest.mark.parametrize("job", ["encode", "score"])
def test_worker_node_killed_mid_job_every_key_once(job, tmp_path) -> None:
    keys = photo_shards(tmp_path / "shards", N_SHARDS)
    out = tmp_path / job
    run_with_node_kill(job, tmp_path / "shards", out)
    if job == "encode":
        files = list_latent_files(str(out), "parquet")
        written = [k for f in files for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
        assert json.loads((out / "manifest.json").read_text())["summary"]["n_encoded"] == len(keys)
    else:
        written = pq.read_table(out / "parquet", columns=["key"])["key"].to_pylist()
        assert json.loads((out / "manifest.json").read_text())["totals"]["n_written"] == len(keys)
    assert len(written) == len(set(written)), "a key was written twice"
    assert set(written) == keys
