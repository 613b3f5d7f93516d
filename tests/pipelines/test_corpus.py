"""Every image kind, through ingest → score → encode, from each source kind: every file is accounted for, and
each sample gets the same decision and reason whether it came from a WebDataset tar, a Parquet file or a
folder (``tests/pipelines/corpus.py``). One local Ray, tiny models."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections import Counter, defaultdict

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.core.latents_reader import read_latents
from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.shards import safe_key
from pipelines.core.sources import SourceConfig
from pipelines.core.step import Resources
from pipelines.core.validate import ValidateConfig
from pipelines.encode.models import EncoderConfig
from pipelines.encode.pipeline import EncodeConfig, run_encode
from pipelines.ingest.existing import IngestConfig, run_ingest
from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score
from tests.pipelines import corpus

KINDS = ("webdataset", "parquet", "folder")
VALIDATE = ValidateConfig(allow_empty_caption=True)
SMALL = Resources(num_cpus=0.25, batch_size=16)


def _source(kind: str, root) -> SourceConfig:
    if kind == "webdataset":
        return SourceConfig(kind=kind, path=str(corpus.write_webdataset(root / "src-wds")))
    if kind == "parquet":
        path = corpus.write_parquet(root / "src-parquet")
        return SourceConfig(
            kind=kind, path=str(path), image_column="jpg", caption_column="text", key_column="id"
        )
    return SourceConfig(kind=kind, path=str(corpus.write_folder(root / "src-folder")))


@pytest.fixture(scope="module")
def run(ray_local, tmp_path_factory):
    """Ingest the corpus from each source kind; score the three ingested shards in one job (``<kind>.tar``);
    encode the WebDataset one."""
    root = tmp_path_factory.mktemp("corpus")
    ingested = {}
    for kind in KINDS:
        out = root / f"shards-{kind}"
        summary = run_ingest(IngestConfig(source=_source(kind, root), output_dir=str(out), validate=VALIDATE))
        ingested[kind] = (out, summary)
        (root / "to-score").mkdir(exist_ok=True)
        shutil.copyfile(out / "00000.tar", root / "to-score" / f"{kind}.tar")
    scores = root / "scores"
    scored = run_score(
        ScoreConfig(
            shards=SourceConfig(kind="webdataset", path=str(root / "to-score")), output_dir=str(scores),
            scorer=ScorerConfig(flavor="clip_score/tiny"), score_resources=SMALL,
        )
    ), {kind: pq.read_table(scores / "parquet" / f"{kind}.parquet") for kind in KINDS}  # fmt: skip
    latents = root / "latents"
    encoded = run_encode(
        EncodeConfig(
            shards=SourceConfig(kind="webdataset", path=str(ingested["webdataset"][0])),
            output_dir=str(latents), validate=VALIDATE, preprocess=PreprocessConfig(image_size_px=64, ratios=("1",)),
            effnet=EncoderConfig(flavor="effnet/tiny"), clip_text=EncoderConfig(flavor="clip_text/tiny"),
            clip_image=EncoderConfig(flavor="clip_vision/tiny"), formats=("parquet",),
            preprocess_resources=SMALL, effnet_resources=SMALL, clip_text_resources=SMALL,
            clip_image_resources=SMALL, write_resources=SMALL,
        )
    )  # fmt: skip
    return root, ingested, scored, (latents, encoded)


def _status(out) -> list[dict]:
    return pq.read_table(out / "00000.parquet").to_pylist()


def _decisions(rows: list[dict]) -> dict[str, list[str]]:
    """key -> the reject reason of each of its rows, in order ("" for a sample)."""
    out: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        out[row["key"]].append(row["reject_reason"])
    return dict(out)


def test_every_sample_gets_its_outcome_in_every_source_kind(run) -> None:
    _, ingested, _, _ = run
    expected: dict[str, list[str]] = defaultdict(list)
    for case in corpus.cases():
        expected[case.key].append(case.reason)
    decisions = {kind: _decisions(_status(out)) for kind, (out, _) in ingested.items()}
    folder_only = {k: decisions["folder"].pop(k) for k in corpus.FOLDER_ONLY}
    assert folder_only == {k: [reason] for k, reason in corpus.FOLDER_ONLY.items()}
    for kind in KINDS:
        assert decisions[kind] == dict(expected), kind
    # the same reasons, hence the same counts, whatever the source kind
    reasons = {kind: summary.reject_reasons for kind, (_, summary) in ingested.items()}
    folder_extra = Counter(corpus.FOLDER_ONLY.values())
    assert reasons["webdataset"] == reasons["parquet"] == dict(Counter(reasons["folder"]) - folder_extra)


def test_accepted_samples_keep_their_bytes_size_and_caption(run) -> None:
    _, ingested, _, _ = run
    for kind, (out, _) in ingested.items():
        rows = {r["key"]: r for r in _status(out) if r["status"] == "success"}
        assert set(rows) == set(corpus.accepted()), kind
        for key, case in corpus.accepted().items():
            row = rows[key]
            assert (row["width"], row["height"]) == case.size, (kind, key)
            assert row["caption"] == (case.caption or ""), (kind, key)  # caption-less: the empty caption
        with tarfile.open(out / "00000.tar") as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for key, case in corpus.accepted().items():
            (image,) = [v for n, v in members.items() if n.split(".")[0] == safe_key(key) and n.split(".")[1]
                        not in ("txt", "json")]  # fmt: skip
            assert image == case.image, (kind, key)  # originals, untouched
        assert members[f"{safe_key('caption_less')}.txt"] == b""


def test_every_folder_file_is_accounted_for(run) -> None:
    root, ingested, _, _ = run
    _, summary = ingested["folder"]
    files = corpus.folder_files(root / "src-folder")
    manifest = json.loads((ingested["folder"][0] / "manifest.json").read_text())["totals"]
    sidecars = [p for p in files if p.suffix in (".txt", ".json") and p.stem not in ("orphan",)]
    assert (summary.n_files, summary.n_sidecars) == (len(files), len(sidecars))
    assert summary.n_files == summary.n_input + summary.n_sidecars
    assert (
        summary.n_input
        == summary.n_samples + summary.n_rejected
        == len(corpus.cases()) + len(corpus.FOLDER_ONLY)
    )
    assert (manifest["n_files"], manifest["n_sidecars"], manifest["n_input"]) == (
        summary.n_files, summary.n_sidecars, summary.n_input,
    )  # fmt: skip
    for kind in ("webdataset", "parquet"):
        other = ingested[kind][1]
        assert other.n_input == other.n_samples + other.n_rejected == len(corpus.cases())
        assert other.n_samples == summary.n_samples == len(corpus.accepted())


def test_img2dataset_columns_and_stats(run) -> None:
    _, ingested, _, _ = run
    out, summary = ingested["folder"]
    status = pq.read_table(out / "00000.parquet")
    img2dataset = ["key", "url", "caption", "status", "error_message", "width", "height", "original_width",
                   "original_height", "exif", "sha256"]  # fmt: skip
    assert status.column_names[: len(img2dataset)] == img2dataset
    rows = status.to_pylist()
    rotated = next(r for r in rows if r["key"] == "jpeg_exif_rotated")
    assert json.loads(rotated["exif"])["Image Orientation"] == "Rotated 90 CW"
    assert (rotated["original_width"], rotated["original_height"]) == (48, 64)
    failed = next(r for r in rows if r["key"] == "pcx")
    assert (failed["status"], failed["error_message"]) == ("failed_to_resize", corpus.NOT_ALLOWED)
    bin_file = next(r for r in rows if r["key"] == "notes.bin")
    assert bin_file["status"] == "failed_to_download"  # could not be read as a sample
    stats = json.loads((out / "00000_stats.json").read_text())
    assert {"count", "successes", "failed_to_download", "failed_to_resize", "duration", "status_dict"} <= set(
        stats
    )
    assert stats["count"] == stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"]
    assert (stats["count"], stats["successes"]) == (summary.n_input, summary.n_samples)
    assert stats["status_dict"]["success"] == summary.n_samples
    assert stats["status_dict"][corpus.NOT_ALLOWED] == 1 and stats["duration"] == 0.0  # deterministic bytes
    ok = next(r for r in rows if r["key"] == "avif")
    assert ok["sha256"] == hashlib.sha256(corpus.accepted()["avif"].image).hexdigest()
    assert ok["status"] == "success" and ok["error_message"] is None and ok["image_format"] == "avif"
    with tarfile.open(out / "00000.tar") as tar:
        sample = json.loads(tar.extractfile("avif.json").read())
    assert {k: sample[k] for k in img2dataset} == {k: ok[k] for k in img2dataset}


def test_score_accepts_every_ingested_sample(run) -> None:
    _, _, (summary, tables), _ = run
    expected = {safe_key(k) for k in corpus.accepted()}
    assert (summary.n_scored, summary.n_rejected) == (len(KINDS) * len(expected), 0), summary.reject_reasons
    for kind, table in tables.items():
        assert set(table["key"].to_pylist()) == expected, kind
        sizes = {
            k: (w, h)
            for k, w, h in zip(*(table[c].to_pylist() for c in ("key", "width", "height")), strict=True)
        }
        assert sizes == {safe_key(k): c.size for k, c in corpus.accepted().items()}, kind


def test_encode_gives_caption_less_samples_the_stored_empty_caption(run) -> None:
    from safetensors.numpy import load_file

    _, _, _, (latents, summary) = run
    assert (summary.n_encoded, summary.n_rejected) == (len(corpus.accepted()), 0)
    rows = {}
    for batch in read_latents(str(latents), "parquet"):
        for i, key in enumerate(batch["key"]):
            rows[key] = {
                c: np.asarray(v[i]) for c, v in batch.items() if c in ("clip_text", "clip_text_pooled")
            }
    assert set(rows) == {safe_key(k) for k in corpus.accepted()}
    empty = load_file(str(latents / "empty_caption.safetensors"))
    row = rows["caption_less"]
    for column in ("clip_text", "clip_text_pooled"):
        stored = empty[column].astype(row[column].dtype).reshape(row[column].shape)
        np.testing.assert_array_equal(row[column], stored, err_msg=column)
    assert not np.array_equal(rows["jpeg_rgb"]["clip_text"], row["clip_text"])  # a captioned sample differs
