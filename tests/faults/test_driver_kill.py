"""Driver killed mid-job (SIGKILL of the ``cascade`` process group and its local Ray), then the job again with
other batch sizes and concurrency: the output holds every key exactly once, as an uninterrupted run's does (a
rerun of a finished job changes nothing: tests/pipelines/test_scale.py). Encode has its own test
(tests/pipelines/test_encode.py); training resumes exactly (tests/jobs/test_train.py); the report is one commit
unit (tests/pipelines/test_report.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from tests.conftest import REPO_ROOT
from tests.pipelines.photos import photo_shards
from tests.processes import kill_marked_processes

N_SHARDS = 12


def cascade(job: str, *sets: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", job, *(a for s in sets for a in ("--set", s))]


def kill_when(command: list[str], started, timeout: float = 240) -> None:
    """Start ``command`` on its own local Ray, SIGKILL it (and that Ray) once ``started()`` is true."""
    ray_tmp = tempfile.mkdtemp(prefix="raydk", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    proc = subprocess.Popen(command, cwd=REPO_ROOT, env=os.environ | {"RAY_TMPDIR": ray_tmp, "RAY_ADDRESS": ""},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.monotonic() + timeout
    while not started():
        assert proc.poll() is None, (
            "the job ended before it was killed: " + proc.stderr.read().decode()[-2000:]
        )
        assert time.monotonic() < deadline, "the job never started writing"
        time.sleep(0.01)
    kill_marked_processes(f"RAY_TMPDIR={ray_tmp}")  # the driver, its raylet and workers: all carry the marker
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def rerun(command: list[str]) -> None:
    done = subprocess.run(command, cwd=REPO_ROOT, env=os.environ | {"RAY_ADDRESS": ""}, capture_output=True,
                          text=True, timeout=300, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def keys(folder: Path, pattern: str) -> list[str]:
    files = sorted(folder.glob(pattern))
    return pads.dataset(files).to_table(columns=["key"])["key"].to_pylist() if files else []


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, set[str]]:
    src = tmp_path_factory.mktemp("driver_kill") / "src"
    expected = photo_shards(src, N_SHARDS)
    return src, expected


@pytest.mark.slow  # 140 s; the default run keeps export's driver kill (and the node and S3 faults)
@pytest.mark.timeout(600)
def test_ingest_then_score_killed_and_rerun_write_every_key_once(source, tmp_path) -> None:
    src, expected = source
    shards, scores = tmp_path / "shards", tmp_path / "scores"
    ingest = cascade("ingest", "existing.source.kind=webdataset", f"existing.source.path={src}",
                     f"existing.output_dir={shards}", "existing.resources.concurrency=1")  # fmt: skip
    kill_when(ingest, lambda: any(shards.glob("*.tar")))
    assert len(list(shards.glob("*.tar"))) < N_SHARDS and not (shards / "manifest.json").exists()
    rerun([*ingest, "--set", "existing.resources.concurrency=2"])
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"{s:05d}.tar" for s in range(N_SHARDS)]
    ingested = keys(shards, "*.parquet")  # img2dataset status rows, one per sample
    assert len(ingested) == len(set(ingested)) and set(ingested) == expected
    score = cascade("score", "shards.kind=webdataset", f"shards.path={shards}", f"output_dir={scores}",
                    "scorer.flavor=clip_score/tiny", "score_resources.batch_size=5", "write_resources.batch_size=5",
                    "read_resources.concurrency=1")  # fmt: skip
    kill_when(score, lambda: any(scores.glob("parquet/*.parquet")))
    assert len(keys(scores, "parquet/*.parquet")) < len(expected)
    other = ["--set", "score_resources.batch_size=3", "--set", "write_resources.batch_size=7",
             "--set", "read_resources.concurrency=2"]  # fmt: skip
    rerun([*score, *other])
    scored = keys(scores, "parquet/*.parquet")
    assert len(scored) == len(set(scored)), "a key was scored twice"
    assert set(scored) == expected
    kept = tmp_path / "kept"
    rules = "rules=[{field: key, op: 'not in', value: [s0_chelsea, s1_rocket]}]"
    run_filter = cascade(
        "filter", f"scores_dir={scores}", f"output_dir={kept}", rules, "resources.concurrency=1"
    )
    kill_when(run_filter, lambda: any(kept.glob("_commits/0*.json")))  # a shard's record
    assert not (kept / "manifest.json").exists()
    rerun([*run_filter, "--set", "resources.concurrency=4"])
    filtered = keys(kept, "parquet/*.parquet")
    assert len(filtered) == len(set(filtered)) and set(filtered) == expected - {"s0_chelsea", "s1_rocket"}


@pytest.mark.slow  # 56 s; the default run kills dedup's driver (tests/pipelines/test_dedup.py), same commit path
@pytest.mark.timeout(300)
def test_export_killed_and_rerun_lists_every_row_once(tmp_path) -> None:
    """A cache at the released tensor shapes (large enough for the export to take seconds), exported in
    8-row files; the export is killed after its first file, rerun, and then holds each key once."""
    import json

    from pipelines.core.latents_io import to_latent_table, write_latent_files
    from tests.pipelines.test_latents_io import META, latent_rows

    shapes = {
        "effnet": (16, 24, 24),
        "clip_text": (77, 1280),
        "clip_text_pooled": (1, 1280),
        "clip_img": (768,),
    }
    cache, out = tmp_path / "cache", tmp_path / "export"
    expected = []
    for f in range(4):
        rows = latent_rows(shapes, 96, seed=f)
        expected += rows["key"]
        write_latent_files(
            to_latent_table(rows, "float16", META), str(cache), f"{f:05d}_24x24", formats=("parquet",)
        )
    export = cascade("export", f"latents={cache}", f"output_dir={out}", "rows_per_file=8", "dtype=float32")
    kill_when(export, lambda: any(out.glob("24x24/part-*.parquet")), timeout=120)
    assert not (out / "export_manifest.json").exists()
    assert len(list(out.glob("_commits/0*.json"))) < 4
    rerun([*export, "--set", "resources.concurrency=1"])
    manifest = json.loads((out / "export_manifest.json").read_text())
    files = sorted(p.relative_to(out).as_posix() for p in out.glob("*/part-*"))
    assert files == sorted(manifest["files"]) and len(files) == len(expected) // 8
    exported = keys(out, "24x24/part-*.parquet")
    assert len(exported) == len(set(exported)) and sorted(exported) == sorted(expected)
