"""``cascade export``: a latent cache → Parquet for third-party models (pyarrow, polars, duckdb, HF datasets).

Layout (export@1, ``schemas.records.export_schema``): one row per sample with ``key``, ``caption``, the scalar
columns (bucket, original size, crop box, image_sha256, source_shard) and the chosen tensor columns as nested
fixed-size lists (``fixed_size_list<fixed_size_list<float16>[w]>[h]`` ...), C order, float16 or float32. All
four readers load that without custom code (Arrow's ``fixed_shape_tensor`` is refused by HF datasets); the
``huggingface`` schema metadata describes the columns as nested ``List(length=n)`` features. duckdb has no
half type: it widens float16 to FLOAT exactly and shows the lists as ``FLOAT[][][]``.

Files: ``{output_dir}/{bucket}/part-{i:05d}.parquet`` (bucket ``WxH`` in latent cells, e.g. ``24x24``), at
most ``rows_per_file`` rows each. Tensor shapes are fixed within a bucket folder, so one bucket reads as one
fixed-shape table: ``{output_dir}/24x24/*.parquet``. The folders are not hive-style (``bucket=24x24``)
because ``bucket`` is already a column: pyarrow's hive discovery would clash with it. Rows are ordered by
source latent file (name order), then key: a rerun gives the same bytes. Each file carries the ``cascade.*``
keys and ``cascade.model`` (JSON: flavors, shapes, dtype, what each tensor means and how to decode it).

Exactly once: every file is written whole (temp + rename, or one S3 PUT); an old ``export_manifest.json`` is
removed first and the new one written last, after stale parts of earlier runs (other ``rows_per_file`` or
``buckets``) are deleted. A folder with a manifest therefore holds exactly the listed files, no duplicates.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.latents_io import FORMATS, SCALAR_COLUMNS
from pipelines.core.latents_reader import (
    check_expected,
    file_info,
    list_latent_files,
    read_latent_table,
    to_float32,
)
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
_DOCS = {
    c.EFFNET: (
        "EfficientNetV2-S encoder output: Stable Cascade's Stage C latent space (Stage C's x0), 16×h×w, one "
        "cell per 32×32 pixels of the stored crop, BatchNorm-normalised (about mean 0, std 1)",
        "no extra scale. Decode with Stage B (diffusion conditioned on these latents as `effnet`, and on "
        "clip_text_pooled) to Stage A latents, then Stage A's decoder to pixels; or the Previewer (16→3 "
        "channels, ×8 upsampling) for a quick low-resolution look",
    ),
    c.STAGE_A: (
        "Stage A (VQGAN) encoder output, unquantized and scaled: StageA.encode(x) = raw / 0.43, 4×H/4×W/4 for "
        "an H×W image in [0, 1]; Stage B's diffusion target",
        "StageA.decode(z) multiplies by 0.43 and decodes without quantization; for a decoder that expects raw "
        "latents, multiply by 0.43 first (diffusers' PaellaVQModel decodes latents·config.scale_factor and "
        "defaults to 0.3764: check vqgan/config.json)",
    ),
    c.CLIP_TEXT: (
        "CLIP-ViT-bigG-14 text encoder hidden_states[-1]: the last layer before final_layer_norm (not "
        "last_hidden_state), all 77 positions including padding (pad id 0, attention mask passed); Stage C's "
        "clip_text",
        "a conditioning input, not decoded",
    ),
    c.CLIP_TEXT_POOLED: (
        "CLIP-ViT-bigG-14 text_embeds (projected pooled output, 1280) as Stage C's clip_text_pooled (1×1280)",
        "a conditioning input, not decoded",
    ),
    c.CLIP_IMG: (
        "CLIP ViT-L/14 image_embeds (projection, 768, unnormalised) of the stored crop; Stage C's clip_img "
        "(official training feeds it for 10% of samples and zeros otherwise)",
        "a conditioning input, not decoded",
    ),
}


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """An export job.

    Attributes:
        latents: the latent cache (an encode output directory, local or ``s3://``).
        output_dir: where ``{bucket}/part-NNNNN.parquet`` and ``export_manifest.json`` go.
        format: the cache's file format to read: ``parquet`` (default) or ``webdataset``.
        dtype: exported tensor dtype, ``float16`` (default) or ``float32``; bfloat16 has no portable Parquet
            type (float32 holds bfloat16 caches exactly).
        columns: tensor columns to export (subset of effnet, stage_a, clip_text, clip_text_pooled, clip_img);
            None: all the cache has. Key, caption and the scalar columns are always exported.
        rows_per_file: most rows per Parquet file (2000 real fp16 rows ≈ 430 MB without Stage A).
        buckets: buckets (``WxH`` latent cells) to export; None: all.
        endpoint_url: S3 endpoint of the cache; output_endpoint_url: S3 endpoint of the output.
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
            "columns", self.columns, lambda v: v in TENSOR_COLUMNS, f"any of {list(TENSOR_COLUMNS)}"
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
    """What an export wrote: file URIs in write order, rows per bucket, total rows and the manifest URI."""

    output_dir: str
    files: tuple[str, ...]
    rows_per_bucket: dict[str, int]
    n_rows: int
    manifest: str


@dataclass
class _Bucket:
    """The cache files of one bucket (one fixed set of tensor shapes)."""

    name: str
    meta: FileMetadata
    files: list[str] = field(default_factory=list)
    n_rows: int = 0


def run_export(config: ExportConfig) -> ExportSummary:
    """Export the cache as Parquet, bucket by bucket (a plain loop: I/O bound, one file in memory at a time).

    Raises:
        ValueError: naming the config field: no cache at ``latents``, ``columns`` or ``buckets`` the cache
            lacks, values that overflow ``dtype``; SchemaMismatchError: a cache file disagrees with the others.
    """
    cache = _cache_manifest(config)
    buckets = plan_buckets(config, cache)
    out_fs, out_root = fsspec.core.url_to_fs(config.output_dir, **config.output_options())
    stale = _existing_outputs(out_fs, out_root)
    if out_fs.exists(f"{out_root}/{MANIFEST}"):
        out_fs.rm(f"{out_root}/{MANIFEST}")  # from here on the folder is incomplete until the new manifest
    base = config.output_dir.rstrip("/")
    empty_caption = _copy_empty_caption(config, cache, base)
    written: dict[str, list[str]] = {}
    for bucket in buckets:
        model = model_metadata(bucket.meta, config, cache, bucket.name, empty_caption)
        written[bucket.name] = _export_bucket(config, bucket, model, base)
    for path in sorted(stale - {f"{out_root}/{f}" for files in written.values() for f in files}):
        if out_fs.exists(path):  # a crashed write's temp file is gone once its part was rewritten
            out_fs.rm(path)
    manifest = export_manifest(config, cache, buckets, written, empty_caption)
    write_bytes(f"{base}/{MANIFEST}", _json(manifest, indent=2), config.output_options())
    files = tuple(f"{base}/{f}" for f in manifest["files"])
    rows = {b.name: b.n_rows for b in buckets}
    return ExportSummary(config.output_dir, files, rows, manifest["n_rows"], f"{base}/{MANIFEST}")


def export_manifest(
    config: ExportConfig,
    cache: Mapping[str, Any],
    buckets: Sequence[_Bucket],
    written: Mapping[str, list[str]],
    empty_caption: str | None,
) -> dict[str, Any]:
    """``export_manifest.json``: config, source, model metadata, files and rows per bucket (paths relative)."""
    return {
        "schema": "export@1",
        "layout": "{bucket}/part-NNNNN.parquet",
        "config": {
            "format": config.format,
            "dtype": config.dtype,
            "columns": _columns(config, buckets[0].meta),
            "rows_per_file": config.rows_per_file,
            "buckets": [b.name for b in buckets],
        },
        "source": {"latents": config.latents, "n_files": sum(len(b.files) for b in buckets)},
        "model": model_metadata(buckets[0].meta, config, cache, None, empty_caption),
        "buckets": {
            b.name: {"n_rows": b.n_rows, "files": written[b.name], "tensor_shapes": _shapes(b.meta, config)}
            for b in buckets
        },
        "files": [f for b in buckets for f in written[b.name]],
        "n_rows": sum(b.n_rows for b in buckets),
    }


def plan_buckets(config: ExportConfig, cache: Mapping[str, Any]) -> list[_Bucket]:
    """Group the cache files by bucket from their metadata (footers/tar headers only), checked against the
    cache manifest and ``config``; buckets in name order, files in name order."""
    try:
        files = list_latent_files(config.latents, config.format, config.input_options())
    except FileNotFoundError as err:
        raise ValueError(f"latents={config.latents!r}: no latent cache there ({err})") from None
    expect = FileMetadata(
        encoder_flavors=cache.get("encoder_flavors", {}),
        weights_sha256=cache.get("weights_sha256", {}),
        preprocessing_hash=cache.get("preprocessing_hash", ""),
    )
    kwargs = {"expect": expect, "storage_options": config.input_options()}
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(files)))) as pool:
        infos = list(pool.map(lambda uri: file_info(uri, config.format, **kwargs), files))
    first = replace(infos[0][0], tensor_shapes={}) if infos else None
    buckets: dict[str, _Bucket] = {}
    for uri, (meta, n_rows) in zip(files, infos, strict=True):
        check_expected(meta, first, uri)  # flavors, weights and preprocessing agree across the cache
        _, h, w = meta.tensor_shapes[c.EFFNET].shape
        bucket = buckets.setdefault(f"{w}x{h}", _Bucket(f"{w}x{h}", meta))
        if meta.tensor_shapes != bucket.meta.tensor_shapes:
            raise ValueError(
                f"latents={config.latents!r}: {uri} has tensor shapes {_shapes(meta, None)}, other "
                f"files of bucket {bucket.name} have {_shapes(bucket.meta, None)}"
            )
        if n_rows:
            bucket.files.append(uri)
            bucket.n_rows += n_rows
    chosen = sorted(b for b in buckets if buckets[b].n_rows and (not config.buckets or b in config.buckets))
    missing = sorted(set(config.buckets or ()) - set(chosen))
    if missing or not chosen:
        have = sorted(b for b in buckets if buckets[b].n_rows)
        raise ValueError(
            f"buckets={config.buckets!r}: the cache at {config.latents!r} has no rows in "
            f"{missing or 'any bucket'}; it has {have}"
        )
    _columns(config, buckets[chosen[0]].meta)  # columns the cache lacks: refused before writing anything
    return [buckets[b] for b in chosen]


def _columns(config: ExportConfig, meta: FileMetadata) -> list[str]:
    """The tensor columns to export, in schema order."""
    have = [name for name in TENSOR_COLUMNS if name in meta.tensor_shapes]
    lacking = sorted(set(config.columns or ()) - set(have))
    if lacking:
        raise ValueError(f"columns={list(config.columns or ())!r}: the cache has no {lacking}; it has {have}")
    return [name for name in have if config.columns is None or name in config.columns]


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


def _export_bucket(config: ExportConfig, bucket: _Bucket, model: dict[str, Any], base: str) -> list[str]:
    """Stream one bucket's cache files into parts of ``rows_per_file`` rows; returns the relative paths."""
    schema = file_schema(bucket.meta, config)
    tensors = _columns(config, bucket.meta)
    file_meta = FileMetadata(
        encoder_flavors=bucket.meta.encoder_flavors,
        weights_sha256=bucket.meta.weights_sha256,
        preprocessing_hash=bucket.meta.preprocessing_hash,
    )
    row_bytes = (
        sum(math.prod(s) for s in _shapes(bucket.meta, config).values()) * np.dtype(config.dtype).itemsize
    )
    row_group = max(1, ROW_GROUP_BYTES // max(1, row_bytes))
    written: list[str] = []
    pending: list[pa.Table] = []
    n_written = 0

    def flush(n: int) -> None:
        nonlocal n_written
        table = pa.concat_tables(pending)
        part = attach_metadata(table.slice(0, n), schema, file_meta)
        part = part.replace_schema_metadata({**part.schema.metadata, MODEL_KEY.encode(): _json(model)})
        name = f"{bucket.name}/part-{len(written):05d}.parquet"
        write_bytes(f"{base}/{name}", _parquet_bytes(part, tensors, row_group), config.output_options())
        written.append(name)
        n_written += n
        pending[:] = [table.slice(n)] if n < table.num_rows else []

    for uri in bucket.files:
        table = read_latent_table(
            uri, config.format, storage_options=config.input_options(), columns=[*SCALAR_COLUMNS, *tensors]
        )
        pending.append(_to_export(table, schema, bucket.name, uri, config.dtype))
        while sum(t.num_rows for t in pending) >= config.rows_per_file:
            flush(config.rows_per_file)
    if pending and sum(t.num_rows for t in pending):
        flush(sum(t.num_rows for t in pending))
    assert n_written == bucket.n_rows, (bucket.name, n_written, bucket.n_rows)  # footers vs rows read
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
    for name in _columns(config, meta):
        role = _ROLES[name]
        meaning, decode = _DOCS[name]
        shape: list[int | str] = list(meta.tensor_shapes[name].shape)
        if bucket is None and name in (c.EFFNET, c.STAGE_A):
            shape = [shape[0], "h" if name == c.EFFNET else "H/4", "w" if name == c.EFFNET else "W/4"]
        tensors[name] = {
            "shape": shape,
            "dtype": config.dtype,
            "role": role,
            "flavor": meta.encoder_flavors.get(role),
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
        "weights_sha256": dict(meta.weights_sha256),
        "preprocessing_hash": meta.preprocessing_hash,
        "preprocessing": cache.get("preprocessing"),
        "tensors": tensors,
        "empty_caption": _empty_caption_doc(empty_caption),
    }


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


def _existing_outputs(fs: Any, root: str) -> set[str]:
    """Part files (and crashed writes' temp files) of earlier exports into ``root``."""
    found = fs.glob(f"{root}/*/part-*") if fs.exists(root) else []
    return {p for p in found if _BUCKET.match(p.split("/")[-2]) and _PART.match(p.split("/")[-1])}


def _json(value: Any, indent: int | None = None) -> bytes:
    return json.dumps(value, sort_keys=True, indent=indent, ensure_ascii=False).encode()
