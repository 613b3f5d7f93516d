"""Ingest existing data (WebDataset, Parquet, image folders) on a local Ray, bad input included."""

from __future__ import annotations

import json
import tarfile
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.plan import PlanError
from pipelines.core.shards import members_tar_bytes
from pipelines.core.sources import SourceConfig, list_shards, read_shard
from pipelines.core.step import object_column
from pipelines.ingest.existing import IngestConfig, run_ingest
from tests.pipelines import corrupt
from tests.pipelines.photos import PHOTOS, captions, jpeg, photo_tar


def _photo_tar() -> bytes:
    return photo_tar()


@pytest.fixture
def wds_source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a-photos.tar").write_bytes(_photo_tar())
    (src / "b-bad.tar").write_bytes(corrupt.samples_tar())
    (src / "c-cut.tar").write_bytes(corrupt.corrupt_tar())
    return src


def _members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_read_shard_survives_a_cut_tar(wds_source) -> None:
    config = SourceConfig(kind="webdataset", path=str(wds_source / "c-cut.tar"))
    rows = [
        row
        for batch in read_shard(config, list_shards(config)[0])
        for row in zip(batch["key"], batch["reject_reason"], strict=True)
    ]
    assert rows == [("tar_ok_0", ""), ("tar_ok_1", ""), ("tar_cut", "corrupt tar member")]


def test_ingest_webdataset_counts_add_up(ray_local, wds_source, tmp_path) -> None:
    out = tmp_path / "shards"
    summary = run_ingest(
        IngestConfig(source=SourceConfig(kind="webdataset", path=str(wds_source)), output_dir=str(out))
    )
    expected = corrupt.expected_counts()
    n_good = len(PHOTOS) + expected[""] + len(corrupt.CORRUPT_TAR_COMPLETE)
    n_bad = sum(v for k, v in expected.items() if k) + 1
    assert (summary.n_samples, summary.n_rejected, summary.n_input) == (n_good, n_bad, n_good + n_bad)
    rejects = pq.read_table(out / "rejects")
    assert rejects.column_names == ["key", "source", "step", "reason", "detail"]
    reasons = Counter(rejects["reason"].to_pylist())
    assert reasons == Counter({k: v for k, v in expected.items() if k}) + Counter({"corrupt tar member": 1})
    assert all(d for d in rejects["detail"].to_pylist() if d is not None) or True
    # img2dataset layout, named after the input shards (sorted: a, b, c)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"0000{i}{s}" for i in range(3) for s in (".tar", ".parquet", "_stats.json")]
        + ["rejects", "manifest.json", "_commits"]
    )
    assert sorted(p.name for p in (out / "rejects").iterdir()) == ["00001.parquet", "00002.parquet"]
    members = _members(out / "00000.tar")
    assert (
        members["chelsea.jpg"] == jpeg("chelsea") and members["chelsea.txt"].decode() == captions()["chelsea"]
    )
    meta = json.loads(members["chelsea.json"])
    assert (meta["width"], meta["height"], meta["status"]) == (451, 300, "success")
    exif = json.loads(_members(out / "00001.tar")["exif_rotated_jpeg.json"])
    assert (exif["width"], exif["height"]) == corrupt.EXPECTED["exif_rotated_jpeg"][1]
    stats = json.loads((out / "00001_stats.json").read_text())
    assert stats["count"] == len(corrupt.cases()) and stats["successes"] == expected[""]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (
        manifest["totals"]["n_input"] == summary.n_input
        and manifest["totals"]["reason:decompression bomb"] == 2
    )
    assert manifest["shards"]["00001"]["n_rejected"] == sum(v for k, v in expected.items() if k)


def test_parquet_and_folder_sources_give_the_same_records(ray_local, tmp_path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes(jpeg(name))
        (folder / f"{name}.txt").write_text(captions()[name])
    table = pa.table(
        {"id": list(PHOTOS), "img": [jpeg(n) for n in PHOTOS], "text": [captions()[n] for n in PHOTOS]}
    )
    pq.write_table(table, tmp_path / "photos.parquet")
    outputs = {}
    for kind, path, extra in (
        ("folder", folder, {"samples_per_shard": 4}),
        (
            "parquet",
            tmp_path / "photos.parquet",
            {"image_column": "img", "caption_column": "text", "key_column": "id"},
        ),
    ):
        out = tmp_path / f"out-{kind}"
        summary = run_ingest(
            IngestConfig(source=SourceConfig(kind=kind, path=str(path), **extra), output_dir=str(out))
        )
        assert (summary.n_samples, summary.n_rejected) == (len(PHOTOS), 0)
        outputs[kind] = {
            k: v
            for tar in sorted(out.glob("*.tar"))
            for k, v in _members(tar).items()
            if not k.endswith(".json")
        }
    assert outputs["folder"] == outputs["parquet"]
    assert outputs["folder"]["rocket.jpg"] == jpeg("rocket")


def test_real_web_parquet_with_list_of_images(ray_local, tmp_path, test_data) -> None:
    """fondant's messy Common Crawl images: many are tiny badges and icons."""
    out = tmp_path / "web"
    source = SourceConfig(kind="parquet", path=str(test_data / "fondant_cc_web_sample.parquet"), image_column="data",
                          caption_column="alt_text", key_column="id")  # fmt: skip
    summary = run_ingest(IngestConfig(source=source, output_dir=str(out)))
    assert summary.n_input == 40 and summary.n_samples + summary.n_rejected == 40
    assert summary.n_samples > 0 and {"empty caption", "too small"} & set(summary.reject_reasons)


def test_config_errors_fail_before_ray(tmp_path) -> None:
    with pytest.raises(ValueError, match="kind='tfrecord'"):
        SourceConfig(kind="tfrecord", path="x")
    with pytest.raises(FileNotFoundError, match=r"source\.path="):
        run_ingest(
            IngestConfig(
                source=SourceConfig(kind="webdataset", path=str(tmp_path / "nothing")),
                output_dir=str(tmp_path),
            )
        )
    with pytest.raises(ValueError, match="max_error_fraction"):
        IngestConfig(source=SourceConfig(kind="folder", path="x"), output_dir="y", max_error_fraction=2.0)
    assert PlanError.__mro__[1] is ValueError


def _read(config: SourceConfig) -> list[tuple[str, str]]:
    """(key, reject reason) of every row the source's shards give, in order."""
    return [
        (str(k), str(r))
        for shard in list_shards(config)
        for batch in read_shard(config, shard)
        for k, r in zip(batch["key"], batch["reject_reason"], strict=True)
    ]


def test_a_repeated_key_keeps_the_first_sample_in_every_source_kind(tmp_path) -> None:
    image, other = jpeg("chelsea"), jpeg("coffee")
    members = [("x", {"jpg": image, "txt": b"first"}), ("y", {"jpg": other, "txt": b"y"}), ("x", {"txt": b"again"}),
               ("x", {"png": other, "txt": b"third"})]  # fmt: skip
    (tmp_path / "a.tar").write_bytes(members_tar_bytes(members))
    rows = _read(SourceConfig(kind="webdataset", path=str(tmp_path / "a.tar")))
    assert rows == [
        ("x", ""),
        ("y", ""),
        ("x", "duplicate key"),
        ("x", "duplicate key"),
    ]  # not "missing image"

    pq.write_table(pa.table({"id": ["x", "y", "x"], "img": [image, other, other], "text": ["a", "b", "c"]}),
                   tmp_path / "a.parquet")  # fmt: skip
    source = SourceConfig(kind="parquet", path=str(tmp_path / "a.parquet"), image_column="img",
                          caption_column="text", key_column="id")  # fmt: skip
    assert _read(source) == [("x", ""), ("y", ""), ("x", "duplicate key")]
    batch = next(read_shard(source, list_shards(source)[0]))
    assert batch["caption"][0] == "a"  # the first is kept

    folder = tmp_path / "folder"
    folder.mkdir()
    for name, data in (("x.jpg", image), ("x.png", other), ("y.jpg", other), ("x.txt", b"x")):
        (folder / name).write_bytes(data)
    assert _read(SourceConfig(kind="folder", path=str(folder))) == [
        ("x", ""),
        ("x", "duplicate key"),
        ("y", ""),
    ]


def test_a_folder_accounts_for_every_file(tmp_path) -> None:
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "_staging").mkdir()
    files = {"a.jpg": jpeg("chelsea"), "a.txt": b"a cat", "a.json": b'{"url": "u"}', "a.TXT": b"?", "b.AVIF": jpeg("coffee"),
             "sub/c.jpg": jpeg("rocket"), "sub/c.txt": b"c", "notes.bin": b"\x00\x01", "README": b"read me",
             ".DS_Store": b"\x00", "lonely.txt": b"no image", "_staging/x.jpg": jpeg("camera")}  # fmt: skip
    for name, data in files.items():
        (folder / name).write_bytes(data)
    config = SourceConfig(kind="folder", path=str(folder), samples_per_shard=2)
    shards = list_shards(config)
    assert sum(len(s["uris"]) for s in shards) == len(files) - 1  # all but the staging folder's
    rows = dict(_read(config))
    assert rows == {"a": "", "b": "", "sub/c": "", "notes.bin": "unsupported file type .bin",
                    "README": "unsupported file type (no extension)",
                    ".DS_Store": "unsupported file type (no extension)", "lonely.txt": "sidecar without image",
                    "a.TXT": "duplicate sidecar"}  # fmt: skip
    # a glob, or a single image, brings its sidecars along
    glob = SourceConfig(kind="folder", path=str(folder / "*.jpg"))
    (uris,) = (s["uris"] for s in list_shards(glob))
    assert [u.rsplit("/", 1)[1] for u in uris] == ["a.jpg", "a.json", "a.txt", "a.TXT"]
    batch = next(read_shard(glob, list_shards(glob)[0]))
    assert (batch["key"][0], batch["caption"][0], batch["meta_json"][0]) == ("a", b"a cat", '{"url": "u"}')


def test_two_keys_written_as_one_member_name_are_duplicates() -> None:
    from pipelines.ingest.existing import _distinct_members

    keys = ["a.b", "a_b", "c", "a/b"]
    batch = {"key": object_column(keys), "source": object_column(["s"] * 4)}
    for column in ("reject_step", "reject_reason", "reject_detail"):
        batch[column] = object_column([""] * 4)
    written: dict[str, str] = {}
    out = _distinct_members(batch, written)
    assert list(out["reject_reason"]) == ["", "duplicate key", "", "duplicate key"]
    assert "'a_b' and 'a.b' are both written as 'a_b'" in out["reject_detail"][1]
