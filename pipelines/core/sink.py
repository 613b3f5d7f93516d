"""The end of a streaming table pipeline: stage each shard's rows and rejects, merge them at commit.

``StageRows`` ends a pipeline (score's): per input shard in a batch, the healthy rows become one staged part
(``_staging/<shard>/_parts/<hash>.parquet``, the record schema's columns and metadata) and the rejected ones a
staged rejects part; it returns one summary row per shard (``pipelines.core.completion``). The part name
hashes the batch's keys, so a retried task rewrites the same file. When the driver sees a shard complete,
``pipelines.core.by_shard.MergeParts`` (run by the commit task) merges its parts into
``parquet/<shard>.parquet``, sorted by key: the same bytes whatever the batch sizes were.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.core.commits import CommitStore
from pipelines.core.completion import SHARD_ID, SUMMARY_COLUMNS, ShardSummary, is_marker
from pipelines.core.step import Batch, Step, healthy
from pipelines.core.storage import table_bytes
from schemas import REJECTS, FileMetadata, RecordSchema, attach_metadata, get_schema
from schemas.columns import DETAIL, KEY, REASON, REJECT_DETAIL, REJECT_REASON, REJECT_STEP, SOURCE, STEP
from schemas.tensors import nested_list_array


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """Where and what a table pipeline writes.

    Attributes:
        output_dir: the job's output directory (local or fsspec URL).
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

    @property
    def file_schema(self) -> pa.Schema:
        """The Arrow schema of the written files, metadata included."""
        return attach_metadata(self.schema.arrow.empty_table(), self.schema, self.metadata).schema

    @property
    def store(self) -> CommitStore:
        return CommitStore(self.output_dir, {"endpoint_url": self.endpoint_url} if self.endpoint_url else {})


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


def part_name(batch: Batch, rows: Any) -> str:
    """A part's name from its keys: a retried task writes the same name, so it replaces its own file."""
    return hashlib.sha1("\n".join(str(batch[KEY][i]) for i in rows).encode()).hexdigest()[:20]


def rows_by_shard(batch: Batch) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per shard in the batch: (healthy rows, rejected rows), end markers excluded."""
    ok = np.zeros(len(batch[KEY]), dtype=bool)
    ok[healthy(batch)] = True
    bad = ~ok & ~is_marker(batch)
    shards = np.asarray([str(s) for s in batch[SHARD_ID]], dtype=object)
    return {
        s: (np.flatnonzero(ok & (shards == s)), np.flatnonzero(bad & (shards == s)))
        for s in sorted(set(shards))
    }


def stage_rejects(
    store: CommitStore, summary: ShardSummary, shard: str, batch: Batch, rows: np.ndarray
) -> None:
    """Stage one batch's rejected ``rows`` of ``shard`` and count them."""
    if len(rows):
        store.stage_rejects(shard, part_name(batch, rows), rejects_table(batch, rows))
        reasons = Counter(f"reason:{batch[REJECT_REASON][i]}" for i in rows)
        summary.count(shard, n_rejected=len(rows), **reasons)


class StageRows(Step):
    """Terminal step: stage each shard's healthy rows and rejects; returns one summary row per shard."""

    name = "write"
    requires = (KEY, SOURCE, SHARD_ID)
    produces = SUMMARY_COLUMNS

    @classmethod
    def required_columns(cls, config: StageConfig) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*cls.requires, *config.columns)))

    def __call__(self, batch: Batch) -> Batch:
        cfg: StageConfig = self.config
        store, schema = cfg.store, cfg.schema
        summary = ShardSummary(batch)
        for shard, (ok, bad) in rows_by_shard(batch).items():
            if len(ok):
                table = pa.table({f.name: _column(batch[f.name][ok], f) for f in schema.arrow})
                relpath = f"_parts/{part_name(batch, ok)}.parquet"
                store.stage(shard, relpath, table_bytes(attach_metadata(table, schema, cfg.metadata)))
                summary.add_part(shard, {"path": relpath, "rows": len(ok)})
                summary.count(shard, n_written=len(ok))
            stage_rejects(store, summary, shard, batch, bad)
        return summary.batch()
