"""``cascade demo``: the eight jobs on the bundled photos (three of them planted copies), end to end on the session's local Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.demo import PHOTOS, RELEASED, SCORER_FILES, DemoConfig, demo_jobs


def test_bundled_photos_have_captions_and_licences() -> None:
    photos = sorted(PHOTOS.glob("*.jpg"))
    assert len(photos) == 12  # 9 photos and 3 planted copies
    licences = {
        line.split("`")[1]: line
        for line in (PHOTOS / "README.md").read_text().splitlines()
        if line.startswith("- `")
    }
    assert sorted(licences) == sorted(p.name for p in photos)
    for photo in photos:
        assert photo.with_suffix(".txt").read_text().strip()
        assert "CC0" in licences[photo.name] or "public domain" in licences[photo.name], licences[photo.name]
    assert sum(p.stat().st_size for p in PHOTOS.iterdir()) < 1_000_000


def test_demo_runs_every_job_and_prints_where_outputs_are(demo_run) -> None:
    out, printed = demo_run.output, demo_run.printed
    assert "SEEDED RANDOM WEIGHTS" in printed and "random weights" in printed
    for i, name in enumerate(("ingest", "score", "dedup", "filter", "encode", "train-c", "export", "report"), 1):
        assert f"[{i}/8] {name}" in printed
    assert "3 duplicate(s): 1 exact, 2 perceptual" in printed
    dropped = json.loads((out / "filtered" / "filter_report.json").read_text())["dropped_by_dedup_kind"]
    assert dropped == {"exact": 1, "perceptual": 2}
    where = dict(
        line.split()[:2]
        for line in printed.split("outputs:")[1].strip().splitlines()
        if line.strip()[:1].isalpha() and len(line.split()) == 2
    )
    assert Path(where["train-c"]).name == "checkpoint_00000006"
    assert (Path(where["train-c"]) / "generator.safetensors").is_file()
    manifest = json.loads((out / "latents" / "manifest.json").read_text())
    assert (
        manifest["summary"]["n_encoded"] == 9 and manifest["preprocessing"]["clip_image_source"] == "scores"
    )
    assert manifest["random_weights"] is True  # every output says so: manifests too
    assert json.loads((out / "scores" / "manifest.json").read_text())["random_weights"] is True
    assert sum(pq.read_table(p).num_rows for p in (out / "export").glob("*/*.parquet")) == 9
    report = json.loads((Path(where["report"]).parent / "report.json").read_text())
    assert report["random_weights"] and len(report["samples"]) == 9 and not report["rejects"]
    assert Path(where["report"]).is_file() and where["ingest"] == str(out / "shards")
    assert f"cascade app {out.resolve()} --tiny" in printed  # the app opens on these outputs


def test_weights_dir_switches_every_stage_to_released_files(tmp_path) -> None:
    from stages.flavors import get_flavor

    for flavor in RELEASED.values():
        name = get_flavor(flavor).files[0]
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        if flavor.startswith("clip_"):
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_bytes(b"")
    for names in SCORER_FILES.values():
        (tmp_path / names[0]).write_bytes(b"")
    jobs = dict(demo_jobs(DemoConfig(weights=str(tmp_path), output_dir=str(tmp_path / "out"))))
    assert jobs["encode"].effnet.flavor == "effnet" and jobs["encode"].effnet.weights.endswith(
        "effnet_encoder.safetensors"
    )
    assert jobs["encode"].clip_text.weights.endswith("text_encoder")
    assert jobs["encode"].clip_image.weights.endswith("image_encoder")
    assert jobs["encode"].preprocess.image_size_px == 768
    assert jobs["train-c"].flavor == "stage_c/1b" and jobs["train-c"].weights.endswith(
        "stage_c_lite_bf16.safetensors"
    )
    assert jobs["train-c"].preview.previewer_weights.endswith("previewer.safetensors")
    assert jobs["report"].reconstruct.stage_b.weights.endswith("stage_b_lite_bf16.safetensors")
    assert jobs["report"].reconstruct.stage_a.weights.endswith("stage_a.safetensors")
    assert jobs["score"].scorer.flavor == "clip_score/l14"
    assert any(r.field == "aesthetic_score" for r in jobs["filter"].rules)


def test_missing_released_files_are_listed_before_any_work(tmp_path, capsys) -> None:
    (tmp_path / "stage_a.safetensors").write_bytes(b"")
    assert main(["demo", "--weights", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "stage_c_lite_bf16.safetensors" in err and "open_clip_model.safetensors" in err
    assert "stage_a.safetensors" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="train_steps"):
        DemoConfig(train_steps=0)
