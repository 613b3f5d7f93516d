"""`cascade ingest`, `cascade score` and `cascade filter` run from YAML, as a user would."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from jobs.cli import main
from tests.pipelines.photos import PHOTOS, photo_tar


def test_ingest_score_filter_from_yaml(ray_local, tmp_path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "photos.tar").write_bytes(photo_tar())
    (tmp_path / "ingest.yaml").write_text(
        f"existing:\n  source: {{kind: webdataset, path: {src}}}\n  output_dir: {tmp_path / 'shards'}\n"
    )
    assert main(["ingest", "--config", str(tmp_path / "ingest.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["n_samples"] == len(PHOTOS)
    score_args = ["score", "--set", "shards.kind=webdataset", "--set", f"shards.path={tmp_path / 'shards'}",
                  "--set", f"output_dir={tmp_path / 'scores'}", "--set", "scorer.flavor=clip_score/tiny"]  # fmt: skip
    assert main(score_args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n_scored"] == len(PHOTOS)
    lines = captured.err.splitlines()
    assert lines[0].startswith("cascade: RANDOM WEIGHTS: scorer.flavor=clip_score/tiny"), lines
    # quiet by default: the job's own lines (its progress) and nothing from Ray or the libraries
    assert all(line.startswith(("cascade: ", "score: ")) for line in lines), lines
    assert lines[-1].startswith(f"score: 1/1 shards, {len(PHOTOS)} samples")
    (tmp_path / "filter.yaml").write_text(
        f"scores_dir: {tmp_path / 'scores'}\noutput_dir: {tmp_path / 'kept'}\n"
        "rules:\n  - {field: width, op: '>=', value: 500}\n"
    )
    assert main(["filter", "--config", str(tmp_path / "filter.yaml")]) == 0
    kept = set(pq.read_table(tmp_path / "kept" / "parquet")["key"].to_pylist())
    assert kept == {"astronaut", "rocket", "coffee", "camera"}  # chelsea is 451 px wide


def test_bad_config_exits_2_before_ray(capsys) -> None:
    assert (
        main(["score", "--set", "shards.kind=webdataset", "--set", "shards.path=x", "--set", "output_dir=y"])
        == 2
    )
    assert "missing required config field(s): scorer" in capsys.readouterr().err
    assert main(["ingest", "--set", "existing.output_dir=y"]) == 2
    assert "missing required config field(s): existing.source" in capsys.readouterr().err
