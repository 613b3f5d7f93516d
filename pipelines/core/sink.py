"""Split a stream into its healthy rows and its rejects, and write both as Parquet with metadata.

A ``WriteParquet`` step ends a pipeline: each batch becomes ``part-<hash>.parquet`` (healthy rows, the
configured columns, the record schema's metadata) and ``rejects/part-<hash>.parquet`` (key, source, step,
reason, detail). The name hashes the batch's keys, so a retried task rewrites the same files instead of
adding new ones.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.step import Batch, Step, healthy
from pipelines.core.storage import write_bytes
from schemas import REJECTS, FileMetadata, RecordSchema, attach_metadata, get_schema
from schemas.columns import DETAIL, KEY, REASON, REJECT_DETAIL, REJECT_REASON, REJECT_STEP, SOURCE, STEP
from schemas.tensors import nested_list_array


@dataclass(frozen=True, kw_only=True)
class WriteParquetConfig:
    """Where and what a pipeline writes.

    Attributes:
        output_dir: directory (local or fsspec URL) for ``part-*.parquet``; rejects go to ``rejects/``.
        metadata: the record schema id and the encoder flavors/weights/preprocessing stored in every file.
        endpoint_url: S3-compatible endpoint (None: AWS defaults).
    """

    output_dir: str
    metadata: FileMetadata
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be set")
        self.schema  # noqa: B018  (an unknown schema id fails here, before any Ray work)

    @property
    def schema(self) -> RecordSchema:
        return get_schema(self.metadata.schema_id, self.metadata)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.schema.arrow.names)


def _column(values: np.ndarray, field: pa.Field) -> pa.Array:
    if values.ndim > 1:
        return nested_list_array(values, str(values.dtype))
    return pa.array(values.tolist() if values.dtype == object else values, type=field.type)


def rejects_table(batch: Batch, rows: np.ndarray) -> pa.Table:
    """The rejected ``rows`` of a batch as a rejects@1 table (key, source, step, reason, detail)."""
    values = {
        KEY: [str(batch[KEY][i]) for i in rows],
        SOURCE: [str(batch[SOURCE][i]) for i in rows],
        STEP: [str(batch[REJECT_STEP][i]) for i in rows],
        REASON: [str(batch[REJECT_REASON][i]) for i in rows],
        DETAIL: [str(batch[REJECT_DETAIL][i]) for i in rows],
    }
    return attach_metadata(pa.table(values), REJECTS)


def _to_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


class WriteParquet(Step):
    """Terminal step: write healthy rows and rejects of each batch; returns one summary row per batch."""

    name = "write"
    requires = (KEY, SOURCE)
    produces = ("n_written", "n_rejected", "part")

    @classmethod
    def required_columns(cls, config: WriteParquetConfig) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*cls.requires, *config.columns)))

    def __call__(self, batch: Batch) -> Batch:
        cfg: WriteParquetConfig = self.config
        keys = [str(k) for k in batch[KEY]]
        part = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
        ok = healthy(batch)
        bad = np.setdiff1d(np.arange(len(keys)), ok)
        options = {"endpoint_url": cfg.endpoint_url} if cfg.endpoint_url else {}
        base = cfg.output_dir.rstrip("/")
        if len(ok):
            schema = cfg.schema
            table = pa.table({f.name: _column(batch[f.name][ok], f) for f in schema.arrow})
            write_bytes(
                f"{base}/part-{part}.parquet",
                _to_bytes(attach_metadata(table, schema, cfg.metadata)),
                options,
            )
        if len(bad):
            write_bytes(f"{base}/rejects/part-{part}.parquet", _to_bytes(rejects_table(batch, bad)), options)
        return {"n_written": np.asarray([len(ok)]), "n_rejected": np.asarray([len(bad)]),
                "part": np.asarray([part], dtype=object)}  # fmt: skip


def list_parquet(path: str, storage_options: dict[str, Any] | None = None) -> tuple[list[str], Any]:
    """The data Parquet files under ``path`` (a file or a directory; ``rejects/`` excluded) and their filesystem."""
    fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
    if fs.isfile(root):
        return [root], fs
    files = sorted(p for p in fs.find(root) if p.endswith(".parquet") and "/rejects/" not in p)
    if not files:
        raise FileNotFoundError(f"{path!r}: no Parquet files found")
    return files, fs


def summarize(rows: list[dict[str, Any]]) -> tuple[int, int]:
    """Totals of written and rejected rows from the summary rows of ``WriteParquet``."""
    return sum(int(r["n_written"]) for r in rows), sum(int(r["n_rejected"]) for r in rows)
