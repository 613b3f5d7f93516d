"""The dedup job's batch functions, each testable on a plain dict without Ray.

Ray Data runs them as tasks (:func:`run`): ``ReadRows`` over shards, ``ExplodeBands`` over rows, the others
through ``groupby(...).map_groups`` (the hash shuffle brings a partition's rows, a cluster's rows or a shard's
rows together). Each sorts its rows by key first, so its result does not depend on the order the shuffle
delivered them in.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core.by_shard import shard_file, shard_path
from pipelines.core.commits import CommitStore
from pipelines.core.completion import SHARD_ID
from pipelines.core.step import Batch, object_column
from pipelines.core.storage import table_bytes
from pipelines.dedup import groups as g
from pipelines.dedup.kmeans import assign
from schemas import DEDUP, FileMetadata, attach_metadata, nested_list_to_numpy
from schemas.columns import (
    AESTHETIC_SCORE,
    CLIP_IMAGE_EMBEDS,
    DEDUP_CLUSTER,
    DEDUP_KIND,
    DEDUP_SIMILARITY,
    DUPLICATE_OF,
    IMAGE_SHA256,
    KEY,
    NN_SIMILARITY,
    PHASH,
    SOURCE,
)

PART, UNIT, ALIVE, IS_REFERENCE = "part", "unit", "alive", "is_reference"
HIST_LOW, HIST_BINS = 0.6, 40  # nn-similarity histogram: 0.6..1.0 in steps of 0.01, and one bin below
KINDS = ("reference", "exact", "perceptual", "semantic")  # priority when a row is removed more than once


def _sorted(batch: Batch) -> Batch:
    order = np.argsort(np.asarray(batch[KEY], dtype=object).astype(str), kind="stable")
    return {c: v[order] for c, v in batch.items()}


def run(batch: Batch, step: type, config: Any) -> Batch:
    """Ray Data's entry to a step: ``step(config)(batch)`` in a task (steps are cheap to build)."""
    return step(config)(batch)


def resolve(value: Any) -> Any:
    """A value a config carries as a Ray object reference (large, shared by every task), or as itself."""
    import ray

    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


def collect(ds: Any) -> Batch:
    """A small Ray dataset's rows, gathered on the driver as columns ({} when it has none)."""
    batches = [
        b for b in ds.iter_batches(batch_size=None, batch_format="numpy") if b and len(next(iter(b.values())))
    ]
    return {c: np.concatenate([b[c] for b in batches]) for c in batches[0]} if batches else {}


def partition_of(values: Sequence[Any], parts: int) -> np.ndarray:
    """A stable partition number per value (crc32 of its text: the same on every worker and run)."""
    return np.asarray([zlib.crc32(str(v).encode()) % parts for v in values], dtype=np.int64)


@dataclass(frozen=True, kw_only=True)
class ReadConfig:
    """What ``ReadRows`` reads from each scores shard, and what it adds."""

    root: str
    storage_options: dict[str, Any]
    columns: tuple[str, ...]
    parts: int = 1  # shuffle partitions of the exact phase (rows partitioned by sha256)
    centroids: Any = None  # an ObjectRef (or array) of the semantic centroids: adds UNIT and DEDUP_CLUSTER
    dead: Any = None  # an ObjectRef (or set) of keys removed by exact/perceptual: adds ALIVE
    is_reference: bool = False


class ReadRows:
    """One scores shard → its rows (the configured columns, plus shard id, and the derived columns)."""

    def __init__(self, config: ReadConfig) -> None:
        self.config = config
        self.centroids, self.dead = resolve(config.centroids), resolve(config.dead)

    def __call__(self, batch: Batch) -> Batch:
        cfg = self.config
        out = []
        for shard in batch[SHARD_ID]:
            fs, path = fsspec.core.url_to_fs(shard_path(cfg.root, str(shard)), **cfg.storage_options)
            with fs.open(path, "rb") as f:
                table = pq.ParquetFile(f).read(columns=list(cfg.columns))
            rows: Batch = {
                c: table[c].to_numpy(zero_copy_only=False) for c in cfg.columns if c != CLIP_IMAGE_EMBEDS
            }
            rows[SHARD_ID] = object_column([str(shard)] * table.num_rows)
            if CLIP_IMAGE_EMBEDS in cfg.columns:  # float16 through the shuffle: cosines move by ~1e-5
                rows[UNIT] = g.l2_normalise(nested_list_to_numpy(table[CLIP_IMAGE_EMBEDS])).astype(np.float16)
            out.append(self._derive(rows))
        return {c: np.concatenate([o[c] for o in out]) for c in out[0]}

    def _derive(self, rows: Batch) -> Batch:
        cfg, n = self.config, len(rows[KEY])
        if IMAGE_SHA256 in rows:
            rows[PART] = partition_of(rows[IMAGE_SHA256], cfg.parts)
        if self.centroids is not None:
            rows[DEDUP_CLUSTER] = assign(rows[UNIT], self.centroids)
        if self.dead is not None:
            rows[ALIVE] = np.asarray([k not in self.dead for k in rows[KEY]], dtype=bool)
        rows[IS_REFERENCE] = np.full(n, cfg.is_reference)
        if cfg.is_reference:
            rows[SHARD_ID] = object_column([""] * n)
        return rows


class ExactPart:
    """One sha256 partition → its removed rows (key, duplicate_of)."""

    def __init__(self, config: None = None) -> None:
        self.config = config

    def __call__(self, batch: Batch) -> Batch:
        b = _sorted(batch)
        found = g.exact_groups(b[KEY], b[IMAGE_SHA256], b[AESTHETIC_SCORE].astype(np.float32))
        return {KEY: b[KEY][found.removed], DUPLICATE_OF: b[KEY][found.rep]}


@dataclass(frozen=True, kw_only=True)
class BandConfig:
    bands: int
    parts: int
    dead: Any = None  # an ObjectRef (or set) of keys the exact kind removed


class ExplodeBands:
    """Each alive row → one row per band, keyed by (band, band value) and partitioned by that bucket."""

    def __init__(self, config: BandConfig) -> None:
        self.config = config
        self.dead = resolve(config.dead) or set()

    def __call__(self, batch: Batch) -> Batch:
        cfg = self.config
        alive = np.asarray([k not in self.dead for k in batch[KEY]], dtype=bool)
        keys, phash = batch[KEY][alive], batch[PHASH][alive].astype(np.uint64)
        aesthetic = batch[AESTHETIC_SCORE][alive].astype(np.float32)
        values = g.band_values(phash, cfg.bands)
        bucket = (np.arange(cfg.bands, dtype=np.uint64)[None, :] << np.uint64(56)) | values  # bands <= 64
        bucket = bucket.reshape(-1)
        return {"bucket": bucket, PART: (bucket % np.uint64(cfg.parts)).astype(np.int64),
                KEY: np.repeat(keys, cfg.bands), PHASH: np.repeat(phash, cfg.bands),
                AESTHETIC_SCORE: np.repeat(aesthetic, cfg.bands)}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class PairConfig:
    max_distance: int
    max_bucket_rows: int


class BucketPairs:
    """One bucket partition → the pairs within ``max_distance`` (keys, hashes and scores of both ends)."""

    def __init__(self, config: PairConfig) -> None:
        self.config = config

    def __call__(self, batch: Batch) -> Batch:
        order = np.lexsort((np.asarray(batch[KEY], dtype=object).astype(str), batch["bucket"]))
        b = {c: v[order] for c, v in batch.items()}
        i, j, _, capped = g.bucket_pairs(
            b["bucket"], b[PHASH], self.config.max_distance, self.config.max_bucket_rows
        )
        out = {
            f"{c}_{end}": b[c][idx]
            for end, idx in (("a", i), ("b", j))
            for c in (KEY, PHASH, AESTHETIC_SCORE)
        }
        part = batch[PART][0] if len(batch[PART]) else 0
        return out | {"n_capped": np.full(len(i), capped, np.int64), PART: np.full(len(i), part, np.int64)}


@dataclass(frozen=True, kw_only=True)
class SemanticConfig:
    epsilon: float
    block_rows: int
    reference_epsilon: float


class SemanticCluster:
    """One cluster's rows (and any reference rows in it) → every dataset row with its semantic verdict."""

    def __init__(self, config: SemanticConfig) -> None:
        self.config = config

    def __call__(self, batch: Batch) -> Batch:
        cfg = self.config
        ref = batch[IS_REFERENCE].astype(bool)
        b = _sorted({c: v[~ref] for c, v in batch.items()})
        r = _sorted({c: v[ref] for c, v in batch.items()})
        n = len(b[KEY])
        unit = b[UNIT].astype(np.float32)
        best, ref_cos = g.reference_matches(unit, r[UNIT].astype(np.float32), cfg.reference_epsilon)
        alive = b[ALIVE] & (best < 0)
        found = g.semantic_groups(b[KEY], unit, b[AESTHETIC_SCORE].astype(np.float32), alive, cfg.epsilon,
                                  cfg.block_rows)  # fmt: skip
        dup, sim = np.full(n, "", dtype=object), np.full(n, np.nan, np.float32)
        dup[found.groups.removed] = b[KEY][found.groups.rep]
        sim[found.groups.removed] = found.groups.similarity
        matched = best >= 0
        ref_key = np.full(n, "", dtype=object)
        ref_key[matched] = r[KEY][best[matched]]
        return {KEY: b[KEY], SOURCE: b[SOURCE], SHARD_ID: b[SHARD_ID], DEDUP_CLUSTER: b[DEDUP_CLUSTER],
                NN_SIMILARITY: found.nn_similarity, "semantic_of": dup, "semantic_similarity": sim,
                "reference_of": ref_key, "reference_similarity": np.where(matched, ref_cos, np.nan).astype(np.float32)}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Verdicts:
    """What the driver learnt of the cheap kinds, for the writers: ``exact``/``perceptual`` map a removed key
    to ``(its representative, similarity)``; ``final`` maps a representative that a later kind removed to the
    key kept in its place."""

    exact: dict[str, tuple[str, float]]
    perceptual: dict[str, tuple[str, float]]
    final: dict[str, str]


@dataclass(frozen=True, kw_only=True)
class WriteConfig:
    store: CommitStore
    metadata: FileMetadata
    verdicts: Any  # an ObjectRef (or Verdicts)


def nn_histogram(nn: np.ndarray) -> list[int]:
    """Counts of nearest-neighbour cosines: below 0.6, then 0.6..1.0 in 0.01 bins (NaN: not counted)."""
    nn = nn[~np.isnan(nn)]
    edges = np.r_[-np.inf, np.linspace(HIST_LOW, 1.0, HIST_BINS + 1)[:-1], np.inf]
    return np.histogram(np.clip(nn, -1.0, 1.0), bins=edges)[0].astype(int).tolist()


def verdict_table(batch: Batch, verdicts: Verdicts) -> pa.Table:
    """A shard's rows → its dedup@1 table, sorted by key (reference > exact > perceptual > semantic)."""
    b = _sorted(batch)
    n = len(b[KEY])
    blank = np.full(n, "", dtype=object)
    reference, semantic = b.get("reference_of", blank), b.get("semantic_of", blank)
    dup, kind, sim = [None] * n, [None] * n, [None] * n
    for i, key in enumerate(b[KEY]):
        if reference[i]:
            dup[i], kind[i], sim[i] = reference[i], "reference", float(b["reference_similarity"][i])
        elif key in verdicts.exact or key in verdicts.perceptual:
            kind[i] = "exact" if key in verdicts.exact else "perceptual"
            rep, sim[i] = (verdicts.exact if key in verdicts.exact else verdicts.perceptual)[key]
            dup[i] = verdicts.final.get(rep, rep)
        elif semantic[i]:
            dup[i], kind[i], sim[i] = semantic[i], "semantic", float(b["semantic_similarity"][i])
    columns = {KEY: b[KEY].astype(str), SOURCE: b[SOURCE].astype(str), DUPLICATE_OF: dup, DEDUP_KIND: kind,
               DEDUP_SIMILARITY: sim, DEDUP_CLUSTER: b.get(DEDUP_CLUSTER, np.full(n, -1)).astype(np.int32),
               NN_SIMILARITY: b.get(NN_SIMILARITY, np.full(n, np.nan)).astype(np.float32)}  # fmt: skip
    return pa.table(columns, schema=DEDUP.arrow)


class WriteShard:
    """One shard's rows → ``parquet/<shard>.parquet`` committed, with its counts; returns its record."""

    def __init__(self, config: WriteConfig) -> None:
        self.config = config
        self.verdicts = resolve(config.verdicts)

    def __call__(self, batch: Batch) -> Batch:
        shard = str(batch[SHARD_ID][0])
        record = write_shard(self.config, shard, verdict_table(batch, self.verdicts))
        return {SHARD_ID: object_column([shard]), "record": object_column([json.dumps(record)])}


def write_shard(config: WriteConfig, shard: str, table: pa.Table) -> dict[str, Any]:
    """Stage and commit one shard's dedup table; the record counts each kind and the nn-similarity histogram."""
    kinds = table[DEDUP_KIND].to_pylist()
    table = attach_metadata(table, DEDUP, config.metadata)
    config.store.stage(shard, shard_file(shard), table_bytes(table))
    record = {"shard_id": shard, "files": [{"path": shard_file(shard), "rows": table.num_rows}],
              "n_input": table.num_rows, "n_kept": kinds.count(None),
              **{f"n_{k}": kinds.count(k) for k in KINDS},
              "nn_histogram": nn_histogram(table[NN_SIMILARITY].to_numpy(zero_copy_only=False))}  # fmt: skip
    return config.store.commit(shard, record)
