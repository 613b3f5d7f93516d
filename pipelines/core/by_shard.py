"""Per-shard tables: one Parquet file per input shard, ``<root>/parquet/<shard>.parquet``, opened by name.

Score writes its scores this way and filter its kept keys, each with a manifest listing the shards. A task
that needs one shard's rows (encode's read of its kept keys and stored CLIP-L embeddings) opens that one
file: no scan, no listing. Outputs from before this layout (a single ``kept_keys.parquet``, or a folder of
``part-*.parquet`` spanning many shards) are partitioned once by a Ray job into the per-shard layout.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.commits import CommitStore
from pipelines.core.notice import notice
from pipelines.core.sources import shard_id
from pipelines.core.storage import table_bytes
from schemas import validate_table
from schemas.columns import KEY, SOURCE

MANIFEST = "manifest.json"
LAYOUT = "per-shard"


def shard_file(shard: str) -> str:
    """A shard's file, relative to the output root (``parquet/`` holds only data: read it as one dataset)."""
    return f"parquet/{shard}.parquet"


def shard_path(root: str, shard: str) -> str:
    return f"{root.rstrip('/')}/{shard_file(shard)}"


def read_for_shard(
    root: str, shard: str, columns: Sequence[str], storage_options: dict[str, Any] | None = None
) -> pa.Table | None:
    """``columns`` of one shard's file (None when the shard has none)."""
    fs, path = fsspec.core.url_to_fs(shard_path(root, shard), **(storage_options or {}))
    try:
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read(columns=list(columns))
    except FileNotFoundError:
        return None


def sorted_by_key(table: pa.Table) -> pa.Table:
    return table.take(pc.sort_indices(table, sort_keys=[(KEY, "ascending")]))


def open_per_shard(
    root: str,
    storage_options: dict[str, Any],
    *,
    field: str,
    convert_to: CommitStore,
    schema_id: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """The per-shard table set at ``root`` (its root and manifest), converting an older layout once.

    ``field`` names the config field in messages; an older layout is partitioned into ``convert_to`` (a Ray
    job, done once: a later run finds the converted copy), after its first file is checked to be
    ``schema_id`` (when given).
    """
    manifest = CommitStore(root, storage_options).read_json(MANIFEST)
    if manifest is not None and manifest.get("layout") == LAYOUT:
        return root, manifest
    converted = convert_to.read_json(MANIFEST)
    if converted is None or converted.get("source") != root:
        converted = partition_by_shard(root, storage_options, convert_to, field=field, schema_id=schema_id)
    return convert_to.root, converted


def legacy_files(root: str, storage_options: dict[str, Any], field: str) -> tuple[Any, list[str]]:
    """The filesystem and Parquet files of an older output: the file, or each ``*.parquet`` not in ``rejects/``."""
    fs, path = fsspec.core.url_to_fs(root, **storage_options)
    if fs.isfile(path):
        files = [path]
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet") and "/rejects/" not in p
                       and "/_" not in p[len(path):])  # fmt: skip
    else:
        files = []
    if not files:
        raise FileNotFoundError(f"{field}={root!r}: no Parquet files there")
    return fs, files


def partition_by_shard(
    root: str, storage_options: dict[str, Any], dest: CommitStore, *, field: str, schema_id: str | None = None
) -> dict[str, Any]:
    """Split an older table set by its ``source`` column into ``dest/<shard>.parquet`` (one Ray job)."""
    import ray.data

    fs, files = legacy_files(root, storage_options, field)
    schema = pq.read_schema(fs.open(files[0], "rb"))
    if schema_id is not None:
        validate_table(schema.empty_table(), schema_id, source=fs.unstrip_protocol(files[0]))
    if KEY not in schema.names or SOURCE not in schema.names:
        raise ValueError(
            f"{field}={root!r}: {files[0]} has no {KEY!r} and {SOURCE!r} columns to partition by"
        )
    notice(f"{field}={root!r} is in the layout from before per-shard outputs: partitioning it by shard once, "
           f"as a Ray job, into {dest.root}")  # fmt: skip
    dest.wipe()
    ds = ray.data.read_parquet(files, filesystem=_arrow_fs(fs)).map_batches(
        _with_shard, batch_format="pyarrow", zero_copy_batch=True
    )
    write = functools.partial(_write_group, dest, schema.metadata or {})
    written = ds.groupby("_shard").map_groups(write, batch_format="pyarrow").take_all()
    shards = {r["shard_id"]: {"shard_id": r["shard_id"], "files": [{"path": shard_file(r["shard_id"]),
                                                                      "rows": int(r["rows"])}]}
              for r in written}  # fmt: skip
    manifest = {"layout": LAYOUT, "source": root, "schema": (schema.metadata or {}).get(b"cascade.schema", b"").decode(),
                "n_rows": sum(int(r["rows"]) for r in written), "shards": shards}  # fmt: skip
    dest.write_json(MANIFEST, manifest)
    return manifest


def _arrow_fs(fs: Any) -> Any:
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(fs))


def _with_shard(table: pa.Table) -> pa.Table:
    ids = [shard_id(s) for s in table[SOURCE].to_pylist()]
    return table.append_column("_shard", pa.array(ids, pa.string()))


def _write_group(dest: CommitStore, metadata: dict[bytes, bytes], group: pa.Table) -> pa.Table:
    """One shard's rows → ``parquet/<shard>.parquet``, committed at once (the group is the whole shard)."""
    shard = group["_shard"][0].as_py()
    table = sorted_by_key(group.drop_columns(["_shard"])).replace_schema_metadata(metadata)
    dest.stage(shard, shard_file(shard), table_bytes(table))
    dest.commit(shard, {"shard_id": shard, "files": [{"path": shard_file(shard), "rows": table.num_rows}]})
    return pa.table({"shard_id": [shard], "rows": [table.num_rows]})
