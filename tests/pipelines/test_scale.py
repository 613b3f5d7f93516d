"""Cost that grows with the data, never with shards × rows: drivers make a bounded number of storage calls per
shard, and a shard's read task opens only that shard's files.

The whole chain (ingest → score → filter → encode → export → training cache) runs at 2 and at 8 shards of
real (small) photos on the session's Ray; ``tests.storage_calls`` counts the driver's calls (Ray workers are
other processes).
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.shards import members_tar_bytes
from pipelines.core.sources import SourceConfig, list_shards
from pipelines.core.step import Resources
from pipelines.encode.models import EncoderConfig
from pipelines.encode.pipeline import EncodeConfig, read_config, run_encode
from pipelines.encode.steps import EncodeRead
from pipelines.export.pipeline import ExportConfig, run_export
from pipelines.filter.pipeline import FilterConfig, Rule, run_filter
from pipelines.ingest.existing import IngestConfig, run_ingest
from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score
from pipelines.train_data.batches import TrainDataConfig, open_cache
from tests.pipelines.photos import PHOTOS, captions, jpeg
from tests.storage_calls import counting

SIZES = (2, 8)
PER_SHARD = 2  # samples per shard: one kept, one dropped by the filter


def _small_jpeg(name: str, side: int) -> bytes:
    image = Image.open(io.BytesIO(jpeg(name))).convert("RGB").resize((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _source(root, n_shards: int) -> None:
    """``n_shards`` tars of two photos each: one 96 px (kept by the filter), one 48 px (dropped)."""
    root.mkdir(parents=True)
    for s in range(n_shards):
        a, b = PHOTOS[s % len(PHOTOS)], PHOTOS[(s + 1) % len(PHOTOS)]
        members = [(f"s{s}_big", {"jpg": _small_jpeg(a, 96), "txt": captions()[a].encode()}),
                   (f"s{s}_small", {"jpg": _small_jpeg(b, 48), "txt": captions()[b].encode()})]  # fmt: skip
        (root / f"{s:05d}.tar").write_bytes(members_tar_bytes(members))


def _encode_config(root, **resources) -> EncodeConfig:
    return EncodeConfig(
        shards=SourceConfig(kind="webdataset", path=str(root / "shards")), output_dir=str(root / "latents"),
        kept_keys=str(root / "kept"), scores_dir=str(root / "scores"), formats=("parquet",),
        preprocess=PreprocessConfig(image_size_px=256), effnet=EncoderConfig(flavor="effnet/tiny"),
        clip_text=EncoderConfig(flavor="clip_text/tiny"), clip_image=EncoderConfig(flavor="clip_vision/tiny"),
        **resources,
    )  # fmt: skip


def _jobs(root, other: bool = False) -> dict:
    """Every job over ``root/src``; ``other``: with other batch sizes and concurrency than the defaults."""
    shards = SourceConfig(kind="webdataset", path=str(root / "shards"))

    def change(**resources: Resources) -> dict[str, Resources]:
        return resources if other else {}

    tasks = change(resources=Resources(num_cpus=0.5, batch_size=1, concurrency=3))
    return {
        "ingest": lambda: run_ingest(IngestConfig(source=SourceConfig(kind="webdataset", path=str(root / "src")),
                                                  output_dir=str(root / "shards"), **tasks)),
        "score": lambda: run_score(ScoreConfig(shards=shards, output_dir=str(root / "scores"),
                                               scorer=ScorerConfig(flavor="clip_score/tiny"),
                                               **change(score_resources=Resources(batch_size=1),
                                                        write_resources=Resources(batch_size=3)))),
        "filter": lambda: run_filter(FilterConfig(scores_dir=str(root / "scores"), output_dir=str(root / "kept"),
                                                  rules=(Rule(field="width", op=">=", value=64),), **tasks)),
        "encode": lambda: run_encode(_encode_config(root, **change(write_resources=Resources(batch_size=1)))),
        "export": lambda: run_export(ExportConfig(latents=str(root / "latents"), output_dir=str(root / "export"),
                                                  **tasks)),
        "train_cache": lambda: open_cache(TrainDataConfig(path=str(root / "latents"))),
    }  # fmt: skip


def _chain(root) -> dict[str, int]:
    """Run every job over ``root/src``; returns each job's driver storage calls."""
    calls = {}
    for name, run in _jobs(root).items():
        with counting() as record:
            run()
        calls[name] = record.n
    return calls


@pytest.fixture(scope="module")
def chains(ray_local, tmp_path_factory) -> dict[int, tuple]:
    out = {}
    for n in SIZES:
        root = tmp_path_factory.mktemp(f"scale{n}")
        _source(root / "src", n)
        out[n] = (root, _chain(root))
    return out


def test_every_job_ran_at_both_sizes(chains) -> None:
    for n, (root, _) in chains.items():
        kept = json.loads((root / "kept" / "manifest.json").read_text())
        assert (kept["totals"]["n_input"], kept["totals"]["n_kept"]) == (PER_SHARD * n, n)
        assert json.loads((root / "latents" / "manifest.json").read_text())["summary"]["n_encoded"] == n
        assert json.loads((root / "export" / "export_manifest.json").read_text())["n_rows"] == n


def test_driver_calls_per_shard_do_not_grow_with_the_number_of_shards(chains) -> None:
    (small, few), (large, many) = ((n, chains[n][1]) for n in SIZES)
    for job in few:
        assert many[job] / large <= few[job] / small, (job, few[job], many[job])
        assert many[job] - few[job] <= large - small, (
            job,
            few[job],
            many[job],
        )  # under one call per extra shard


def test_an_encode_read_task_opens_only_its_own_shards_files(chains) -> None:
    """The read of shard 00007 opens its tar, its kept keys and its stored embeddings: nothing else, no listing."""
    root, _ = chains[max(SIZES)]
    config = _encode_config(root)
    from pipelines.core.commits import CommitStore

    read = read_config(config, CommitStore(config.output_dir))
    shard = next(s for s in list_shards(config.shards) if s["uris"][0].endswith("00007.tar"))
    step = EncodeRead(read)
    batch = {
        "shard_index": np.asarray([shard["shard_index"]]),
        "uris": np.asarray([shard["uris"]], dtype=object),
    }
    with counting() as record:
        rows = list(step(batch))
    keys = [k for b in rows for k in b["key"] if k]
    assert keys == ["s7_big"]  # the kept key only (s7_small is 48 px wide)
    opened = {p.removeprefix(str(root) + "/") for p in record.paths("_open")}
    assert opened == {"shards/00007.tar", "kept/parquet/00007.parquet", "scores/parquet/00007.parquet"}
    assert not {"ls", "find", "glob", "walk"} & set(record.by_method())  # nothing listed


def test_a_rerun_of_finished_jobs_rewrites_nothing(chains) -> None:
    """Every shard is committed: each job's rerun, with other batch sizes and concurrency, skips them all. Only
    the job-level summaries are written again, with the same bytes (the manifests too, but they carry times)."""
    root, _ = chains[min(SIZES)]
    written = [p for p in root.rglob("*") if p.is_file() and "src" not in p.relative_to(root).parts]
    manifests, summaries = (
        {"manifest.json", "export_manifest.json"},
        {"filter_report.json", "empty_caption.safetensors"},
    )
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in written if p.name not in manifests}
    for name, run in _jobs(root, other=True).items():
        if name != "train_cache":
            run()
    for path, (mtime, data) in before.items():
        assert path.read_bytes() == data, path
        assert path.name in summaries or path.stat().st_mtime_ns == mtime, f"{path} was written again"


# --- outputs from before per-shard layouts ---------------------------------------------------------------------
def test_an_older_scores_folder_is_partitioned_once_and_its_embeddings_reused(
    chains, tmp_path, capfd
) -> None:
    import dataclasses

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.core.latents_reader import read_latents

    root, _ = chains[min(SIZES)]
    scores = pq.read_table(root / "scores" / "parquet")
    (tmp_path / "old-scores").mkdir()
    half = scores.num_rows // 2  # two parts that each span several shards, as score wrote them before
    pq.write_table(scores.slice(0, half), tmp_path / "old-scores" / "part-a.parquet")
    pq.write_table(scores.slice(half), tmp_path / "old-scores" / "part-b.parquet")
    config = dataclasses.replace(_encode_config(root), scores_dir=str(tmp_path / "old-scores"),
                                 output_dir=str(tmp_path / "latents"))  # fmt: skip
    run_encode(config)
    assert (
        "is in the layout from before per-shard outputs: partitioning it by shard once"
        in capfd.readouterr().err
    )
    stored = dict(zip(scores["key"].to_pylist(), scores["clip_image_embeds"].to_pylist(), strict=True))
    rows = {
        k: v
        for b in read_latents(str(tmp_path / "latents"))
        for k, v in zip(b["key"], b["clip_img"], strict=True)
    }
    assert len(rows) == min(SIZES)
    for key, clip_img in rows.items():
        assert np.array_equal(clip_img.reshape(-1), np.asarray(stored[key], np.float32).astype(np.float16)), (
            key
        )
    partitioned = pq.read_table(tmp_path / "latents" / "_inputs" / "scores" / "parquet")
    assert sorted(partitioned["key"].to_pylist()) == sorted(stored) and isinstance(partitioned, pa.Table)
    run_encode(dataclasses.replace(config, on_stale="reencode"))  # a rerun: the converted copy is reused
    assert "partitioning" not in capfd.readouterr().err


def test_an_encode_output_from_before_per_file_records_still_trains_and_exports(chains, tmp_path) -> None:
    """Its manifest and commit records list plain file paths (no rows, no buckets): footers are read instead."""
    import shutil

    root, _ = chains[min(SIZES)]
    old = tmp_path / "latents"
    shutil.copytree(root / "latents", old)
    manifest = json.loads((old / "manifest.json").read_text())
    for shard, record in manifest["shards"].items():
        record["files"] = [f["path"] for f in record["files"]]
        (old / "_commits" / f"{shard}.json").write_text(json.dumps(record))
    manifest.pop("buckets")
    (old / "manifest.json").write_text(json.dumps(manifest))
    cache = open_cache(TrainDataConfig(path=str(old)))
    assert sum(f.num_rows for f in cache.files) == min(SIZES)
    summary = run_export(ExportConfig(latents=str(old), output_dir=str(tmp_path / "export")))
    assert summary.n_rows == min(SIZES)
