"""Read latent shards (Parquet or WebDataset, as ``pipelines.core.latents_io`` writes them), metadata first.

Every file is checked before any of its rows is returned: its ``cascade.*`` metadata must be latents@1 with
consistent columns and tensor shapes (``schemas.validate_table``), agree with ``expect`` (flavors, weights
sha256, preprocessing hash, shapes: a mismatch names the file, the found and the expected value) and be
complete and intact (Parquet page CRCs are verified; a truncated or corrupt file is refused by name). Both
formats are decoded into the same latents@1 table, so they yield the same batches: one per file (= one
bucket), ``{column: np.ndarray}``, scalar columns 1-D, tensor columns (N, *shape) in the stored dtype
(bfloat16 as uint16 bits) or, with ``float32=True``, as float32. The pooled embeddings are stored (C,) per row
and so read as (N, C); ``stage_c_shapes=True`` gives them as (N, 1, C), the shape Stage C takes.

Both file layouts read (``latents_io.LAYOUT``): bucket folders with the tar metadata in every sample's json
(layout 2), and the flat folders whose tars begin with ``__metadata__.json`` (layout 1).
"""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors

from pipelines.core.commits import CommitStore
from pipelines.core.latents_io import (
    DTYPE_KEY,
    EXTENSIONS,
    FORMATS,
    METADATA_MEMBER,
    NUM_SAMPLES_KEY,
    SCALAR_COLUMNS,
    tensor_columns,
)
from schemas import columns as c
from schemas.core import (
    METADATA_KEYS,
    OPTIONAL_METADATA_KEYS,
    FileMetadata,
    RecordSchema,
    SchemaMismatchError,
    attach_metadata,
    validate_table,
)
from schemas.records import POOLED_COLUMNS, latents_schema
from schemas.tensors import bfloat16_bits_to_float32, tensor_array, tensor_to_numpy

if TYPE_CHECKING:
    import ray.data

LATENTS_ID = "latents@1"
_SAFETENSORS_NUMPY = {"F16": np.float16, "BF16": np.uint16, "F32": np.float32}
_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
_ERRORS = {  # what a truncated or corrupt file raises while decoding (json and npy raise ValueError)
    "parquet": (pa.ArrowException, OSError, EOFError),
    "webdataset": (tarfile.TarError, EOFError, OSError, ValueError, safetensors.SafetensorError),
}
Batch = dict[str, np.ndarray]


class LatentFileError(ValueError):
    """A latent file that cannot be read: truncated, corrupt, or not in the layout the writer produces."""


def list_latent_files(
    root: str | Sequence[str], format: str = "parquet", storage_options: dict[str, Any] | None = None
) -> list[str]:
    """Sorted URIs of the ``format`` files under ``root``.

    For an encode output these are the files of committed shards only: from its manifest (one read), or, while
    it has none (a run in progress or killed), from its commit records (read concurrently).

    ``root`` is the ``base_uri`` given to ``write_latent_files`` (files in ``{root}/{format}/{bucket}/``, or
    ``{root}/{format}/`` in layout 1), a directory holding the files (or bucket folders of them), a single file,
    or a list of file URIs (returned as given, e.g. to pick buckets).
    """
    _check_format(format)
    if not isinstance(root, str):
        return list(root)
    ext = EXTENSIONS[format]
    fs, path = fsspec.core.url_to_fs(root, **(storage_options or {}))
    if path.endswith(ext) and fs.isfile(path):
        return [root]
    records = committed_records(root, storage_options)
    if records is not None:  # an encode output: only committed files count (a crash may leave others behind)
        files = [f for r in records.values() for f in file_paths(r) if f.startswith(f"{format}/")]
        return [f"{root.rstrip('/')}/{f}" for f in sorted(files)]
    for folder in (f"{path.rstrip('/')}/{format}", path):
        if fs.isdir(folder):  # the files, and the files in bucket folders (not _staging/ or other _ folders)
            found = fs.glob(f"{folder}/*{ext}") + fs.glob(f"{folder}/[!_]*/*{ext}")
            if found:
                local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
                return sorted(p if local else fs.unstrip_protocol(p) for p in found)
    raise FileNotFoundError(
        f"no *{ext} latent files under {root!r} (looked in {format}/, its bucket folders and the folder itself)"
    )


def committed_records(root: str, storage_options: dict[str, Any] | None = None) -> dict[str, dict] | None:
    """The commit records of an encode output (None for a plain folder of latent files)."""
    store = CommitStore(root, storage_options)
    manifest = store.read_json("manifest.json")
    if manifest is not None and "shards" in manifest:
        return manifest["shards"]
    committed = store.committed_ids()
    return store.records(committed) if committed else None


def file_paths(record: dict[str, Any]) -> list[str]:
    """A record's file paths (entries are ``{"path", "rows", "bucket"}``, or plain paths before those)."""
    return [f["path"] if isinstance(f, dict) else f for f in record.get("files", ())]


def read_latents(
    root: str | Sequence[str],
    format: str = "parquet",
    *,
    expect: FileMetadata | None = None,
    storage_options: dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    float32: bool = False,
    stage_c_shapes: bool = False,
) -> Iterator[Batch]:
    """Yield one validated batch per latent file under ``root`` (see ``list_latent_files``), in name order.

    Args:
        root: base URI, folder, file, or list of file URIs (local or fsspec URLs).
        format: ``parquet`` or ``webdataset``.
        expect: constraints on each file's metadata; empty fields are not checked, ``encoder_flavors``,
            ``weights_sha256`` and ``tensor_shapes`` per given entry (files are always latents@1).
        storage_options: fsspec options (``endpoint_url``, credentials).
        columns: columns to read (``key`` is always included, schema order); default all.
        float32: tensors as float32 instead of the stored dtype (bfloat16 is stored as uint16 bits).
        stage_c_shapes: ``clip_text_pooled`` and ``clip_img`` as (N, 1, C), as Stage C takes them (stored and
            otherwise read as (N, C)).

    Raises:
        SchemaMismatchError: a file's metadata or columns disagree with latents@1 or ``expect``.
        LatentFileError: a file is truncated or corrupt.
    """
    for uri in list_latent_files(root, format, storage_options):
        table = read_latent_table(
            uri, format, expect=expect, storage_options=storage_options, columns=columns
        )
        yield table_to_batch(table, float32=float32, stage_c_shapes=stage_c_shapes)


def read_latent_table(
    uri: str,
    format: str = "parquet",
    *,
    expect: FileMetadata | None = None,
    storage_options: dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """One latent file as a validated latents@1 table (its ``cascade.*`` metadata included)."""
    wanted = _columns(columns)
    with _open(uri, format, storage_options) as f:
        if format == "parquet":
            parquet = pq.ParquetFile(f, page_checksum_verification=True)  # one footer read
            _parquet_footer(uri, parquet, expect, wanted)  # before reading a row
            table = parquet.read(columns=wanted)
        else:
            with tarfile.open(fileobj=f, mode="r|") as tar:
                table = _tar_table(uri, tar, wanted, expect)
    validate_table(table, LATENTS_ID, source=uri, columns=wanted)  # the decoded rows, too
    return table


def read_file_metadata(
    uri: str,
    format: str = "parquet",
    *,
    expect: FileMetadata | None = None,
    storage_options: dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
) -> FileMetadata:
    """Validate one file's metadata without reading its rows (the Parquet footer, the tar's first member)."""
    return file_info(uri, format, expect=expect, storage_options=storage_options, columns=columns)[0]


def file_info(
    uri: str,
    format: str = "parquet",
    *,
    expect: FileMetadata | None = None,
    storage_options: dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[FileMetadata, int]:
    """``read_file_metadata`` plus the file's row count (Parquet footer, tar header), rows unread."""
    wanted = _columns(columns)
    with _open(uri, format, storage_options, block_size=1 << 16) as f:
        if format == "parquet":
            parquet = pq.ParquetFile(f)
            return _parquet_footer(uri, parquet, expect, wanted), parquet.metadata.num_rows
        with tarfile.open(fileobj=f, mode="r|") as tar:
            header, meta, _, _ = _tar_header(uri, tar, iter(tar), wanted, expect)
            return meta, int(header[NUM_SAMPLES_KEY])


def validate_files(
    files: Sequence[str],
    format: str = "parquet",
    *,
    expect: FileMetadata | None = None,
    storage_options: dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    max_workers: int = 16,
) -> list[FileMetadata]:
    """``read_file_metadata`` of every file, concurrently (a plan check before cluster work), in order."""
    kwargs = {"expect": expect, "storage_options": storage_options, "columns": columns}
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(files)))) as pool:
        return list(pool.map(lambda uri: read_file_metadata(uri, format, **kwargs), files))


def check_expected(meta: FileMetadata, expect: FileMetadata | None, source: str) -> None:
    """Refuse ``meta`` where it disagrees with a non-empty field of ``expect``, naming both values."""
    if expect is None:
        return
    problems = []
    if expect.schema_id and meta.schema_id != expect.schema_id:
        problems.append(f"schema {meta.schema_id!r}, expected {expect.schema_id!r}")
    if expect.preprocessing_hash and meta.preprocessing_hash != expect.preprocessing_hash:
        problems.append(
            f"preprocessing_hash {meta.preprocessing_hash!r}, expected {expect.preprocessing_hash!r}"
        )
    for what in ("encoder_flavors", "weights_sha256", "tensor_shapes"):
        found, wanted = getattr(meta, what), getattr(expect, what)
        for role, value in wanted.items():
            if found.get(role) != value:
                problems.append(f"{what}[{role!r}] {_show(found.get(role))}, expected {_show(value)}")
    if problems:
        raise SchemaMismatchError(f"{source}: stale or foreign latents: file has " + "; ".join(problems))


def _show(value: Any) -> str:
    return "absent" if value is None else repr(str(value))


def table_to_batch(table: pa.Table, *, float32: bool = False, stage_c_shapes: bool = False) -> Batch:
    """A latents@1 table as ``{column: np.ndarray}`` (tensors (N, *shape), zero-copy where possible); with
    ``stage_c_shapes`` the pooled embeddings as (N, 1, C) (``stage_c_shapes_of``)."""
    tensors = set(tensor_columns(table))
    batch = {}
    for name in table.column_names:
        if name in tensors:
            values = tensor_to_numpy(table.column(name))
            batch[name] = to_float32(values) if float32 else values
        else:
            batch[name] = table.column(name).to_numpy(zero_copy_only=False)
    return stage_c_shapes_of(batch) if stage_c_shapes else batch


def stage_c_shapes_of(batch: Batch) -> Batch:
    """``batch`` with ``clip_text_pooled`` and ``clip_img`` as (N, 1, C), as Stage C takes them (a view; the
    cache stores them as (C,) per row; files from before that, as (1, C), come out the same)."""
    out = dict(batch)
    for name in POOLED_COLUMNS:
        if name in out:
            values = out[name]
            out[name] = values.reshape(len(values), 1, values.shape[-1])
    return out


def to_float32(stored: np.ndarray) -> np.ndarray:
    """float32 values of a stored latents@1 tensor (uint16 is bfloat16 bits, the only integer storage)."""
    if stored.dtype == np.uint16:
        return bfloat16_bits_to_float32(stored)
    return stored.astype(np.float32)


class _ReadFiles:
    """Ray ``map_batches`` function: a batch of file URIs -> the validated batch of each file."""

    def __init__(self, format: str, float32: bool, stage_c_shapes: bool, **read_options: Any) -> None:
        self.format, self.float32, self.stage_c_shapes = format, float32, stage_c_shapes
        self.read_options = read_options

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[Batch]:
        for uri in batch["uri"]:
            table = read_latent_table(str(uri), self.format, **self.read_options)
            yield table_to_batch(table, float32=self.float32, stage_c_shapes=self.stage_c_shapes)


def as_ray_dataset(
    root: str | Sequence[str],
    format: str = "parquet",
    *,
    expect: FileMetadata | None = None,
    storage_options: dict[str, Any] | None = None,
    columns: Sequence[str] | None = None,
    float32: bool = False,
    stage_c_shapes: bool = False,
) -> ray.data.Dataset:
    """The latent files under ``root`` as a Ray Dataset whose rows carry numpy tensors.

    Every file's metadata is validated on the driver first (footers and tar headers only, concurrently),
    then one read task per file runs ``read_latent_table``, the iterator's own code. ``ray.data.read_parquet``
    does read the fixed-shape tensor columns, but Ray 2.60 skips Parquet page CRC checks (a flipped bit
    reads back silently) and mixes buckets in one block (without project code, read one bucket folder:
    ``ray.data.read_parquet(f"{root}/parquet/24x24")``). Arguments as in ``read_latents``. Batches that
    span buckets hold ragged object arrays: for fixed-shape batches, build one dataset per bucket from its
    files (``list_latent_files``, then filter, e.g. on the ``tensor_shapes`` that ``validate_files`` returns).
    """
    import ray.data

    files = list_latent_files(root, format, storage_options)
    options = {"expect": expect, "storage_options": storage_options, "columns": columns}
    validate_files(files, format, **options)
    items = ray.data.from_items([{"uri": uri} for uri in files], override_num_blocks=len(files))
    return items.map_batches(_ReadFiles(format, float32, stage_c_shapes, **options), batch_size=1)


# --- decoding ----------------------------------------------------------------------------------------------
def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"format={format!r}; allowed: {list(FORMATS)}")


def _columns(columns: Sequence[str] | None) -> list[str] | None:
    if columns is None:
        return None
    known = (*SCALAR_COLUMNS, *c.LATENT_TENSOR_COLUMNS)
    unknown = [name for name in columns if name not in known and c.stage_b_effnet_cells(name) is None]
    if unknown:
        raise ValueError(
            f"columns={list(columns)}: unknown {unknown}; latents@1 has {list(known)} and, optionally, "
            f"{c.STAGE_B_EFFNET_PREFIX}{{cells}}"
        )
    stage_b = [c.stage_b_effnet_column(s) for s in c.stage_b_cells_of(columns)]
    return [name for name in known if name == c.KEY or name in columns] + stage_b  # schema order, key always


@contextlib.contextmanager
def _open(
    uri: str, format: str, storage_options: dict[str, Any] | None, **open_options: Any
) -> Iterator[Any]:
    """Open ``uri``; decoding errors inside the block become a LatentFileError naming the file."""
    _check_format(format)
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    with fs.open(path, "rb", **open_options) as f:
        try:
            yield f
        except (SchemaMismatchError, LatentFileError):
            raise
        except _ERRORS[format] as err:
            what = "Parquet file" if format == "parquet" else "WebDataset tar"
            raise LatentFileError(
                f"{uri}: not a readable latents {what} (truncated or corrupt?): {err}"
            ) from None


def _parquet_footer(
    uri: str, parquet: pq.ParquetFile, expect: FileMetadata | None, columns: list[str] | None
) -> FileMetadata:
    meta = validate_table(parquet.schema_arrow.empty_table(), LATENTS_ID, source=uri, columns=columns)
    check_expected(meta, expect, uri)
    return meta


def _tar_header(
    uri: str,
    tar: tarfile.TarFile,
    members: Iterator[tarfile.TarInfo],
    columns: list[str] | None,
    expect: FileMetadata | None,
) -> tuple[dict[str, Any], FileMetadata, RecordSchema, tuple[str, dict[str, Any]] | None]:
    """Read and check the file metadata from the first member: the first sample's ``key.json`` (layout 2) or
    ``__metadata__.json`` (layout 1). Returns (its JSON, the FileMetadata, the schema, and in layout 2 the
    first sample's (name, json), already read)."""
    first = next(members, None)
    if first is None or not first.name.endswith(".json"):
        raise LatentFileError(
            f"{uri}: first member is {first and first.name!r}, expected a sample's key.json (or {METADATA_MEMBER})"
        )
    header = json.loads(_read(tar, first))
    sample = None if first.name == METADATA_MEMBER else (first.name.partition(".")[0], header)
    keys = (*METADATA_KEYS, *OPTIONAL_METADATA_KEYS)
    arrow = {k: v if isinstance(v, str) else json.dumps(v) for k, v in header.items() if k in keys}
    try:
        meta = FileMetadata.from_arrow(arrow)
    except ValueError as err:
        raise SchemaMismatchError(f"{uri}: {first.name}: {err}, expected {LATENTS_ID}") from None
    if meta.schema_id != LATENTS_ID:
        raise SchemaMismatchError(f"{uri}: file has {meta.schema_id}, expected {LATENTS_ID}")
    try:
        schema = latents_schema({n: s.shape for n, s in meta.tensor_shapes.items()}, _dtype(meta))
    except ValueError as err:
        raise SchemaMismatchError(f"{uri}: {first.name} describes no latents@1 file: {err}") from None
    empty = schema.arrow.empty_table().replace_schema_metadata(meta.to_arrow())
    validate_table(empty, LATENTS_ID, source=uri, columns=columns)
    check_expected(meta, expect, uri)
    return header, meta, schema, sample


def _file_keys(record: dict[str, Any]) -> dict[str, Any]:
    """The file-level ``cascade.*`` keys of a layout-2 ``key.json`` (all but the sample's own dtype)."""
    return {k: v for k, v in record.items() if k.startswith("cascade.") and k != DTYPE_KEY}


def _tar_table(
    uri: str, tar: tarfile.TarFile, columns: list[str] | None, expect: FileMetadata | None
) -> pa.Table:
    members = iter(tar)  # a stream: read once, in order
    header, meta, schema, first = _tar_header(uri, tar, members, columns, expect)  # before any tensor
    names = [n for n in schema.arrow.names if columns is None or n in columns]
    samples: dict[str, dict[str, Any]] = {}  # sample name -> {"json": record, column: array}
    if first is not None:
        samples[first[0]] = {"json": first[1]}
    for info in members:
        if not info.isfile():
            continue
        name, _, ext = info.name.partition(".")
        parts = samples.setdefault(name, {})
        column = ext.removesuffix(".npy")
        if ext == "json":
            parts["json"] = json.loads(_read(tar, info))
            if first is not None and _file_keys(parts["json"]) != _file_keys(header):
                raise SchemaMismatchError(f"{uri}: {info.name} has other file metadata than the first sample")
        elif ext == "safetensors":
            for column, array in _safetensors_arrays(uri, info.name, _read(tar, info)).items():
                if column in names:
                    parts[column] = _checked(uri, info.name, array, meta, column)
        elif ext.endswith(".npy") and column in meta.tensor_shapes:
            if column in names:
                array = np.load(io.BytesIO(_read(tar, info)), allow_pickle=False)
                parts[column] = _checked(uri, info.name, array, meta, column)
        else:
            raise LatentFileError(f"{uri}: unexpected member {info.name!r}")
    if len(samples) != header.get(NUM_SAMPLES_KEY):
        raise LatentFileError(
            f"{uri}: its metadata promises {header.get(NUM_SAMPLES_KEY)} samples, found {len(samples)}"
        )
    wanted = ["json", *(n for n in names if n in meta.tensor_shapes)]
    for name, parts in samples.items():
        missing = [p for p in wanted if p not in parts]
        if missing:
            raise LatentFileError(f"{uri}: sample {name!r} lacks {missing} (truncated or incomplete)")
        if parts["json"].get(DTYPE_KEY) != _dtype(meta):
            found = parts["json"].get(DTYPE_KEY)
            raise SchemaMismatchError(
                f"{uri}: {name}.json says {DTYPE_KEY}={found!r}, the file metadata says {_dtype(meta)!r}"
            )
    return _assemble(uri, schema, meta, list(samples.values()), names)


def _dtype(meta: FileMetadata) -> str:
    dtypes = {spec.dtype for spec in meta.tensor_shapes.values()}
    return dtypes.pop() if len(dtypes) == 1 else f"one of {sorted(dtypes)}"


def _read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(info)
    assert f is not None, info.name
    data = f.read()
    if len(data) != info.size:
        raise EOFError(f"member {info.name!r} has {len(data)} of {info.size} bytes")
    return data


def _safetensors_arrays(uri: str, member: str, data: bytes) -> dict[str, np.ndarray]:
    out = {}
    for name, spec in safetensors.deserialize(data):
        if spec["dtype"] not in _SAFETENSORS_NUMPY:
            raise LatentFileError(f"{uri}: {member}: tensor {name!r} has dtype {spec['dtype']}")
        out[name] = np.frombuffer(spec["data"], _SAFETENSORS_NUMPY[spec["dtype"]]).reshape(spec["shape"])
    return out


def _checked(uri: str, member: str, array: np.ndarray, meta: FileMetadata, column: str) -> np.ndarray:
    spec = meta.tensor_shapes[column]
    if array.shape != spec.shape or array.dtype != _STORAGE[spec.dtype]:
        raise SchemaMismatchError(
            f"{uri}: {member} holds {array.dtype}{list(array.shape)}, {METADATA_MEMBER} says {spec}"
        )
    return array


def _assemble(
    uri: str, schema: RecordSchema, meta: FileMetadata, samples: list[dict[str, Any]], names: list[str]
) -> pa.Table:
    """The samples as a table with the file's metadata (all columns, or the projected ``names``)."""
    arrays: dict[str, pa.Array] = {}
    for name in names:
        spec = meta.tensor_shapes.get(name)
        if spec is not None:
            stacked = [s[name] for s in samples]
            values = np.stack(stacked) if stacked else np.empty((0, *spec.shape), _STORAGE[spec.dtype])
            arrays[name] = tensor_array(values, spec.dtype)
            continue
        try:
            arrays[name] = pa.array([s["json"][name] for s in samples], schema.arrow.field(name).type)
        except (KeyError, pa.ArrowException) as err:
            raise SchemaMismatchError(f"{uri}: sample json field {name!r}: {err!r}") from None
    if len(names) == len(schema.arrow.names):
        return attach_metadata(pa.table(arrays), schema, meta)
    projected = pa.schema([schema.arrow.field(n) for n in names], metadata=meta.to_arrow())
    return pa.table(arrays).cast(projected)
