"""Ingest existing data (WebDataset tars, Parquet with image bytes, image folders) into image–text shards.

The job is a map over input shards: each Ray task reads one shard, validates every sample (bad rows become
rejects with a reason), drops repeated keys (also two keys that would be written as the same member name),
stages ``NNNNN.tar`` + ``NNNNN.parquet`` + ``NNNNN_stats.json`` in img2dataset's layout (``NNNNN`` is the
input shard's position in the sorted source) and its rejects, then commits the shard with its counts
(``pipelines.core.commits``). The driver adds the counts up and writes ``manifest.json`` last; it never reads
a shard. A rerun skips committed shards. URL lists go through ``pipelines.ingest.urls`` (img2dataset) instead.

Counts: ``n_input = n_samples + n_rejected`` per shard and in the manifest's totals. A folder source also
counts its files: ``n_files = n_input + n_sidecars`` (every file is a sample, a reject or a sidecar).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core.commits import CommitStore, JobOutput
from pipelines.core.completion import SHARD_ID, collect_records
from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.shards import SUCCESS, safe_key, shard_files
from pipelines.core.sources import SourceConfig, list_shards, read_shard
from pipelines.core.step import Batch, Resources, Step, healthy, object_column, reject
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
        on_stale: an output made from another source listing or other checks: ``refuse`` or ``redo``.
    """

    source: SourceConfig
    output_dir: str
    output_endpoint_url: str | None = None
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(batch_size=1, concurrency=2))
    max_error_fraction: float = 1.0
    on_stale: str = "refuse"

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir must be set")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"max_error_fraction={self.max_error_fraction} must be in [0, 1]")

    @property
    def output_storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.output_endpoint_url} if self.output_endpoint_url else {}

    @property
    def store(self) -> CommitStore:
        return CommitStore(self.output_dir, self.output_storage_options)


@dataclass(frozen=True)
class IngestSummary:
    """Counts of one ingest run; ``n_input == n_samples + n_rejected`` (a folder source also has
    ``n_files == n_input + n_sidecars``; 0 for the other kinds)."""

    output_dir: str
    n_shards: int
    n_skipped_shards: int
    n_input: int
    n_samples: int
    n_rejected: int
    reject_reasons: dict[str, int]
    n_files: int = 0
    n_sidecars: int = 0


def status_rejects(status: pa.Table) -> pa.Table:
    """The failed rows of a shard's status table as a rejects table (key, source, step, reason, detail)."""
    failed = status.filter(pc.not_equal(status["status"], SUCCESS))
    renamed = {KEY: KEY, SOURCE: SOURCE, REJECT_STEP: STEP, REJECT_REASON: REASON, REJECT_DETAIL: DETAIL}
    return attach_metadata(failed.select(list(renamed)).rename_columns(list(renamed.values())), REJECTS)


class IngestShard(Step):
    """Read, validate, stage and commit one input shard per row of the batch; returns their records."""

    name = "ingest"
    requires = SHARD_COLUMNS
    produces = (SHARD_ID, "record")

    def __init__(self, config: IngestConfig) -> None:
        super().__init__(config)
        self.validate = ValidateSamples(config.validate)

    def __call__(self, batch: Batch) -> Batch:
        store = self.config.store
        records = []
        for shard_index, uris in zip(batch["shard_index"], batch["uris"], strict=True):
            shard = {"shard_index": int(shard_index), "uris": list(uris)}
            seen: set[str] = set()
            written: dict[str, str] = {}
            batches = [
                _distinct_members(drop_repeated_keys(self.validate(b), seen), written)
                for b in read_shard(self.config.source, shard)
            ]
            sid = f"{shard['shard_index']:05d}"
            files, status = shard_files(batches, shard["shard_index"])
            for name, data in files.items():
                store.stage(sid, name, data)
            rejects = status_rejects(status)
            if rejects.num_rows:
                store.stage_rejects(sid, "read", rejects)
            reasons = Counter(f"reason:{r}" for r in rejects[REASON].to_pylist())
            n_samples = status.num_rows - rejects.num_rows
            folder = {"n_files": len(shard["uris"]), "n_sidecars": len(shard["uris"]) - status.num_rows}
            record = {"shard_id": sid, "source": shard["uris"][0] if len(shard["uris"]) == 1 else shard["uris"],
                      "files": [{"path": name} | ({"rows": n_samples} if name.endswith(".tar") else {})
                                for name in files],
                      "n_input": status.num_rows, "n_samples": n_samples, "n_rejected": rejects.num_rows,
                      **(folder if self.config.source.kind == "folder" else {}), **reasons}  # fmt: skip
            records.append(store.commit(sid, record))
        return {SHARD_ID: object_column(r["shard_id"] for r in records),
                "record": object_column(json.dumps(r) for r in records)}  # fmt: skip


def _distinct_members(batch: Batch, written: dict[str, str]) -> Batch:
    """Reject a key whose tar member name (``safe_key``) an earlier kept key of the shard already took."""
    for i in healthy(batch):
        key = str(batch[KEY][i])
        member = safe_key(key)
        if written.setdefault(member, key) != key:
            reject(batch, i, "ingest", "duplicate key",
                   f"{key!r} and {written[member]!r} are both written as {member!r}; the first is kept")  # fmt: skip
    return batch


def fingerprint(config: IngestConfig, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """What makes the shards: the source settings, the checks, and the list of input shards (output names are
    positions in it, so another list must not be mixed with committed shards of this one)."""
    listing = hashlib.sha256(json.dumps([s["uris"] for s in shards]).encode()).hexdigest()
    return {"source": dataclasses.asdict(config.source), "validate": dataclasses.asdict(config.validate),
            "n_input_shards": len(shards), "input_shards_sha256": listing}  # fmt: skip


def run_ingest(config: IngestConfig) -> IngestSummary:
    """Ingest ``config.source`` into shards under ``config.output_dir`` on the current Ray cluster."""

    shards = list_shards(config.source)  # a missing path fails here, before any Ray task
    plan = Plan(SHARD_COLUMNS, [PlannedStep(IngestShard, config, config.resources)])
    plan.check()
    ids = {f"{s['shard_index']:05d}": s for s in shards}
    output = JobOutput(config.store, fingerprint(config, shards), config.on_stale)
    todo = output.start(ids)
    new = collect_records(plan, [ids[s] for s in todo], "ingest")
    manifest = output.finish(new, ids, schema="samples", layout="img2dataset webdataset",
                             source=config.source.path)  # fmt: skip
    totals = manifest["totals"]
    summary = IngestSummary(
        output_dir=config.output_dir, n_shards=len(ids), n_skipped_shards=len(ids) - len(todo),
        n_input=totals.get("n_input", 0), n_samples=totals.get("n_samples", 0),
        n_rejected=totals.get("n_rejected", 0), n_files=totals.get("n_files", 0),
        n_sidecars=totals.get("n_sidecars", 0),
        reject_reasons={k.removeprefix("reason:"): v for k, v in sorted(totals.items(), key=lambda kv: -kv[1])
                        if k.startswith("reason:")},
    )  # fmt: skip
    if summary.n_input and summary.n_rejected / summary.n_input > config.max_error_fraction:
        raise RuntimeError(
            f"{summary.n_rejected} of {summary.n_input} samples rejected, above max_error_fraction="
            f"{config.max_error_fraction}; see {config.output_dir}/rejects/"
        )
    return summary
