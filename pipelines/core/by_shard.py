"""Per-shard tables: one Parquet file per input shard, ``<root>/parquet/<shard>.parquet``, opened by name.

Score writes its scores this way and filter its kept keys, each with a manifest listing the shards. A task
that needs one shard's rows (encode's read of its kept keys and stored CLIP-L embeddings) opens that one
file: no scan, no listing. Outputs from before this layout (a single ``kept_keys.parquet``, or a folder of
``part-*.parquet`` spanning many shards) are partitioned once by a Ray job into the per-shard layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.commits import STAGING, CommitStore, Committer
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
    schema_id: str | tuple[str, ...] | None = None,
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


@dataclass(frozen=True)
class MergeParts:
    """Commit-task hook: a shard's staged parts → ``parquet/<shard>.parquet``, sorted by key, with ``schema``'s
    columns and metadata (an empty file when the shard has no parts)."""

    schema: pa.Schema

    def __call__(self, store: CommitStore, shard: str, record: dict[str, Any]) -> dict[str, Any]:
        staging = f"{store.path}/{STAGING}/{shard}"
        tables = [pq.read_table(store.fs.open(f"{staging}/{p['path']}", "rb")) for p in record["parts"]]
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        table = sorted_by_key(table.select(self.schema.names)).replace_schema_metadata(self.schema.metadata)
        store.stage(shard, shard_file(shard), table_bytes(table))
        files = [{"path": shard_file(shard), "rows": table.num_rows}]
        return {k: v for k, v in record.items() if k != "parts"} | {"files": files}


def partition_by_shard(
    root: str,
    storage_options: dict[str, Any],
    dest: CommitStore,
    *,
    field: str,
    schema_id: str | tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """Split an older table set by its ``source`` column into ``dest/parquet/<shard>.parquet``, as a Ray job:
    one task per input file stages its rows per shard, then one commit task per shard merges them."""
    import ray

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
    split = ray.remote(num_cpus=0.5)(_split_file)
    uris = [fs.unstrip_protocol(f) for f in files]
    parts: dict[str, list[dict[str, Any]]] = {}
    for found in ray.get([split.remote(uri, storage_options, dest, i) for i, uri in enumerate(uris)]):
        for shard, part in found:
            parts.setdefault(shard, []).append(part)
    committer = Committer(dest, MergeParts(schema))
    for shard, staged in sorted(parts.items()):
        committer.submit(
            shard, {"shard_id": shard, "parts": staged, "n_rows": sum(p["rows"] for p in staged)}
        )
    shards = committer.wait()
    manifest = {"layout": LAYOUT, "source": root, "schema": (schema.metadata or {}).get(b"cascade.schema", b"").decode(),
                "n_rows": sum(r["n_rows"] for r in shards.values()), "shards": shards}  # fmt: skip
    dest.write_json(MANIFEST, manifest)
    return manifest


def _split_file(
    uri: str, storage_options: dict[str, Any], dest: CommitStore, index: int
) -> list[tuple[str, dict]]:
    """Task body: stage one older file's rows per shard (``_parts/<index>.parquet``); returns the parts."""
    with fsspec.open(uri, "rb", **storage_options) as f:
        table = pq.read_table(f)
    shards = pa.array([shard_id(s) for s in table[SOURCE].to_pylist()], pa.string())
    order = pc.sort_indices(shards)  # one sort, then each shard's rows are one slice (not a filter per shard)
    table, shards = table.take(order), shards.take(order)
    found, offset, relpath = [], 0, f"_parts/{index:06d}.parquet"
    for run in pc.value_counts(shards).to_pylist():  # in order of first appearance: sorted
        shard, n = run["values"], run["counts"]
        dest.stage(shard, relpath, table_bytes(table.slice(offset, n)))
        found.append((shard, {"path": relpath, "rows": n}))
        offset += n
    return found
