"""``cascade export``: a latent cache → Parquet for third-party models (pyarrow, polars, duckdb, HF datasets).

Layout (export@1, ``schemas.records.export_schema``): one row per sample with ``key``, ``caption``, the scalar
columns (bucket, original size, crop box, image_sha256, source_shard) and the chosen tensor columns as nested
fixed-size lists (``fixed_size_list<fixed_size_list<float16>[w]>[h]`` ...), C order, float16 or float32. All
four readers load that without custom code (Arrow's ``fixed_shape_tensor`` is refused by HF datasets); the
``huggingface`` schema metadata describes the columns as nested fixed-length ``Sequence``/``List(length=n)``
features, which give ``datasets`` the shape (``with_format("numpy")`` returns (N, *shape) arrays). ``Array3D``
features would not: ``datasets`` 5.2 ignores them on fixed-size-list storage and shows the same lists. duckdb has no
half type: it widens float16 to FLOAT exactly and shows the lists as ``FLOAT[][][]``.

Files: ``{output_dir}/{bucket}/part-{shard}-{i:05d}.parquet`` (bucket ``WxH`` in latent cells, e.g.
``24x24``; ``shard`` the cache's input shard), at most ``rows_per_file`` rows each. Tensor shapes are fixed
within a bucket folder, so one bucket reads as one fixed-shape table: ``{output_dir}/24x24/*.parquet``. The
folders are not hive-style (``bucket=24x24``) because ``bucket`` is already a column: pyarrow's hive discovery
would clash with it. Within a file, rows are ordered by key; the same cache gives the same bytes, whatever
batch sizes encoded it. Each file carries the ``cascade.*`` keys (``cascade.random_weights`` included) and
``cascade.model`` (JSON: flavors, whether they ran on random weights, shapes, dtype, what each tensor means,
derived from the flavor and shape, and how to decode it).

On Ray: one task per cache shard (its files come from the cache's manifest, no listing, no footer reads but
one per bucket) exports that shard's buckets and commits them (``pipelines.core.commits``): a rerun skips
committed shards, another config (columns, dtype, rows per file, buckets) redoes the export (``on_stale``).
``export_manifest.json`` is removed when work starts and written last: a folder with a manifest holds exactly
the listed files. A folder of latent files without an encode manifest is exported file by file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.commits import FINGERPRINT, CommitStore, JobOutput
from pipelines.core.completion import SHARD_ID, collect_records
from pipelines.core.latents_io import FORMATS, SCALAR_COLUMNS
from pipelines.core.latents_reader import (
    check_expected,
    committed_records,
    file_info,
    file_paths,
    list_latent_files,
    read_latent_table,
    to_float32,
)
from pipelines.core.notice import notice
from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.step import Batch, Resources, Step, object_column
from pipelines.core.storage import write_bytes
from schemas import columns as c
from schemas.core import FileMetadata, RecordSchema, attach_metadata
from schemas.records import export_schema, huggingface_features
from schemas.tensors import nested_list_array, tensor_to_numpy

DTYPES = ("float16", "float32")
TENSOR_COLUMNS = c.LATENT_TENSOR_COLUMNS
MODEL_KEY = "cascade.model"  # schema metadata: JSON description of the model/latent space
MANIFEST = "export_manifest.json"
EMPTY_CAPTION = "empty_caption.safetensors"
ROW_GROUP_BYTES = 128 << 20  # target uncompressed tensor bytes per row group
STAGE_A_SCALE = 0.43  # StageA.encode divides by it, StageA.decode multiplies by it (spec §1.4)
_BUCKET = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")
_PART = re.compile(r"^part-[0-9]{5}\.parquet")  # also matches a crashed write's ``.tmp-writing`` leftover
_ROLES = {
    c.EFFNET: "effnet",
    c.STAGE_A: "stage_a",
    c.CLIP_TEXT: "clip_text",
    c.CLIP_TEXT_POOLED: "clip_text",
    c.CLIP_IMG: "clip_image",
}
# per tensor column: (the released model, meaning, how to decode); ``{model}`` is the encoder that made the data
# (the released one, or the flavor that stood in for it), ``{c}`` the stored last dimension
_DOCS = {
    c.EFFNET: (
        "EfficientNetV2-S",
        "{model} encoder output: Stable Cascade's Stage C latent space (Stage C's x0), 16×h×w, one cell per "
        "32×32 pixels of the stored crop, BatchNorm-normalised (about mean 0, std 1)",
        "no extra scale. Decode with Stage B (diffusion conditioned on these latents as `effnet`, and on "
        "clip_text_pooled) to Stage A latents, then Stage A's decoder to pixels; or the Previewer (16→3 "
        "channels, ×8 upsampling) for a quick low-resolution look",
    ),
    c.STAGE_A: (
        "Stage A (VQGAN)",
        "{model} encoder output, unquantized and scaled: StageA.encode(x) = raw / 0.43, 4×H/4×W/4 for an H×W "
        "image in [0, 1]; Stage B's diffusion target",
        "StageA.decode(z) multiplies by 0.43 and decodes without quantization; for a decoder that expects raw "
        "latents, multiply by 0.43 first (diffusers' PaellaVQModel decodes latents·config.scale_factor and "
        "defaults to 0.3764: check vqgan/config.json)",
    ),
    c.CLIP_TEXT: (
        "CLIP-ViT-bigG-14 text encoder",
        "{model} hidden_states[-1] ({c} wide): the last layer before final_layer_norm (not last_hidden_state), "
        "all 77 positions including padding (pad id 0, attention mask passed); Stage C's clip_text",
        "a conditioning input, not decoded",
    ),
    c.CLIP_TEXT_POOLED: (
        "CLIP-ViT-bigG-14 text encoder",
        "{model} text_embeds (projected pooled output, {c}), stored as ({c},) per row; Stage C's "
        "clip_text_pooled takes it as (B, 1, {c}): reshape(n_rows, 1, {c})",
        "a conditioning input, not decoded",
    ),
    c.CLIP_IMG: (
        "CLIP ViT-L/14 vision encoder",
        "{model} image_embeds (projection, {c}, unnormalised) of the stored crop, stored as ({c},) per row; "
        "Stage C's clip_img takes it as (B, 1, {c}) (official training feeds it for 10% of samples and zeros "
        "otherwise)",
        "a conditioning input, not decoded",
    ),
}
RANDOM_WEIGHTS_WARNING = (
    "made by encoders on seeded random weights (*/tiny flavors without weights files): the tensors test "
    "pipelines and mean nothing about the images"
)


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """An export job.

    Attributes:
        latents: the latent cache (an encode output directory, local or ``s3://``).
        output_dir: where ``{bucket}/part-NNNNN.parquet`` and ``export_manifest.json`` go.
        format: the cache's file format to read: ``parquet`` (default) or ``webdataset``.
        dtype: exported tensor dtype, ``float16`` (default) or ``float32``; bfloat16 has no portable Parquet
            type (float32 holds bfloat16 caches exactly).
        columns: tensor columns to export (subset of effnet, stage_a, clip_text, clip_text_pooled, clip_img,
            and the cache's Stage B conditioning columns ``stage_b_effnet_{s}``); None: all the cache has
            but the Stage B ones (exported only by name). Key, caption and the scalar columns always are.
        rows_per_file: most rows per Parquet file (2000 real fp16 rows ≈ 430 MB without Stage A).
        buckets: buckets (``WxH`` latent cells) to export; None: all.
        endpoint_url: S3 endpoint of the cache; output_endpoint_url: S3 endpoint of the output.
        on_stale: an output exported with another config or from another cache: ``redo`` (default: the export
            is replaced) or ``refuse``.
        resources: one task per cache shard (``concurrency`` caps the parallel tasks).
    """

    latents: str
    output_dir: str
    format: str = "parquet"
    dtype: str = "float16"
    columns: tuple[str, ...] | None = None
    rows_per_file: int = 2000
    buckets: tuple[str, ...] | None = None
    endpoint_url: str | None = None
    output_endpoint_url: str | None = None
    on_stale: str = "redo"
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(num_cpus=1, batch_size=1,
                                                                                 concurrency=8))  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("latents", "output_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a non-empty path or URL")
        if self.latents.rstrip("/") == self.output_dir.rstrip("/"):
            raise ValueError(f"output_dir={self.output_dir!r} must differ from latents")
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}; allowed: {', '.join(FORMATS)}")
        if self.dtype in ("bfloat16", "bf16"):
            raise ValueError(
                f"dtype={self.dtype!r}: bfloat16 has no Parquet/Arrow type that polars, duckdb or HF datasets "
                "read; use 'float32' (exact for bfloat16 caches) or 'float16'"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; allowed: {', '.join(DTYPES)}")
        _check_subset(
            "columns",
            self.columns,
            lambda v: isinstance(v, str) and c.is_latent_tensor_column(v),
            f"any of {list(TENSOR_COLUMNS)} or {c.STAGE_B_EFFNET_PREFIX}{{cells}}",
        )
        _check_subset("buckets", self.buckets, lambda v: bool(_BUCKET.match(str(v))), "'WxH' latent cells")
        if isinstance(self.rows_per_file, bool) or not isinstance(self.rows_per_file, int):
            raise ValueError(f"rows_per_file={self.rows_per_file!r} must be an integer")
        if self.rows_per_file < 1:
            raise ValueError(f"rows_per_file={self.rows_per_file} must be >= 1")

    def input_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}

    def output_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.output_endpoint_url} if self.output_endpoint_url else {}


def _check_subset(name: str, values: Sequence[str] | None, ok: Any, allowed: str) -> None:
    if values is None:
        return
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{name}={values!r} must be a list of names, or None for all")
    bad = [v for v in values if not ok(v)]
    if not values or bad or len(set(values)) != len(values):
        raise ValueError(f"{name}={list(values)!r}: {bad or 'empty or repeated'} not allowed; {allowed}")


@dataclass(frozen=True)
class ExportSummary:
    """What an export wrote: file URIs in manifest order, rows per bucket, total rows and the manifest URI."""

    output_dir: str
    files: tuple[str, ...]
    rows_per_bucket: dict[str, int]
    n_rows: int
    manifest: str


@dataclass(frozen=True)
class CacheFile:
    """One cache file to export: its URI, bucket and rows."""

    uri: str
    bucket: str
    rows: int


@dataclass
class ExportPlan:
    """The cache's shards (their files in the chosen buckets) and each chosen bucket's metadata."""

    units: dict[str, list[CacheFile]]
    metas: dict[str, FileMetadata]
    cache: dict[str, Any]

    @property
    def rows_per_bucket(self) -> dict[str, int]:
        rows: dict[str, int] = {b: 0 for b in self.metas}
        for files in self.units.values():
            for f in files:
                rows[f.bucket] += f.rows
        return rows


def run_export(config: ExportConfig) -> ExportSummary:
    """Export the cache as Parquet, one Ray task per cache shard.

    Raises:
        ValueError: naming the config field: no cache at ``latents``, ``columns`` or ``buckets`` the cache
            lacks, values that overflow ``dtype``; SchemaMismatchError: a cache file disagrees with the others.
    """

    plan = plan_export(config)
    store = CommitStore(config.output_dir, config.output_options())
    if store.read_json(MANIFEST) is not None and store.read_json(FINGERPRINT) is None:
        notice(
            f"output_dir={config.output_dir!r} holds an export from before per-shard commits: replacing it"
        )
        store.wipe()
    output = JobOutput(store, export_fingerprint(config, plan), config.on_stale, manifest=MANIFEST)
    todo = output.start(plan.units)
    base = config.output_dir.rstrip("/")
    empty_caption = _copy_empty_caption(config, plan.cache, base)
    new = {}
    if todo:
        models = {b: model_metadata(m, config, plan.cache, b, empty_caption) for b, m in plan.metas.items()}
        task = ExportTaskConfig(config=config, metas=plan.metas, models=models, store=store)
        steps = Plan((SHARD_ID, "files"), [PlannedStep(ExportShards, task, config.resources)])
        items = [
            {SHARD_ID: u, "files": json.dumps([dataclasses.astuple(f) for f in plan.units[u]])} for u in todo
        ]
        new = collect_records(steps, items, "export", samples="n_rows")
    records = {u: (output.records | new)[u] for u in plan.units}
    fields = export_manifest(config, plan, records, empty_caption)
    manifest = output.finish(new, plan.units, **fields)
    files = tuple(f"{base}/{f}" for f in manifest["files"])
    return ExportSummary(
        config.output_dir, files, plan.rows_per_bucket, manifest["n_rows"], f"{base}/{MANIFEST}"
    )


def export_fingerprint(config: ExportConfig, plan: ExportPlan) -> dict[str, Any]:
    """What makes the export: the cache's encoders and what the config takes from it."""
    cache = {k: plan.cache.get(k) for k in ("encoder_flavors", "weights_sha256", "preprocessing_hash")}
    return {"cache": config.latents, "format": config.format, "dtype": config.dtype, "columns": config.columns,
            "rows_per_file": config.rows_per_file, "buckets": sorted(plan.metas), "cache_fingerprint": cache}  # fmt: skip


def export_manifest(
    config: ExportConfig, plan: ExportPlan, records: Mapping[str, Any], empty_caption: str | None
) -> dict[str, Any]:
    """``export_manifest.json``'s fields: config, source, model metadata, files and rows per bucket."""
    files = sorted(f["path"] for r in records.values() for f in r["files"])
    first = plan.metas[min(plan.metas)]
    rows = plan.rows_per_bucket
    buckets = {
        b: {
            "n_rows": rows[b],
            "files": [f for f in files if f.startswith(f"{b}/")],
            "tensor_shapes": _shapes(m, config),
        }
        for b, m in sorted(plan.metas.items())
    }
    return {
        "schema": "export@1",
        "layout": "{bucket}/part-{shard}-NNNNN.parquet",
        "config": {
            "format": config.format,
            "dtype": config.dtype,
            "columns": _columns(config, first),
            "rows_per_file": config.rows_per_file,
            "buckets": sorted(plan.metas),
        },
        "source": {"latents": config.latents, "n_files": sum(len(f) for f in plan.units.values())},
        "model": model_metadata(first, config, plan.cache, None, empty_caption),
        "buckets": buckets,
        "files": files,
        "n_rows": sum(rows.values()),
    }


def plan_export(config: ExportConfig) -> ExportPlan:
    """The cache's shards and files in the chosen buckets, and each bucket's metadata, checked against the
    cache manifest and ``config``. From an encode manifest: one footer read per bucket; a folder of latent
    files without one: every footer, concurrently, each file its own shard."""
    cache = _cache_manifest(config)
    options = config.input_options()
    try:
        records = committed_records(config.latents, options)
        listed = None if records is not None else list_latent_files(config.latents, config.format, options)
    except FileNotFoundError as err:
        raise ValueError(f"latents={config.latents!r}: no latent cache there ({err})") from None
    expect = FileMetadata(
        encoder_flavors=cache.get("encoder_flavors", {}),
        weights_sha256=cache.get("weights_sha256", {}),
        preprocessing_hash=cache.get("preprocessing_hash", ""),
    )
    base = config.latents.rstrip("/")
    entries = [(s, f) for s, r in sorted((records or {}).items()) for f in r.get("files", ())]
    if entries and all(isinstance(f, dict) for _, f in entries):  # rows and buckets are in the records
        units: dict[str, list[CacheFile]] = {}
        for shard, f in entries:
            if f["path"].startswith(f"{config.format}/"):
                units.setdefault(shard, []).append(
                    CacheFile(f"{base}/{f['path']}", f["bucket"], int(f["rows"]))
                )
        firsts = {}
        for files in units.values():
            for f in files:
                firsts.setdefault(f.bucket, f.uri)
        metas = _footers(config, sorted(firsts.values()), expect)
        metas = {b: metas[u][0] for b, u in firsts.items()}
    else:  # no per-file rows and buckets: read every footer
        uris = listed if listed is not None else sorted(f"{base}/{p}" for _, f in entries
                                                       for p in file_paths({"files": [f]})
                                                       if p.startswith(f"{config.format}/"))  # fmt: skip
        infos = _footers(config, uris, expect)
        shard_of = {f"{base}/{p}": s for s, r in (records or {}).items() for p in file_paths(r)}
        units, metas = {}, {}
        for uri in uris:
            meta, rows = infos[uri]
            bucket = _bucket(meta)
            if metas.setdefault(bucket, meta).tensor_shapes != meta.tensor_shapes:
                raise ValueError(
                    f"latents={config.latents!r}: {uri} has tensor shapes {_shapes(meta, None)}, other "
                    f"files of bucket {bucket} have {_shapes(metas[bucket], None)}"
                )
            unit = shard_of.get(uri, posixpath.basename(uri).split(".", 1)[0])
            units.setdefault(unit, []).append(CacheFile(uri, bucket, rows))
    return _choose(config, cache, units, metas)


def _footers(
    config: ExportConfig, uris: list[str], expect: FileMetadata
) -> dict[str, tuple[FileMetadata, int]]:
    kwargs = {"expect": expect, "storage_options": config.input_options()}
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(uris)))) as pool:
        infos = dict(
            zip(uris, pool.map(lambda uri: file_info(uri, config.format, **kwargs), uris), strict=True)
        )
    first = replace(next(iter(infos.values()))[0], tensor_shapes={}) if infos else None
    for uri, (meta, _) in infos.items():
        check_expected(meta, first, uri)  # flavors, weights and preprocessing agree across the cache
    return infos


def _bucket(meta: FileMetadata) -> str:
    _, h, w = meta.tensor_shapes[c.EFFNET].shape
    return f"{w}x{h}"


def _choose(config: ExportConfig, cache: dict[str, Any], units: dict[str, list[CacheFile]],
            metas: dict[str, FileMetadata]) -> ExportPlan:  # fmt: skip
    """Keep the chosen buckets (refusing ones the cache lacks) and the columns the cache has."""
    have = sorted({f.bucket for files in units.values() for f in files if f.rows})
    chosen = [b for b in have if not config.buckets or b in config.buckets]
    missing = sorted(set(config.buckets or ()) - set(chosen))
    if missing or not chosen:
        raise ValueError(
            f"buckets={config.buckets!r}: the cache at {config.latents!r} has no rows in "
            f"{missing or 'any bucket'}; it has {have}"
        )
    _columns(config, metas[chosen[0]])  # columns the cache lacks: refused before writing anything
    kept = {u: [f for f in sorted(files, key=lambda f: f.uri) if f.bucket in chosen and f.rows]
            for u, files in units.items()}  # fmt: skip
    return ExportPlan(
        {u: files for u, files in sorted(kept.items()) if files}, {b: metas[b] for b in chosen}, cache
    )


@dataclass(frozen=True, kw_only=True)
class ExportTaskConfig:
    """What every export task needs: the job config, per bucket its metadata and model JSON, the output."""

    config: ExportConfig
    metas: dict[str, FileMetadata]
    models: dict[str, dict[str, Any]]
    store: CommitStore


class ExportShards(Step):
    """One task per cache shard: its buckets' rows (sorted by key) in files of ``rows_per_file``, committed."""

    name = "export"
    requires = (SHARD_ID, "files")
    produces = (SHARD_ID, "record")

    def __call__(self, batch: Batch) -> Batch:
        task: ExportTaskConfig = self.config
        records = []
        for unit, files in zip(batch[SHARD_ID], batch["files"], strict=True):
            files = [CacheFile(*f) for f in json.loads(files)]
            written = []
            for bucket in sorted({f.bucket for f in files}):
                uris = [f.uri for f in files if f.bucket == bucket]
                written += _export_bucket(task, str(unit), bucket, uris)
            counts = Counter({f"bucket:{f['bucket']}": f["rows"] for f in written})
            record = {"shard_id": str(unit), "files": written, "n_rows": sum(f["rows"] for f in written)}
            records.append(task.store.commit(str(unit), record | dict(counts)))
        return {SHARD_ID: object_column(str(u) for u in batch[SHARD_ID]),
                "record": object_column(json.dumps(r) for r in records)}  # fmt: skip


def _columns(config: ExportConfig, meta: FileMetadata) -> list[str]:
    """The tensor columns to export, in schema order (Stage B conditioning columns only when named)."""
    stage_b = [c.stage_b_effnet_column(s) for s in c.stage_b_cells_of(meta.tensor_shapes)]
    have = [name for name in TENSOR_COLUMNS if name in meta.tensor_shapes] + stage_b
    lacking = sorted(set(config.columns or ()) - set(have))
    if lacking:
        raise ValueError(f"columns={list(config.columns or ())!r}: the cache has no {lacking}; it has {have}")
    if config.columns is None:
        return [name for name in have if name not in stage_b]
    return [name for name in have if name in config.columns]


def _shapes(meta: FileMetadata, config: ExportConfig | None) -> dict[str, list[int]]:
    names = _columns(config, meta) if config else list(meta.tensor_shapes)
    return {name: list(meta.tensor_shapes[name].shape) for name in names}


def file_schema(meta: FileMetadata, config: ExportConfig) -> RecordSchema:
    """export@1 for one bucket, restricted to the chosen tensor columns (``huggingface`` features to match)."""
    full = export_schema({name: spec.shape for name, spec in meta.tensor_shapes.items()}, config.dtype)
    keep = set(SCALAR_COLUMNS) | set(_columns(config, meta))
    arrow = pa.schema([f for f in full.arrow if f.name in keep])
    arrow = arrow.with_metadata({b"huggingface": json.dumps(huggingface_features(arrow)).encode()})
    return RecordSchema(full.name, full.version, arrow, full.doc)


def _export_bucket(task: ExportTaskConfig, unit: str, bucket: str, uris: list[str]) -> list[dict[str, Any]]:
    """Stage one shard's rows of one bucket as parts of ``rows_per_file`` rows; returns the staged files."""
    config, meta = task.config, task.metas[bucket]
    schema = file_schema(meta, config)
    tensors = _columns(config, meta)
    file_meta = FileMetadata(
        encoder_flavors=meta.encoder_flavors,
        weights_sha256=meta.weights_sha256,
        preprocessing_hash=meta.preprocessing_hash,
        stage_b_conditioning=meta.stage_b_conditioning if _stage_b(tensors) else {},
        random_weights=meta.made_by_random_weights,
    )
    expect = replace(file_meta, tensor_shapes=meta.tensor_shapes)
    row_bytes = sum(math.prod(s) for s in _shapes(meta, config).values()) * np.dtype(config.dtype).itemsize
    row_group = max(1, ROW_GROUP_BYTES // max(1, row_bytes))
    tables = [
        _to_export(read_latent_table(uri, config.format, expect=expect, storage_options=config.input_options(),
                                     columns=[*SCALAR_COLUMNS, *tensors]), schema, bucket, uri, config.dtype)
        for uri in uris
    ]  # fmt: skip
    table = pa.concat_tables(tables)
    table = table.take(
        pc.sort_indices(table, sort_keys=[(c.KEY, "ascending"), (c.SOURCE_SHARD, "ascending")])
    )
    written = []
    for k, start in enumerate(range(0, table.num_rows, config.rows_per_file)):
        part = attach_metadata(table.slice(start, config.rows_per_file), schema, file_meta)
        part = part.replace_schema_metadata(
            {**part.schema.metadata, MODEL_KEY.encode(): _json(task.models[bucket])}
        )
        name = f"{bucket}/part-{unit}-{k:05d}.parquet"
        task.store.stage(unit, name, _parquet_bytes(part, tensors, row_group))
        written.append({"path": name, "rows": part.num_rows, "bucket": bucket})
    return written


def _to_export(table: pa.Table, schema: RecordSchema, bucket: str, uri: str, dtype: str) -> pa.Table:
    """One latents@1 table as export@1 rows (no metadata yet), sorted by key, tensors in ``dtype``."""
    found = set(table.column(c.BUCKET).to_pylist())
    if found - {bucket}:
        raise ValueError(f"{uri}: rows of bucket(s) {sorted(found)} in a file whose effnet shape is {bucket}")
    order = pc.sort_indices(table, sort_keys=[(c.KEY, "ascending"), (c.SOURCE_SHARD, "ascending")])
    arrays = []
    for f in schema.arrow:
        column = table.column(f.name)
        if f.name not in SCALAR_COLUMNS:
            values = _convert(tensor_to_numpy(column)[order.to_numpy()], dtype, f.name, uri)
            arrays.append(nested_list_array(values, dtype))
        else:
            arrays.append(column.take(order).combine_chunks())
    return pa.Table.from_arrays(arrays, schema=schema.arrow.remove_metadata())


def _convert(stored: np.ndarray, dtype: str, name: str, uri: str) -> np.ndarray:
    """Stored cache values (float16, bfloat16 bits as uint16, float32) in ``dtype``; overflow is refused."""
    if stored.dtype == np.dtype(dtype):
        return stored
    with np.errstate(over="ignore"):
        values = to_float32(stored).astype(dtype)
    bad = values.size - int(np.count_nonzero(np.isfinite(values)))
    if bad:
        raise ValueError(
            f"dtype={dtype!r}: {bad} value(s) of column {name!r} in {uri} overflow it; export as float32"
        )
    return values


def _parquet_bytes(table: pa.Table, tensors: Sequence[str], row_group: int) -> bytes:
    """zstd, dictionary and statistics on scalar columns only, page CRCs, plain encodings (every reader)."""
    scalars = [name for name in table.column_names if name not in tensors]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=row_group,
        compression="zstd",
        use_dictionary=scalars,
        write_statistics=scalars,
        write_page_checksum=True,
    )
    return sink.getvalue().to_pybytes()


def model_metadata(
    meta: FileMetadata,
    config: ExportConfig,
    cache: Mapping[str, Any],
    bucket: str | None,
    empty_caption: str | None,
) -> dict[str, Any]:
    """The ``cascade.model`` JSON: flavors, weights, preprocessing, and per tensor column its shape, dtype,
    meaning, scale and how to decode it (shapes are per file: ``bucket`` None describes the effnet as 16×h×w)."""
    tensors: dict[str, Any] = {}
    names = _columns(config, meta)
    random = meta.made_by_random_weights
    for name in names:
        role = _ROLES.get(name, "effnet")  # stage_b_effnet_{s}: the effnet encoder's
        flavor = meta.encoder_flavors.get(role)
        meaning, decode = _doc(name, meta.tensor_shapes[name].shape, flavor, random)
        shape: list[int | str] = list(meta.tensor_shapes[name].shape)
        if bucket is None and name in (c.EFFNET, c.STAGE_A):
            shape = [shape[0], "h" if name == c.EFFNET else "H/4", "w" if name == c.EFFNET else "W/4"]
        tensors[name] = {
            "shape": shape,
            "dtype": config.dtype,
            "role": role,
            "flavor": flavor,
            "meaning": meaning,
            "scale": _stage_a_scale(meta) if name == c.STAGE_A else 1.0,
            "decode": decode,
        }
    return {
        "schema": "export@1",
        "bucket": bucket,
        "bucket_meaning": "WxH in Stage C latent cells (effnet shape 16×H×W, 32 px per cell)",
        "dtype": config.dtype,
        "layout": "tensor columns are nested fixed-size lists in C (row-major) order; "
        "numpy: np.asarray(values).reshape(n_rows, *shape)",
        "encoder_flavors": dict(meta.encoder_flavors),
        "random_weights": random,
        "warning": RANDOM_WEIGHTS_WARNING if random else None,
        "weights_sha256": dict(meta.weights_sha256),
        "preprocessing_hash": meta.preprocessing_hash,
        "preprocessing": cache.get("preprocessing"),
        "tensors": tensors,
        "empty_caption": _empty_caption_doc(empty_caption),
    } | ({"stage_b_conditioning": dict(meta.stage_b_conditioning)} if _stage_b(names) else {})


def _doc(name: str, shape: Sequence[int], flavor: str | None, random: bool) -> tuple[str, str]:
    """(meaning, decode) of a tensor column, naming the encoder that made it and the stored width."""
    if name not in _DOCS:
        return _stage_b_doc(name)
    released, meaning, decode = _DOCS[name]
    model = released
    if flavor is not None and flavor.endswith("/tiny"):
        weights = "seeded random weights" if random else "its own weights"
        model = f"{flavor} (a small stand-in for the {released}, {weights})"
    return meaning.format(model=model, c=shape[-1]), decode


def _stage_b(names: Sequence[str]) -> bool:
    return any(c.stage_b_effnet_cells(name) is not None for name in names)


def _stage_b_doc(name: str) -> tuple[str, str]:
    s = c.stage_b_effnet_cells(name)
    return (
        f"Stage B conditioning: EfficientNetV2-S latent (16×{s}×{s}, the effnet column's encoder) of the Stage A "
        f"crop resized with NEAREST to {32 * s}×{32 * s} px, as official train_b.py draws it (factor f ~ U(0.5, 1), "
        "size ⌊S·f/32⌋·32); stage_b_conditioning tells the stored sizes and the draw",
        "a conditioning input of Stage B (its `effnet`), not decoded",
    )


def _empty_caption_doc(name: str | None) -> dict[str, Any] | None:
    if name is None:
        return None
    return {
        "file": name,
        "where": "export root (the folder above the bucket folders)",
        "tensors": [c.CLIP_TEXT, c.CLIP_TEXT_POOLED],
        "dtype": "float32",
        "use": "the text embedding of '' for caption dropout (Stage C: 5%)",
    }


def _stage_a_scale(meta: FileMetadata) -> float:
    flavor = meta.encoder_flavors.get("stage_a")
    try:
        from stages.stage_a import FLAVORS  # torch: only imported when Stage A latents are exported
    except ImportError:  # pragma: no cover - torch is a dependency
        return STAGE_A_SCALE
    config = FLAVORS.get(flavor or "")
    return float(config.scale_factor) if config is not None else STAGE_A_SCALE


def _cache_manifest(config: ExportConfig) -> dict[str, Any]:
    """The cache's ``manifest.json`` (encode output), or {} for a plain folder of latent files."""
    fs, path = fsspec.core.url_to_fs(config.latents, **config.input_options())
    manifest = f"{path.rstrip('/')}/manifest.json"
    return json.loads(fs.cat_file(manifest)) if fs.isdir(path) and fs.exists(manifest) else {}


def _copy_empty_caption(config: ExportConfig, cache: Mapping[str, Any], base: str) -> str | None:
    """Copy the cache's empty-caption embedding next to the bucket folders; its name, or None if absent."""
    name = cache.get("empty_caption")
    if not name:
        return None
    fs, path = fsspec.core.url_to_fs(config.latents, **config.input_options())
    source = f"{path.rstrip('/')}/{name}"
    if not fs.exists(source):
        return None
    write_bytes(f"{base}/{EMPTY_CAPTION}", fs.cat_file(source), config.output_options())
    return EMPTY_CAPTION


def _json(value: Any, indent: int | None = None) -> bytes:
    return json.dumps(value, sort_keys=True, indent=indent, ensure_ascii=False).encode()
