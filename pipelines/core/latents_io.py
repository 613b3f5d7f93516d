"""The one writer of latent shards: a latents@1 Arrow table, written as Parquet and/or WebDataset.

``to_latent_table`` converts one bucket's encoder outputs to the storage dtype once; both formats are
serialised from that table, so they hold bit-identical tensors. The pooled embeddings (``clip_text_pooled``,
``clip_img``) are stored as (C,) per row, whatever shape they come in; Stage C takes them as (B, 1, C), which
the readers give on request (``latents_reader.stage_c_shapes``). Layout 2 (``LAYOUT``), one folder per bucket
so that standard readers take a bucket by path:

* Parquet (``{base}/parquet/{bucket}/{name}.parquet``, bucket ``WxH`` latent cells): one row group per file
  (one bucket per file), tensor columns as Arrow fixed-shape tensors, the ``cascade.*`` keys in the schema
  metadata. The folders are plain names, not hive ``bucket=`` ones: ``bucket`` is already a column, and
  ``pq.read_table`` would infer a dictionary partition column that cannot merge with it. zstd, no
  dictionary on tensor columns, BYTE_STREAM_SPLIT on float32 and bfloat16 (uint16, INT32 physical) tensor
  columns. Measured on random-normal latents of the real shapes: bytes / raw tensor bytes = 0.92 (fp16),
  0.69 (bf16), 0.85 (fp32). BYTE_STREAM_SPLIT would take fp16 to 0.85, but DuckDB refuses it on float16 (a
  FIXED_LEN_BYTE_ARRAY column), so fp16 columns are plain zstd. Dictionary pages inflate random floats.
  Every page carries a CRC32 that the reader verifies.
* WebDataset (``{base}/webdataset/{bucket}/{name}.tar``): per sample, in row order, ``key.json`` (the scalar
  columns, the original key, ``cascade.dtype`` and the file's ``cascade.*`` metadata keys with JSON values,
  plus ``cascade.member_format``, ``cascade.num_samples`` and ``cascade.layout``) and either
  ``key.<column>.npy`` per tensor column (bfloat16 as its uint16 bit patterns:
  ``torch.from_numpy(a).view(torch.bfloat16)``) or one ``key.safetensors`` holding every tensor column
  (bfloat16 as real ``BF16``, written by safetensors' own serializer without torch:
  ``safetensors.torch.load`` returns torch.bfloat16). Every member belongs to a sample, so plain
  ``webdataset.WebDataset(url).decode()`` yields exactly the file's samples. Bytes are deterministic
  (mtime 0, fixed modes and order).

Layout 1 (caches written before): ``{base}/{format}/{name}.{ext}`` without bucket folders, and tars whose first
member ``__metadata__.json`` held the metadata. The project's readers read both (an encode output lists its
files in its manifest); standard readers need layout 2: re-encode into a new output to get it.

Each file is written at once with ``pipelines.core.shards.write_bytes`` (temp + rename, or one S3 PUT).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors

from pipelines.core.shards import safe_key
from pipelines.core.storage import write_bytes
from schemas import columns as c
from schemas.core import (
    METADATA_KEYS,
    OPTIONAL_METADATA_KEYS,
    PREPROCESSING_HASH_KEY,
    SCHEMA_KEY,
    FileMetadata,
    attach_metadata,
)
from schemas.records import POOLED_COLUMNS, latents_schema
from schemas.specs import canonical_dtype
from schemas.tensors import tensor_array, tensor_to_numpy

FORMATS = ("parquet", "webdataset")
MEMBER_FORMATS = ("npy", "safetensors")
LAYOUT = 2  # file layout version (module docstring); recorded in the encode manifest and each sample's json
LAYOUT_KEY = "cascade.layout"
METADATA_MEMBER = "__metadata__.json"  # layout 1 only: the tar's first member held the file metadata
MEMBER_FORMAT_KEY = "cascade.member_format"  # extra keys of each key.json (layout 1: of __metadata__.json)
NUM_SAMPLES_KEY = "cascade.num_samples"
DTYPE_KEY = "cascade.dtype"  # in key.json and the safetensors header: the logical tensor dtype
SCALAR_COLUMNS = (c.KEY, c.CAPTION, c.SOURCE_SHARD, c.IMAGE_SHA256, c.BUCKET, c.ORIG_WIDTH, c.ORIG_HEIGHT,
                  c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM)  # fmt: skip
_TEXT_KEYS = (SCHEMA_KEY, PREPROCESSING_HASH_KEY)  # plain strings; the other cascade.* values are JSON
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=-]*$")
_BUCKET = re.compile(r"^[1-9][0-9]*x[1-9][0-9]*$")
EXTENSIONS = {"parquet": ".parquet", "webdataset": ".tar"}


def to_latent_table(
    rows: Mapping[str, Any], dtype: str = "float16", metadata: FileMetadata | None = None
) -> pa.Table:
    """One bucket's latent rows as a latents@1 table with the ``cascade.*`` metadata.

    Args:
        rows: column -> values: the scalar columns of latents@1 as 1-D sequences, tensor columns
            (``effnet``, ``clip_text``, ``clip_text_pooled``, ``clip_img``, optional ``stage_a`` and
            ``stage_b_effnet_{s}``) as (N, *shape) float arrays (uint16 arrays are taken as bfloat16 bit
            patterns).
        dtype: storage dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        metadata: encoder flavors, weights sha256 and preprocessing hash; schema id and tensor shapes are
            filled in from the schema.

    Raises:
        ValueError: unknown or missing columns, ragged lengths, several buckets, duplicate keys, or values
            that are not finite in ``dtype`` (e.g. fp16 overflow).
    """
    dtype = canonical_dtype(dtype)
    unknown = sorted(n for n in rows if n not in SCALAR_COLUMNS and not c.is_latent_tensor_column(n))
    if unknown:
        raise ValueError(f"rows has column(s) {unknown} that latents@1 does not store")
    tensors = {name: np.asarray(values) for name, values in rows.items() if c.is_latent_tensor_column(name)}
    for name in POOLED_COLUMNS:  # one stored shape: (C,); Stage C's (N, 1, C) is squeezed
        if name in tensors and tensors[name].ndim == 3 and tensors[name].shape[1] == 1:
            tensors[name] = tensors[name][:, 0]
    shapes = {name: values.shape[1:] for name, values in tensors.items()}
    schema = latents_schema(shapes, dtype)  # ValueError on missing tensor columns or bad ranks
    missing = [name for name in SCALAR_COLUMNS if name not in rows]
    if missing:
        raise ValueError(f"rows is missing scalar column(s) {missing}")
    lengths = {name: len(rows[name]) for name in rows}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"columns have different lengths: {lengths}")
    buckets = sorted({str(b) for b in rows[c.BUCKET]})
    if len(buckets) > 1:
        raise ValueError(f"one file holds one bucket, rows has {buckets}")
    keys = [str(k) for k in rows[c.KEY]]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate keys: {sorted({k for k in keys if keys.count(k) > 1})[:5]}")
    arrays = {}
    for f in schema.arrow:
        if f.name in tensors:
            with np.errstate(over="ignore"):  # overflow to inf is reported below, naming the column
                arrays[f.name] = tensor_array(tensors[f.name], dtype)
            _check_finite(f.name, tensor_to_numpy(arrays[f.name]), dtype)
        else:
            arrays[f.name] = pa.array(list(rows[f.name]), f.type)
    return attach_metadata(pa.table(arrays), schema, metadata)


def _check_finite(name: str, stored: np.ndarray, dtype: str) -> None:
    if dtype == "bfloat16":
        bad = int(np.count_nonzero((stored & 0x7F80) == 0x7F80))
    else:
        bad = int(stored.size - np.count_nonzero(np.isfinite(stored)))
    if bad:
        raise ValueError(f"column {name!r} has {bad} non-finite value(s) in {dtype} (NaN, inf or overflow)")


def tensor_columns(table: pa.Table) -> list[str]:
    """The fixed-shape tensor columns of ``table``, in schema order."""
    return [f.name for f in table.schema if isinstance(f.type, pa.FixedShapeTensorType)]


def table_dtype(table: pa.Table) -> str:
    """The logical tensor dtype of a latents@1 table (from its ``cascade.tensor_shapes``)."""
    dtypes = {spec.dtype for spec in FileMetadata.from_arrow(table.schema.metadata).tensor_shapes.values()}
    if len(dtypes) != 1:
        raise ValueError(f"a latents@1 table has one tensor dtype, found {sorted(dtypes)}")
    return dtypes.pop()


def parquet_bytes(table: pa.Table) -> bytes:
    """The Parquet file of a latents@1 table: one row group, zstd, layout as in the module docstring."""
    dtype = table_dtype(table)
    tensors = tensor_columns(table)
    split = [] if dtype == "float16" else [f"{name}.list.element" for name in tensors]
    scalars = [name for name in table.column_names if name not in tensors]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=max(1, table.num_rows),
        compression="zstd",
        use_dictionary=scalars,
        use_byte_stream_split=split or False,
        write_statistics=scalars,
        write_page_checksum=True,  # CRC32 per page: readers refuse flipped bits instead of returning them
    )
    return sink.getvalue().to_pybytes()


def file_metadata_json(table: pa.Table, member_format: str) -> dict[str, Any]:
    """The file metadata each ``key.json`` carries: the ``cascade.*`` keys with JSON values, member format,
    sample count and layout."""
    keys = (*METADATA_KEYS, *OPTIONAL_METADATA_KEYS)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items() if k.decode() in keys}
    out: dict[str, Any] = {k: v if k in _TEXT_KEYS else json.loads(v) for k, v in meta.items()}
    return out | {MEMBER_FORMAT_KEY: member_format, NUM_SAMPLES_KEY: table.num_rows, LAYOUT_KEY: LAYOUT}


def webdataset_bytes(table: pa.Table, member_format: str = "npy") -> bytes:
    """The WebDataset tar of a latents@1 table (layout in the module docstring)."""
    if member_format not in MEMBER_FORMATS:
        raise ValueError(f"member_format={member_format!r}; allowed: {list(MEMBER_FORMATS)}")
    if table.num_rows == 0:
        raise ValueError("a WebDataset latent file holds at least one sample (its metadata travels in them)")
    dtype = table_dtype(table)
    tensors = {name: tensor_to_numpy(table.column(name)) for name in tensor_columns(table)}
    scalars = {name: table.column(name).to_pylist() for name in table.column_names if name not in tensors}
    names = [safe_key(str(k)) for k in scalars[c.KEY]]
    if len(set(names)) != len(names):
        raise ValueError("keys collide once made WebDataset-safe (dots, slashes -> '_'); rename them")
    header = file_metadata_json(table, member_format) | {DTYPE_KEY: dtype}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, name in enumerate(names):
            record = {col: values[i] for col, values in scalars.items()} | header
            _member(tar, f"{name}.json", _json_bytes(record))
            if member_format == "npy":
                for col, values in tensors.items():
                    _member(tar, f"{name}.{col}.npy", _npy_bytes(values[i]))
            else:
                sample = {col: values[i] for col, values in tensors.items()}
                _member(tar, f"{name}.safetensors", safetensors_bytes(sample, dtype, {c.KEY: record[c.KEY]}))
    return buffer.getvalue()


def safetensors_bytes(tensors: Mapping[str, np.ndarray], dtype: str, metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of storage arrays (bfloat16 as uint16 bits, written with dtype ``BF16``)."""
    # the arrays must stay alive while serialize() reads their memory
    arrays = {name: np.ascontiguousarray(values) for name, values in tensors.items()}
    specs = {
        name: safetensors.TensorSpec(dtype=dtype, shape=a.shape, data_ptr=a.ctypes.data, data_len=a.nbytes)
        for name, a in arrays.items()
    }
    return bytes(safetensors.serialize(specs, metadata={**metadata, DTYPE_KEY: dtype}))


def _npy_bytes(values: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(values), allow_pickle=False)
    return out.getvalue()


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def latent_path(format: str, bucket: str, name: str) -> str:
    """The path of one latent file relative to the cache root: ``{format}/{bucket}/{name}.{ext}``."""
    if not _NAME.match(name):
        raise ValueError(f"name={name!r} must be a file name of [A-Za-z0-9_.=-] (derived from the shard id)")
    if not _BUCKET.match(bucket):
        raise ValueError(f"bucket={bucket!r} must be 'WxH' latent cells, e.g. '24x24'")
    return f"{format}/{bucket}/{name}{EXTENSIONS[format]}"


def latent_file_uris(base_uri: str, name: str, bucket: str) -> dict[str, str]:
    """Where ``write_latent_files`` puts each format of shard ``name`` of ``bucket``."""
    base = base_uri.rstrip("/")
    return {fmt: f"{base}/{latent_path(fmt, bucket, name)}" for fmt in FORMATS}


def write_latent_files(
    table: pa.Table,
    base_uri: str,
    name: str,
    formats: Sequence[str] = FORMATS,
    member_format: str = "npy",
    storage_options: dict[str, Any] | None = None,
) -> list[str]:
    """Write one bucket's latents@1 table in each of ``formats``, each file atomically; return the URIs.

    Args:
        table: from ``to_latent_table`` (at least one row: the bucket folder comes from it).
        base_uri: local directory or fsspec URL (``s3://bucket/latents``).
        name: the shard name, derived from the input shard id (``00012``); no slashes.
        formats: ``parquet`` and/or ``webdataset``.
        member_format: ``npy`` or ``safetensors`` tensor members in the tar.
        storage_options: fsspec options (``endpoint_url``, credentials).
    """
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ValueError(f"formats={list(formats)}; allowed: a non-empty subset of {list(FORMATS)}")
    buckets = set(table.column(c.BUCKET).to_pylist())
    if len(buckets) != 1:
        raise ValueError(f"a latent file holds one bucket's rows, the table has {sorted(buckets)}")
    uris = latent_file_uris(base_uri, name, buckets.pop())
    written = []
    for fmt in dict.fromkeys(formats):
        data = parquet_bytes(table) if fmt == "parquet" else webdataset_bytes(table, member_format)
        write_bytes(uris[fmt], data, storage_options)
        written.append(uris[fmt])
    return written
