"""Ingest existing data (WebDataset tars, Parquet with image bytes, image folders) into image–text shards.

The job is a map over input shards: each Ray task reads one shard, validates every sample (bad rows become
rejects with a reason), drops repeated keys, and writes ``NNNNN.tar`` + ``NNNNN.parquet`` +
``NNNNN_stats.json`` in img2dataset's layout, named after the input shard. The driver then gathers the
rejects into ``rejects.parquet`` and writes ``manifest.json`` last. URL lists go through
``pipelines.ingest.urls`` (img2dataset) instead.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.shards import write_shard
from pipelines.core.sources import SourceConfig, list_shards, read_shard
from pipelines.core.step import Batch, Resources, Step, object_column
from pipelines.core.storage import write_bytes
from pipelines.core.validate import ValidateConfig, ValidateSamples, drop_repeated_keys
from schemas import REJECTS, attach_metadata
from schemas.columns import DETAIL, KEY, REASON, REJECT_DETAIL, REJECT_REASON, REJECT_STEP, SOURCE, STEP

SHARD_COLUMNS = ("shard_index", "uris")


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """An ingest job over existing data.

    Attributes:
        source: what to read.
        output_dir: where the shards go (local or fsspec URL).
        output_endpoint_url: S3-compatible endpoint for ``output_dir`` (None: AWS defaults).
        validate: per-sample checks (sizes, captions, decompression bombs).
        resources: one task per input shard; ``concurrency`` caps the parallel tasks.
        max_error_fraction: fail the job when more than this fraction of samples is rejected.
    """

    source: SourceConfig
    output_dir: str
    output_endpoint_url: str | None = None
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(batch_size=1, concurrency=2))
    max_error_fraction: float = 1.0

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be set")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction={self.max_error_fraction} must be in [0, 1]")

    @property
    def output_storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.output_endpoint_url} if self.output_endpoint_url else {}


@dataclass(frozen=True)
class IngestSummary:
    """Counts of one ingest run; ``n_input == n_samples + n_rejected``."""

    output_dir: str
    n_shards: int
    n_input: int
    n_samples: int
    n_rejected: int
    reject_reasons: dict[str, int]


class IngestShard(Step):
    """Read, validate and write one input shard per row of the batch."""

    name = "ingest"
    requires = SHARD_COLUMNS
    produces = ("tar_uri", "n_samples", "n_rejected")

    def __init__(self, config: IngestConfig) -> None:
        super().__init__(config)
        self.validate = ValidateSamples(config.validate)

    def __call__(self, batch: Batch) -> Batch:
        written = []
        for shard_index, uris in zip(batch["shard_index"], batch["uris"], strict=True):
            shard = {"shard_index": int(shard_index), "uris": list(uris)}
            seen: set[str] = set()
            batches = [
                drop_repeated_keys(self.validate(b), seen) for b in read_shard(self.config.source, shard)
            ]
            written.append(
                write_shard(
                    batches, self.config.output_dir, shard["shard_index"], self.config.output_storage_options
                )
            )
        return {
            "shard_index": np.asarray([w.shard_index for w in written]),
            "tar_uri": object_column(w.tar_uri for w in written),
            "n_samples": np.asarray([w.n_samples for w in written]),
            "n_rejected": np.asarray([w.n_rejected for w in written]),
        }


def collect_rejects(output_dir: str, shard_indices: list[int], storage_options: dict[str, Any]) -> pa.Table:
    """The rejects of every shard's status Parquet as one rejects table (key, source, step, reason, detail)."""
    tables = []
    for index in sorted(shard_indices):
        with fsspec.open(f"{output_dir.rstrip('/')}/{index:05d}.parquet", "rb", **storage_options) as f:
            status = pq.read_table(f)
        failed = status.filter(pa.compute.equal(status["status"], "failed"))
        renamed = {KEY: KEY, SOURCE: SOURCE, REJECT_STEP: STEP, REJECT_REASON: REASON, REJECT_DETAIL: DETAIL}
        tables.append(failed.select(list(renamed)).rename_columns(list(renamed.values())))
    empty = pa.table({c: pa.array([], pa.string()) for c in REJECTS.arrow.names})
    return attach_metadata(pa.concat_tables([empty, *tables]), REJECTS)


def run_ingest(config: IngestConfig) -> IngestSummary:
    """Ingest ``config.source`` into shards under ``config.output_dir`` on the current Ray cluster."""
    import ray

    shards = list_shards(config.source)  # a missing path fails here, before any Ray task
    plan = Plan(SHARD_COLUMNS, [PlannedStep(IngestShard, config, config.resources)])
    plan.check()
    ds = ray.data.from_items(shards, override_num_blocks=max(1, len(shards)))
    results = plan.apply(ds).take_all()
    rejects = collect_rejects(
        config.output_dir, [r["shard_index"] for r in results], config.output_storage_options
    )
    sink = pa.BufferOutputStream()
    pq.write_table(rejects, sink)
    write_bytes(f"{config.output_dir.rstrip('/')}/rejects.parquet", sink.getvalue().to_pybytes(),
                config.output_storage_options)  # fmt: skip
    n_samples = sum(int(r["n_samples"]) for r in results)
    summary = IngestSummary(
        output_dir=config.output_dir,
        n_shards=len(results),
        n_input=n_samples + rejects.num_rows,
        n_samples=n_samples,
        n_rejected=rejects.num_rows,
        reject_reasons=dict(Counter(rejects["reason"].to_pylist()).most_common()),
    )
    write_bytes(f"{config.output_dir.rstrip('/')}/manifest.json",
                json.dumps(dataclasses.asdict(summary), indent=2).encode(), config.output_storage_options)  # fmt: skip
    if summary.n_input and summary.n_rejected / summary.n_input > config.max_error_fraction:
        raise RuntimeError(
            f"{summary.n_rejected} of {summary.n_input} samples rejected, above max_error_fraction="
            f"{config.max_error_fraction}; see {config.output_dir}/rejects.parquet"
        )
    return summary
