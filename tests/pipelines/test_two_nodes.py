"""A 2-node Ray cluster gives output identical to a single node."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.dataset as pads
import pytest

from pipelines.core.sources import SourceConfig
from pipelines.ingest.existing import IngestConfig, run_ingest
from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score
from tests.conftest import REPO_ROOT
from tests.pipelines import corrupt
from tests.pipelines.test_ingest import _photo_tar


def _scores(directory) -> list[dict]:
    """Score rows by key, without ``source`` (it names the run's own shard directory)."""
    table = pads.dataset(directory / "parquet").to_table().drop_columns(["source"])
    return sorted(table.to_pylist(), key=lambda r: r["key"])


@pytest.mark.slow  # 50 s; tests/faults/test_node_faults.py runs a two-node cluster by default
@pytest.mark.timeout(300)
def test_two_nodes_match_one_node(ray_local, tmp_path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.tar").write_bytes(_photo_tar())
    (src / "b.tar").write_bytes(corrupt.samples_tar())
    single = tmp_path / "single"
    run_ingest(
        IngestConfig(source=SourceConfig(kind="webdataset", path=str(src)), output_dir=str(single / "shards"))
    )
    run_score(ScoreConfig(shards=SourceConfig(kind="webdataset", path=str(single / "shards")),
                          output_dir=str(single / "scores"), scorer=ScorerConfig(flavor="clip_score/tiny")))  # fmt: skip
    multi = tmp_path / "multi"
    result = subprocess.run([sys.executable, "-m", "tests.pipelines.two_node", str(src), str(multi)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=280, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("00000.tar", "00001.tar", "00000.parquet", "00001.parquet", "rejects/00001.parquet"):
        assert (single / "shards" / name).read_bytes() == (multi / "shards" / name).read_bytes(), name
    one, two = _scores(single / "scores"), _scores(multi / "scores")
    assert [r["key"] for r in one] == [r["key"] for r in two] and len(one) == 13
    for a, b in zip(one, two, strict=True):  # batches may group differently: allow float rounding only
        assert _close(a, b), a["key"]


def _close(a: dict, b: dict) -> bool:
    for column, value in a.items():
        other = b[column]
        if isinstance(value, list):
            if max(abs(x - y) for x, y in zip(value, other, strict=True)) > 1e-5:
                return False
        elif isinstance(value, float):
            if not (value == pytest.approx(other, abs=1e-5) or (value != value and other != other)):
                return False
        elif value != other:
            return False
    return True
