"""How the cost of every job grows with the number of shards: per-shard driver cost, per-shard join cost, end to end.

    python benchmarks/scale.py --out benchmarks/results/scale.json [--shards 100 1000 10000] [--keys 1000]
                               [--e2e 1000 10000] [--quick]
    python benchmarks/scale.py --merge driver.json e2e.json --out scale.json   # runs made apart, combined

Three measurements, each at every size in a process of its own (so each driver's peak RSS is its own):

* **Driver cost per shard** at ``--shards`` N with ``--keys`` keys per shard. Synthetic inputs in the real
  layouts: N img2dataset-named shard tars (status-only: encode's driver lists them, its read tasks would read
  them), per-shard scores (tiny CLIP width 32) and kept keys with their manifests, and an encode output of N
  shards (8 tiny latent rows each, one bucket) for export and training. Timed on the driver:
  ``encode_plan`` (list shards, check the fingerprint, recover, open kept keys and scores by manifest),
  ``encode_commit`` (N shards' writer summaries through the tracker, one commit task each moving a staged part,
  the manifest), ``filter`` and ``export`` (whole jobs: one Ray task per shard) and ``train_open`` (the cache
  opened from its manifest). Goal: per-shard time at the largest N ≤ 1.5× the smallest; peak RSS ≤ 2 GiB.
  The driver's storage calls are counted too (``tests.storage_calls``).
* **Per-shard join cost**: a read task's lookup of its shard's kept keys and stored CLIP-L embeddings (the
  files opened by name), mean over 50 shards, at every N; goal: flat within 1.5×. Beside it, the lookup as it
  was before per-shard outputs (a scan of the whole kept-keys and scores sets, filtered on ``source``), at
  the sizes up to 1000 shards (it grows with N; at 10⁴ it would take hours for the 50 lookups).
* **End to end** at ``--e2e`` samples in 100-sample shards: ingest → score → filter → encode with tiny flavors
  on real photos (96 px), seconds per sample; goal: the largest run ≤ 1.2× the smallest per sample.

``--quick`` runs 100 and 1000 shards and 200 and 800 samples.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from schemas import columns as c  # noqa: E402

EMBED_DIM = 32  # clip_score/tiny
LATENT_ROWS = 8  # per shard, for export and training
JOIN_SAMPLE = 50


# --- synthetic inputs in the real layouts ----------------------------------------------------------------------
def _write_per_shard(root: Path, tables: dict[str, pa.Table], schema_id: str, fingerprint: dict) -> None:
    """``root/parquet/<shard>.parquet``, its commit records and manifest, as score and filter write them."""
    from pipelines.core.by_shard import LAYOUT, shard_file
    from pipelines.core.storage import table_bytes

    (root / "parquet").mkdir(parents=True)
    (root / "_commits").mkdir()
    shards = {}
    for shard, table in tables.items():
        (root / shard_file(shard)).write_bytes(table_bytes(table))
        shards[shard] = {"shard_id": shard, "files": [{"path": shard_file(shard), "rows": table.num_rows}],
                         "n_written": table.num_rows}  # fmt: skip
        (root / "_commits" / f"{shard}.json").write_text(json.dumps(shards[shard]))
    (root / "_commits" / "_fingerprint.json").write_text(json.dumps(fingerprint))
    manifest = {"schema": schema_id, "layout": LAYOUT, "fingerprint": fingerprint, "shards": shards,
                "n_shards": len(shards)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))


def _scores_table(shard: str, keys: int, rng: np.random.Generator) -> pa.Table:
    from schemas import attach_metadata, nested_list_array, scores_schema

    f32, i32 = pa.float32(), pa.int32()
    widths = rng.integers(64, 1024, keys)
    table = pa.table({
        c.KEY: [f"{shard}{i:06d}" for i in range(keys)], c.SOURCE: [f"/src/{shard}.tar"] * keys,
        c.WIDTH: pa.array(widths, i32), c.HEIGHT: pa.array(widths, i32), c.ASPECT_RATIO: pa.array(np.ones(keys), f32),
        c.CAPTION_LENGTH: pa.array(np.full(keys, 40), i32),
        c.AESTHETIC_SCORE: pa.array(rng.normal(5, 1, keys), f32), c.CLIP_SIMILARITY: pa.array(rng.random(keys), f32),
        c.CLIP_IMAGE_EMBEDS: nested_list_array(rng.standard_normal((keys, EMBED_DIM), dtype=np.float32), "float32"),
        c.WATERMARK_PROBABILITY: pa.array([None] * keys, f32), c.NSFW_PROBABILITY: pa.array([None] * keys, f32),
    })  # fmt: skip
    return attach_metadata(table, scores_schema(EMBED_DIM))


def _latent_table(shard: str, rng: np.random.Generator) -> pa.Table:
    from pipelines.core.latents_io import to_latent_table
    from schemas.core import FileMetadata

    n = LATENT_ROWS
    shapes = {c.EFFNET: (16, 4, 4), c.CLIP_TEXT: (77, 32), c.CLIP_TEXT_POOLED: (1, 32), c.CLIP_IMG: (32,)}
    rows: dict[str, Any] = {k: rng.standard_normal((n, *s), dtype=np.float32) for k, s in shapes.items()}
    rows |= {c.KEY: [f"{shard}{i:06d}" for i in range(n)], c.CAPTION: ["a photo"] * n, c.SOURCE_SHARD: [f"/src/{shard}.tar"] * n,
             c.IMAGE_SHA256: ["0" * 64] * n, c.BUCKET: ["4x4"] * n}  # fmt: skip
    for name in (c.ORIG_WIDTH, c.ORIG_HEIGHT, c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM):
        rows[name] = np.zeros(n, np.int64)
    meta = FileMetadata(encoder_flavors={"effnet": "effnet/tiny"}, weights_sha256={"effnet": "0" * 64},
                        preprocessing_hash="0" * 16)  # fmt: skip
    return to_latent_table(rows, "float16", meta)


def _latents(root: Path, shards: list[str], rng: np.random.Generator) -> None:
    """An encode output of one 8-row Parquet part per shard, with records and manifest as encode writes them."""
    from safetensors.numpy import save

    from pipelines.core.latents_io import parquet_bytes

    (root / "parquet").mkdir(parents=True)
    (root / "_commits").mkdir()
    records = {}
    for shard in shards:
        path = f"parquet/{shard}-4x4-{0:016x}.parquet"
        (root / path).write_bytes(parquet_bytes(_latent_table(shard, rng)))
        records[shard] = {"shard_id": shard, "files": [{"path": path, "rows": LATENT_ROWS, "bucket": "4x4"}],
                          "n_encoded": LATENT_ROWS, "bucket:4x4": LATENT_ROWS}  # fmt: skip
        (root / "_commits" / f"{shard}.json").write_text(json.dumps(records[shard]))
    empty = {c.CLIP_TEXT: np.zeros((77, 32), np.float32), c.CLIP_TEXT_POOLED: np.zeros((1, 32), np.float32)}
    (root / "empty_caption.safetensors").write_bytes(save(empty))
    fingerprint = {"encoder_flavors": {"effnet": "effnet/tiny"}, "weights_sha256": {"effnet": "0" * 64},
                   "preprocessing_hash": "0" * 16}  # fmt: skip
    (root / "_commits" / "_fingerprint.json").write_text(json.dumps(fingerprint))
    manifest = {"schema": "latents@1", **fingerprint, "empty_caption": "empty_caption.safetensors",
                "shards": records, "n_shards": len(records)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))


def synthesize(root: Path, n_shards: int, keys: int) -> list[str]:
    from pipelines.core.shards import members_tar_bytes

    rng = np.random.default_rng(0)
    shards = [f"{s:05d}" for s in range(n_shards)]
    (root / "shards").mkdir(parents=True)
    empty_tar = members_tar_bytes([])
    for shard in shards:
        (root / "shards" / f"{shard}.tar").write_bytes(empty_tar)
    scores = {s: _scores_table(s, keys, rng) for s in shards}
    _write_per_shard(root / "scores", scores, "scores@1", {"scorer": "clip_score/tiny"})
    kept = {s: t.select([c.KEY, c.SOURCE]) for s, t in scores.items()}
    _write_per_shard(root / "kept", kept, "kept_keys", {"rules": []})
    _latents(root / "latents", shards, rng)
    return shards


# --- one size, in its own process --------------------------------------------------------------------------------
def _peak_rss_mib(reset: bool = True) -> float:
    """This process's peak RSS since the last reset (Linux ``VmHWM``); ``reset`` starts a new peak."""
    import re

    with open("/proc/self/status") as f:
        peak = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return peak


def _timed(name: str, fn, results: dict, calls: dict, peaks: dict, repeat: int = 1) -> Any:
    """Time ``fn`` (the best of ``repeat`` runs, for the read-only steps: a cold page cache is not the cost),
    count the first run's storage calls, and record its peak RSS."""
    from tests.storage_calls import counting

    for _ in range(repeat):
        with counting() as record:
            start = time.perf_counter()
            out = fn()
            took = time.perf_counter() - start
        results[name] = min(took, results.get(name, took))
        calls.setdefault(name, record.n)
    peaks[name] = _peak_rss_mib()
    return out


def _encode_commit(output: Any, shards: list[str]) -> None:
    """What encode's driver does after planning, for every shard: tracker, commit tasks, manifest."""
    from pipelines.core.commits import Committer
    from pipelines.core.completion import ShardSummary, ShardTracker
    from pipelines.core.step import object_column
    from pipelines.encode.pipeline import _files

    tracker, committer = ShardTracker(), Committer(output.store)
    for shard in shards:  # one writer summary per shard: a row, the shard's end marker, one staged part
        batch = {"shard_id": object_column([shard, shard]), "reject_reason": object_column(["", "end of shard"]),
                 "reject_detail": object_column(["", "1"])}  # fmt: skip
        summary = ShardSummary(batch)
        summary.add_part(shard, {"path": f"parquet/{shard}-4x4-0.parquet", "rows": 1, "bucket": "4x4"})
        summary.count(shard, n_encoded=1)
        for record in tracker.add(summary.batch()):
            committer.submit(record["shard_id"], _files(record))
    output.finish(committer.wait(), shards, schema="latents@1")


def run_size(n_shards: int, keys: int, root: Path) -> dict[str, Any]:
    """Synthesize N shards, then time each job's driver, the joins, and record the peak RSS."""
    import ray

    from pipelines.core.by_shard import read_for_shard
    from pipelines.core.commits import CommitStore, JobOutput
    from pipelines.core.sources import SourceConfig
    from pipelines.encode.models import EncoderConfig
    from pipelines.encode.pipeline import EncodeConfig, fingerprint, preprocessing_spec, read_config
    from pipelines.encode.writer import fingerprint_metadata
    from pipelines.export.pipeline import ExportConfig, run_export
    from pipelines.filter.pipeline import FilterConfig, Rule, run_filter
    from pipelines.train_data.batches import TrainDataConfig, open_cache
    from schemas.core import FileMetadata

    start = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        # made in a process of its own: the inputs' memory is not the driver's
        shards = pool.submit(synthesize, root, n_shards, keys).result()
    meta = FileMetadata(encoder_flavors={"effnet": "effnet/tiny"}, weights_sha256={"effnet": "0" * 64})
    committing = JobOutput(CommitStore(str(root / "out")), fingerprint(meta), "refuse")
    committing.start(shards)
    for shard in shards:  # the staged part each commit moves
        staged = root / "out" / "_staging" / shard / "parquet"
        staged.mkdir(parents=True)
        (staged / f"{shard}-4x4-0.parquet").write_bytes(b"part")
    synth_s = time.perf_counter() - start
    _peak_rss_mib()  # each job's peak from here
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    times: dict[str, float] = {}
    calls: dict[str, int] = {}
    peaks: dict[str, float] = {}
    config = EncodeConfig(shards=SourceConfig(kind="webdataset", path=str(root / "shards")), output_dir=str(root / "plan"),
                          kept_keys=str(root / "kept"), scores_dir=str(root / "scores"),
                          effnet=EncoderConfig(flavor="effnet/tiny"), clip_text=EncoderConfig(flavor="clip_text/tiny"),
                          clip_image=EncoderConfig(flavor="clip_vision/tiny"))  # fmt: skip
    metadata = fingerprint_metadata(config.encoders(), preprocessing_spec(config))

    def encode_plan() -> Any:
        from pipelines.core.sources import unique_shards

        found = unique_shards(config.shards)
        store = CommitStore(config.output_dir)
        JobOutput(store, fingerprint(metadata), "refuse").start(found)
        return read_config(config, store)

    read = _timed("encode_plan", encode_plan, times, calls, peaks, repeat=2)
    _timed("encode_commit", lambda: _encode_commit(committing, shards), times, calls, peaks)
    rules = (Rule(field="aesthetic_score", op=">=", value=5.0),)
    _timed("filter", lambda: run_filter(FilterConfig(scores_dir=str(root / "scores"), output_dir=str(root / "filtered"),
                                                     rules=rules)), times, calls, peaks)  # fmt: skip
    _timed("export", lambda: run_export(ExportConfig(latents=str(root / "latents"), output_dir=str(root / "export"))),
           times, calls, peaks)  # fmt: skip
    _timed(
        "train_open",
        lambda: open_cache(TrainDataConfig(path=str(root / "latents"))),
        times,
        calls,
        peaks,
        repeat=2,
    )
    ray.shutdown()
    rng = np.random.default_rng(1)
    sample = [shards[i] for i in rng.permutation(len(shards))[:JOIN_SAMPLE]]

    def join() -> float:
        start = time.perf_counter()
        for shard in sample:  # what EncodeRead does per shard: its kept keys and stored embeddings, by name
            read_for_shard(read.kept_keys, shard, [c.KEY])
            read_for_shard(read.scores, shard, [c.KEY, c.CLIP_IMAGE_EMBEDS])
        return (time.perf_counter() - start) / len(sample)

    join_cold_s = join()  # first touch: the files may have left the page cache while the jobs ran
    join_s = join()
    scan_s = None
    if n_shards <= 1000:
        start = time.perf_counter()
        for shard in sample[:10]:
            _scan_join(root, shard)
        scan_s = (time.perf_counter() - start) / min(10, len(sample))
    peak = max(peaks.values())
    return {"n_shards": n_shards, "keys_per_shard": keys, "synthesize_s": synth_s, "driver_s": times,
            "driver_s_per_shard": {k: v / n_shards for k, v in times.items()}, "driver_calls": calls,
            "driver_calls_per_shard": {k: v / n_shards for k, v in calls.items()},
            "join_s_per_shard": join_s, "join_cold_s_per_shard": join_cold_s, "scan_join_s_per_shard": scan_s,
            "driver_peak_rss_mib": peak, "driver_peak_rss_mib_by_job": peaks}  # fmt: skip


def _scan_join(root: Path, shard: str) -> None:
    """The lookup before per-shard outputs: scan every kept-keys and scores file, keep this shard's rows."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    for folder, columns in (("kept", [c.KEY]), ("scores", [c.KEY, c.CLIP_IMAGE_EMBEDS])):
        dataset = pads.dataset(str(root / folder / "parquet"), format="parquet")
        dataset.to_table(columns=columns, filter=pc.ends_with(pc.field(c.SOURCE), f"/{shard}.tar"))


# --- end to end --------------------------------------------------------------------------------------------------
def run_e2e(n_samples: int, root: Path, per_shard: int = 100, calls: bool = False) -> dict[str, Any]:
    """ingest → score → filter → encode of ``n_samples`` real photos (96 px) with tiny flavors; with ``calls``,
    also the storage calls of one shard's work in each job (``per_shard_calls``)."""
    import io

    import ray
    from PIL import Image

    from benchmarks.photos import samples, write_tar
    from pipelines.core.preprocess import PreprocessConfig
    from pipelines.core.sources import SourceConfig
    from pipelines.core.step import Resources
    from pipelines.encode.models import EncoderConfig
    from pipelines.encode.pipeline import EncodeConfig, run_encode
    from pipelines.filter.pipeline import FilterConfig, Rule, run_filter
    from pipelines.ingest.existing import IngestConfig, run_ingest
    from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score

    small = {}
    for key, data, caption in samples(6):
        buffer = io.BytesIO()
        Image.open(io.BytesIO(data)).convert("RGB").resize((96, 96)).save(buffer, "JPEG", quality=85)
        small[key[:-5]] = (buffer.getvalue(), caption)
    names = sorted(small)
    (root / "src").mkdir(parents=True)
    for s in range(0, n_samples, per_shard):
        rows = [(f"k{i:08d}", *small[names[i % len(names)]]) for i in range(s, min(n_samples, s + per_shard))]
        write_tar(root / "src" / f"{s // per_shard:05d}.tar", rows)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    shards = SourceConfig(kind="webdataset", path=str(root / "shards"))
    actor = Resources(num_cpus=0.5, batch_size=50)
    score_config = ScoreConfig(shards=shards, output_dir=str(root / "scores"), scorer=ScorerConfig(flavor="clip_score/tiny"),
                               score_resources=actor)  # fmt: skip
    encode_config = EncodeConfig(
        shards=shards, output_dir=str(root / "latents"), kept_keys=str(root / "kept"), scores_dir=str(root / "scores"),
        formats=("parquet", "webdataset"), preprocess=PreprocessConfig(image_size_px=256),
        effnet=EncoderConfig(flavor="effnet/tiny"), clip_text=EncoderConfig(flavor="clip_text/tiny"),
        clip_image=EncoderConfig(flavor="clip_vision/tiny"), effnet_resources=actor, clip_text_resources=actor,
        clip_image_resources=actor,
    )  # fmt: skip
    jobs = {
        "ingest": lambda: run_ingest(IngestConfig(source=SourceConfig(kind="webdataset", path=str(root / "src")),
                                                  output_dir=str(root / "shards"))),
        "score": lambda: run_score(score_config),
        "filter": lambda: run_filter(FilterConfig(scores_dir=str(root / "scores"), output_dir=str(root / "kept"),
                                                  rules=(Rule(field="width", op=">=", value=64),))),
        "encode": lambda: run_encode(encode_config),
    }  # fmt: skip
    walls = {}
    for name, job in jobs.items():
        start = time.perf_counter()
        job()
        walls[name] = time.perf_counter() - start
    ray.shutdown()
    total = sum(walls.values())
    result = {"n_samples": n_samples, "per_shard": per_shard, "wall_s": walls, "total_s": total,
              "s_per_sample": total / n_samples}  # fmt: skip
    if calls:
        result["storage_calls_per_shard"] = per_shard_calls(root, encode_config, score_config)
    return result


def per_shard_calls(root: Path, encode: Any, score: Any) -> dict[str, Any]:
    """Storage calls of one 100-sample shard's work in each job (what its Ray tasks do), counted without Ray:
    read, stage, commit; by method, and the files the shard left in the output. Each call is about one request
    of an object store (a move is two: copy, delete)."""
    import numpy as np

    from pipelines.core.by_shard import (
        LAYOUT,  # noqa: F401  (the layouts counted here)
        MergeParts,
    )
    from pipelines.core.commits import CommitStore, commit_shard
    from pipelines.core.completion import ShardTracker
    from pipelines.core.sources import SourceConfig, list_shards
    from pipelines.encode.pipeline import _files, encode_plan, preprocessing_spec, read_config
    from pipelines.encode.writer import WriteConfig, fingerprint_metadata
    from pipelines.export.pipeline import (
        ExportConfig,
        ExportShards,
        ExportTaskConfig,
        model_metadata,
        plan_export,
    )
    from pipelines.filter.pipeline import FilterShards, Rule, ShardFilterConfig
    from pipelines.ingest.existing import IngestConfig, IngestShard
    from pipelines.score.pipeline import _stage_config, score_plan
    from tests.storage_calls import counting

    calls: dict[str, Any] = {}
    out = root / "calls"

    def count(job: str, record: Any, folder: str) -> None:
        done = [p for p in (out / folder).rglob("*") if p.is_file() and "_staging" not in p.parts]
        calls[job] = {"calls": record.n, "by_method": dict(record.by_method()), "files": len(done)}

    src = list_shards(SourceConfig(kind="webdataset", path=str(root / "src")))[0]
    ingest = IngestConfig(
        source=SourceConfig(kind="webdataset", path=str(root / "src")), output_dir=str(out / "shards")
    )
    with counting() as record:
        IngestShard(ingest)({"shard_index": np.asarray([0]), "uris": np.asarray([src["uris"]], dtype=object)})
    count("ingest", record, "shards")
    shard = list_shards(encode.shards)[0]
    row = {"shard_index": np.asarray([0]), "uris": np.asarray([shard["uris"]], dtype=object)}
    import dataclasses

    score = dataclasses.replace(score, output_dir=str(out / "scores"))
    stage = _stage_config(score)
    with counting() as record:
        (summary,) = ShardTracker().add(score_plan(score).run_local(row))
        commit_shard(stage.store, summary["shard_id"], summary, MergeParts(stage.file_schema))
    count("score", record, "scores")
    task = ShardFilterConfig(scores_root=str(root / "scores"), storage_options={},
                             rules=(Rule(field="width", op=">=", value=64),), store=CommitStore(str(out / "kept")))  # fmt: skip
    with counting() as record:
        FilterShards(task)({"shard_id": np.asarray(["00000"], dtype=object)})
    count("filter", record, "kept")
    encode = dataclasses.replace(encode, output_dir=str(out / "latents"))
    metadata = fingerprint_metadata(encode.encoders(), preprocessing_spec(encode))
    write = WriteConfig(output_dir=encode.output_dir, metadata=metadata, formats=encode.formats)
    plan = encode_plan(encode, write, read_config(encode, CommitStore(str(root / "latents"))))
    with counting() as record:
        (summary,) = ShardTracker().add(plan.run_local(row))
        commit_shard(write.store, summary["shard_id"], _files(summary))
    count("encode", record, "latents")
    export = ExportConfig(latents=str(root / "latents"), output_dir=str(out / "export"))
    planned = plan_export(export)
    models = {b: model_metadata(m, export, planned.cache, b, None) for b, m in planned.metas.items()}
    step = ExportShards(ExportTaskConfig(config=export, metas=planned.metas, models=models,
                                         store=CommitStore(export.output_dir)))  # fmt: skip
    unit = next(iter(planned.units))
    files = json.dumps([dataclasses.astuple(f) for f in planned.units[unit]])
    with counting() as record:
        step({"shard_id": np.asarray([unit], dtype=object), "files": np.asarray([files], dtype=object)})
    count("export", record, "export")
    return calls


# --- the parent: every size in a child process, then the ratios ------------------------------------------------
def _child(args: list[str]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="cascade-scale-", dir=os.environ.get("CASCADE_SCALE_TMP")) as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), *args, "--root", tmp, "--out", str(out)]
        env = os.environ | {"PYTHONPATH": str(HERE.parent), "RAY_ADDRESS": ""}
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            return {"error": done.stderr[-3000:]}
        return json.loads(out.read_text())


def summarize(sizes: list[dict], e2e: list[dict]) -> dict[str, Any]:
    """Ratios of the largest size over the smallest, beside their goals."""
    ok = [s for s in sizes if "error" not in s]
    ratios: dict[str, Any] = {}
    if len(ok) >= 2:
        first, last = ok[0], ok[-1]
        ratios["driver_per_shard_largest_over_smallest"] = {
            job: last["driver_s_per_shard"][job] / first["driver_s_per_shard"][job]
            for job in first["driver_s"]
        }
        if len(ok) >= 3:  # the cost of one more shard, between the two largest sizes over the two smallest
            (a, b), (y, z) = ok[:2], ok[-2:]
            ratios["driver_marginal_per_shard_largest_over_smallest"] = {
                job: ((z["driver_s"][job] - y["driver_s"][job]) / (z["n_shards"] - y["n_shards"]))
                / ((b["driver_s"][job] - a["driver_s"][job]) / (b["n_shards"] - a["n_shards"]))
                for job in first["driver_s"]
            }
        ratios["join_per_shard_largest_over_smallest"] = last["join_s_per_shard"] / first["join_s_per_shard"]
        ratios["driver_peak_rss_mib_largest"] = last["driver_peak_rss_mib"]
        ratios["sizes"] = [first["n_shards"], last["n_shards"]]
    good = [e for e in e2e if "error" not in e]
    if len(good) >= 2:
        ratios["e2e_s_per_sample_largest_over_smallest"] = good[-1]["s_per_sample"] / good[0]["s_per_sample"]
    ratios["goals"] = {"driver_per_shard": "<= 1.5", "join_per_shard": "<= 1.5", "driver_peak_rss_mib": "<= 2048",
                       "e2e_per_sample": "<= 1.2"}  # fmt: skip
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--e2e", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--quick", action="store_true", help="100 and 1000 shards; 200 and 800 samples")
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)  # child: one driver size
    parser.add_argument("--samples", type=int, help=argparse.SUPPRESS)  # child: one end-to-end size
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--calls", action="store_true", help=argparse.SUPPRESS)  # child: one shard's calls
    parser.add_argument("--merge", nargs="+", metavar="JSON",
                        help="combine earlier runs' JSON (e.g. the driver sizes and the end-to-end sizes run apart)")  # fmt: skip
    args = parser.parse_args()
    if args.merge:
        runs = [json.loads(Path(p).read_text()) for p in args.merge]
        # a size measured in more than one run: the first run given wins
        sizes = sorted({s["n_shards"]: s for r in reversed(runs) for s in r["sizes"] if "n_shards" in s}.values(),
                       key=lambda s: s["n_shards"])  # fmt: skip
        e2e = sorted({e["n_samples"]: e for r in reversed(runs) for e in r["e2e"] if "n_samples" in e}.values(),
                     key=lambda e: e["n_samples"])  # fmt: skip
        result = {"sizes": sizes, "e2e": e2e, "ratios": summarize(sizes, e2e), "cpu_count": os.cpu_count()}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(json.dumps(result["ratios"], indent=2))
        return
    if args.size or args.samples:
        if args.size:
            result = run_size(args.size, args.keys, Path(args.root))
        else:
            result = run_e2e(args.samples, Path(args.root), calls=args.calls)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return
    if args.quick:
        args.shards, args.e2e = [100, 1000], [200, 800]
    sizes, e2e = [], []
    for n in args.shards:
        print(f"driver and joins at {n} shards …", flush=True)
        sizes.append(_child(["--size", str(n), "--keys", str(args.keys)]))
        print(json.dumps({k: sizes[-1].get(k) for k in ("driver_s_per_shard", "join_s_per_shard",
                                                        "driver_peak_rss_mib", "error")}), flush=True)  # fmt: skip
    for i, n in enumerate(args.e2e):
        print(f"end to end at {n} samples …", flush=True)
        e2e.append(_child(["--samples", str(n), *(["--calls"] if i == 0 else [])]))
        print(json.dumps({k: e2e[-1].get(k) for k in ("wall_s", "s_per_sample", "error")}), flush=True)
    result = {"sizes": sizes, "e2e": e2e, "ratios": summarize(sizes, e2e), "cpu_count": os.cpu_count()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
