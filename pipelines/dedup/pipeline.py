"""``cascade dedup``: exact, perceptual and semantic duplicates among scored samples, as filter inputs.

Reads a ``cascade score`` output (scores@2: ``image_sha256``, ``phash`` and the CLIP-L embedding per key) and
writes one dedup@1 table per input shard (``parquet/<shard>.parquet``: key, ``duplicate_of``, ``dedup_kind``,
``dedup_similarity``, ``dedup_cluster``, ``nn_similarity``), committed per shard, ``dedup_report.json`` and
``manifest.json`` last. Kinds run in order, each on the rows the earlier ones kept:

1. **exact**: same sha256 of the image bytes (rows hash-partitioned by sha256; one shuffle of small columns);
2. **perceptual**: pHash Hamming distance <= ``max_distance``; candidate pairs share a band of the hash (LSH:
   ``bands`` bands, each row once per band, partitioned by band value), never all pairs; groups are the
   connected components of the pairs (on the driver: memory O(pairs));
3. **semantic** (SemDeDup): k-means (faiss) on a seeded sample of L2-normalised embeddings, every shard assigned
   by tasks, then one cluster at a time: pairs with cosine >= 1 - epsilon are joined;
4. **reference** (optional): rows within ``reference.epsilon`` of any embedding of a reference scores output
   (e.g. an evaluation set) are removed whatever else they are.

Each group keeps its highest-aesthetic row (then the lowest key); ``duplicate_of`` is the key kept in a removed
row's place. Every phase sorts its rows by key before it decides, so the output is the same for any number of
workers and any batch sizes; a rerun after a kill recomputes the verdicts (deterministic for the seed) and
writes only the shards not yet committed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.parquet as pq

from pipelines.core.by_shard import LAYOUT, open_per_shard, shard_path
from pipelines.core.commits import COMMITS, CommitStore, Endpoints, JobOutput
from pipelines.core.completion import SHARD_ID
from pipelines.core.notice import notice
from pipelines.core.progress import Progress
from pipelines.core.step import Resources
from pipelines.core.storage import write_bytes
from pipelines.dedup import groups as g
from pipelines.dedup import steps
from pipelines.dedup.examples import render_dedup_html, sample_groups, thumbnails
from pipelines.dedup.kmeans import MIN_POINTS_PER_CENTROID, fit_centroids, n_clusters
from schemas import DEDUP, SCORES_IDS, FileMetadata, validate_table
from schemas.columns import AESTHETIC_SCORE, CLIP_IMAGE_EMBEDS, IMAGE_SHA256, KEY, PHASH, SOURCE

REPORT, REPORT_HTML = "dedup_report.json", "dedup_report.html"
STATS = f"{COMMITS}/_dedup_stats.json"  # the run's global numbers (clusters, cut buckets), kept for reruns


@dataclass(frozen=True, kw_only=True)
class PerceptualConfig:
    """pHash near-copies: Hamming distance <= ``max_distance`` of 64 bits.

    ``bands`` cuts the hash into that many bands: pairs within ``bands - 1`` bits always share one and are
    always found; pairs further apart (up to ``max_distance``) are found when some band agrees (6 bands:
    97% of pairs 6 bits apart). Candidate pairs grow as bands · n² / 2^(64/bands+1) for uniform hashes
    (6 bands: 1.8·10^9 comparisons at 10^6 rows); past 10^7 rows use 4 bands (16 bits: pairs within 3 bits
    always found, further ones less often).

    Measured on the planted set (real photos): resize, JPEG q30 and colour jitter move pHash by 0-6 bits, a
    90% crop by 6-24, a text overlay by 2-31, a flip by ~30; distinct photos were >= 22 apart.
    """

    enabled: bool = True
    max_distance: int = 8
    bands: int = 6
    max_bucket_rows: int = 2000

    def __post_init__(self) -> None:
        if not 0 <= self.max_distance < g.HASH_BITS:
            raise ValueError(f"max_distance={self.max_distance} must be in 0..63")
        if not 2 <= self.bands <= 32:
            raise ValueError(f"bands={self.bands} must be in 2..32")
        if self.max_bucket_rows < 2:
            raise ValueError(f"max_bucket_rows={self.max_bucket_rows} must be >= 2")


@dataclass(frozen=True, kw_only=True)
class SemanticConfig:
    """SemDeDup on the stored CLIP-L embeddings.

    Attributes:
        epsilon: pairs with cosine >= 1 - epsilon are duplicates (SemDeDup's ε).
        cluster_rows: target rows per k-means cluster (clusters = rows / cluster_rows).
        max_cluster_rows: a cluster the sample predicts larger is split by a k-means of its own.
        sample_rows: rows of the seeded k-means sample (at least 39 per cluster are used).
        iterations, seed: of k-means; the seed also picks the sample.
        block_rows: rows per similarity block inside a cluster (memory: block_rows × cluster rows floats).
    """

    enabled: bool = True
    epsilon: float = 0.05
    cluster_rows: int = 2000
    max_cluster_rows: int = 8000
    sample_rows: int = 100_000
    iterations: int = 20
    seed: int = 0
    block_rows: int = 1024

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1)")
        if self.cluster_rows < 1 or self.max_cluster_rows < self.cluster_rows:
            raise ValueError(
                f"cluster_rows={self.cluster_rows} must be >= 1 and <= max_cluster_rows={self.max_cluster_rows}"
            )
        for name in ("sample_rows", "iterations", "block_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True, kw_only=True)
class ReferenceConfig:
    """Keep a reference set out (e.g. an evaluation set): a ``cascade score`` output of it, same scorer."""

    scores_dir: str
    epsilon: float = 0.05
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.epsilon < 1.0:
            raise ValueError(f"epsilon={self.epsilon} must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class DedupConfig(Endpoints):
    """A dedup job over stored scores.

    Attributes:
        scores_dir: a ``cascade score`` output (scores@2).
        output_dir: where ``parquet/<shard>.parquet``, ``dedup_report.json`` and ``manifest.json`` go.
        exact, perceptual, semantic: the kinds to find (all on by default).
        reference: optional reference set to keep out.
        partition_rows: rows per shuffle partition of the exact and perceptual phases.
        report_groups: example groups shown in ``dedup_report.html`` (chosen by a hash seeded with semantic.seed).
        on_stale: an output made with other settings or other scores: ``redo`` (default) or ``refuse``.
        read_resources, group_resources: Ray resources of the shard reads and of the grouped phases.
    """

    scores_dir: str
    output_dir: str
    exact: bool = True
    perceptual: PerceptualConfig = dataclasses.field(default_factory=PerceptualConfig)
    semantic: SemanticConfig = dataclasses.field(default_factory=SemanticConfig)
    reference: ReferenceConfig | None = None
    endpoint_url: str | None = None
    output_endpoint_url: str | None = None
    partition_rows: int = 200_000
    report_groups: int = 8
    on_stale: str = "redo"
    read_resources: Resources = dataclasses.field(
        default_factory=lambda: Resources(batch_size=1, concurrency=2)
    )
    group_resources: Resources = dataclasses.field(default_factory=lambda: Resources(concurrency=2))

    def __post_init__(self) -> None:
        if not (self.exact or self.perceptual.enabled or self.semantic.enabled):
            raise ValueError("exact, perceptual.enabled and semantic.enabled are all off: nothing to find")
        if self.reference is not None and not self.semantic.enabled:
            raise ValueError("reference needs semantic.enabled (it compares embeddings within clusters)")
        if self.partition_rows < 1:
            raise ValueError(f"partition_rows={self.partition_rows} must be >= 1")
        if self.report_groups < 0:
            raise ValueError(f"report_groups={self.report_groups} must be >= 0")


@dataclass(frozen=True)
class DedupSummary:
    output_dir: str
    n_shards: int
    n_input: int
    n_kept: int
    removed: dict[str, int]
    n_clusters: int


@dataclass(frozen=True)
class Inputs:
    """The scores to dedup: root, shards, total rows, schema id and embedding width."""

    root: str
    options: dict[str, Any]
    shards: list[str]
    n_rows: int
    metadata: FileMetadata
    fingerprint: Any


def open_scores(path: str, options: dict[str, Any], field: str, convert_to: CommitStore) -> Inputs:
    """A per-shard scores output, its row count from the manifest (no data read) and its schema."""
    root, manifest = open_per_shard(path, options, field=field, convert_to=convert_to, schema_id=SCORES_IDS)
    shards = sorted(manifest["shards"])
    if not shards:
        raise FileNotFoundError(f"{field}={path!r}: the scores hold no shards")
    fs, first = fsspec.core.url_to_fs(shard_path(root, shards[0]), **options)
    meta = validate_table(pq.read_schema(fs.open(first, "rb")).empty_table(), SCORES_IDS, source=first)
    n_rows = sum(f["rows"] for r in manifest["shards"].values() for f in r.get("files", ()))
    digest = hashlib.sha256(json.dumps(manifest["shards"], sort_keys=True).encode()).hexdigest()
    fingerprint = {"scores": manifest.get("fingerprint"), "shards_sha256": digest}
    return Inputs(root, options, shards, n_rows, meta, fingerprint)


def _tasks(resources: Resources) -> dict[str, Any]:
    """Ray Data arguments of a stateless step: tasks (no actor holds a CPU between phases), capped in number."""
    from ray.data import TaskPoolStrategy

    return {"compute": TaskPoolStrategy(size=resources.concurrency), "num_cpus": resources.num_cpus,
            "batch_format": "numpy"}  # fmt: skip


def _read(inputs: Inputs, shards: list[str], resources: Resources, **config: Any) -> Any:
    import ray

    read = steps.ReadConfig(root=inputs.root, storage_options=inputs.options, **config)
    ds = ray.data.from_items([{SHARD_ID: s} for s in shards], override_num_blocks=max(1, len(shards)))
    return ds.map_batches(steps.run, fn_args=(steps.ReadRows, read), batch_size=1, **_tasks(resources))


def _grouped(ds: Any, key: str, parts: int, step: Any, resources: Resources, config: Any = None) -> Any:
    """``step(config)`` over each group of rows with the same ``key`` (a hash shuffle into ``parts``)."""
    return ds.groupby(key, num_partitions=parts).map_groups(
        steps.run, fn_args=(step, config), **_tasks(resources)
    )


def find_exact(config: DedupConfig, small: Any, parts: int) -> dict[str, tuple[str, float]]:
    """Exact verdicts: removed key → (representative, 1.0)."""
    rows = steps.collect(_grouped(small, steps.PART, parts, steps.ExactPart, config.group_resources))
    return {
        str(k): (str(d), 1.0) for k, d in zip(rows.get(KEY, ()), rows.get("duplicate_of", ()), strict=True)
    }


def find_perceptual(
    config: DedupConfig, small: Any, parts: int, dead: set[str]
) -> tuple[dict[str, tuple[str, float]], int]:
    """Perceptual verdicts (removed key → representative, similarity) and the number of cut buckets."""
    import ray

    cfg = config.perceptual
    band = steps.BandConfig(bands=cfg.bands, parts=parts, dead=ray.put(dead))
    bands = small.map_batches(steps.run, fn_args=(steps.ExplodeBands, band), batch_size=65536,
                              **_tasks(config.group_resources))  # fmt: skip
    pairs = steps.collect(_grouped(bands, steps.PART, parts, steps.BucketPairs, config.group_resources,
                           steps.PairConfig(max_distance=cfg.max_distance, max_bucket_rows=cfg.max_bucket_rows)))  # fmt: skip
    if not pairs:
        return {}, 0
    keys = np.concatenate([pairs["key_a"], pairs["key_b"]]).astype(str)
    nodes, index = np.unique(keys, return_index=True)
    phash = np.concatenate([pairs["phash_a"], pairs["phash_b"]]).astype(np.uint64)[index]
    aesthetic = np.concatenate([pairs["aesthetic_score_a"], pairs["aesthetic_score_b"]]).astype(np.float32)[
        index
    ]
    i, j = (
        np.searchsorted(nodes, pairs["key_a"].astype(str)),
        np.searchsorted(nodes, pairs["key_b"].astype(str)),
    )
    found = g.perceptual_groups(nodes.astype(object), phash, aesthetic, i, j)
    verdicts = {str(nodes[r]): (str(nodes[p]), float(s)) for r, p, s in
                zip(found.removed, found.rep, found.similarity, strict=True)}  # fmt: skip
    capped = dict(
        zip(pairs[steps.PART].tolist(), pairs["n_capped"].tolist(), strict=True)
    )  # one count a partition
    return verdicts, int(sum(capped.values()))


def sample_embeddings(inputs: Inputs, cfg: SemanticConfig, resources: Resources) -> np.ndarray:
    """A seeded sample of L2-normalised embeddings: whole shards in a seeded order until enough rows, then rows
    with the smallest seeded key hashes (the sample depends on the seed and the input, nothing else)."""
    want = max(cfg.sample_rows, MIN_POINTS_PER_CENTROID * n_clusters(inputs.n_rows, cfg.cluster_rows))
    rng = np.random.default_rng(cfg.seed)
    order = [inputs.shards[i] for i in rng.permutation(len(inputs.shards))]
    picked = order[: max(1, math.ceil(len(order) * min(1.0, 2 * want / max(1, inputs.n_rows))))]
    rows = steps.collect(_read(inputs, picked, resources, columns=(KEY, CLIP_IMAGE_EMBEDS)))
    if not rows:
        raise ValueError("the scores hold no rows to fit k-means on")
    keys = rows[KEY].astype(str)
    take = np.lexsort((keys, steps.partition_of([f"{cfg.seed}:{k}" for k in keys], 2**31)))[:want]
    take = take[np.argsort(keys[take])]  # in key order: k-means seeds by position, rows arrive in any order
    return rows[steps.UNIT][take].astype(np.float32)


def open_reference(config: DedupConfig, inputs: Inputs) -> Inputs | None:
    """The reference scores, checked to hold embeddings of the same width as the dataset's."""
    if config.reference is None:
        return None
    store = CommitStore(f"{config.store.root}/_inputs/reference", config.store.options)
    options = {"endpoint_url": config.reference.endpoint_url} if config.reference.endpoint_url else {}
    reference = open_scores(config.reference.scores_dir, options, "reference.scores_dir", store)
    ours, theirs = (i.metadata.tensor_shapes.get(CLIP_IMAGE_EMBEDS) for i in (inputs, reference))
    if ours != theirs:
        raise ValueError(f"reference.scores_dir={config.reference.scores_dir!r} has {theirs} embeddings, "
                         f"scores_dir has {ours}: score both with the same scorer")  # fmt: skip
    return reference


def _semantic(
    config: DedupConfig, inputs: Inputs, reference: Inputs | None, dead: set[str]
) -> tuple[Any, int]:
    """Every row with its cluster, nearest-neighbour cosine and semantic/reference verdicts (materialised)."""
    import ray

    cfg = config.semantic
    sample = sample_embeddings(inputs, cfg, config.read_resources)
    fit = ray.remote(num_cpus=config.group_resources.num_cpus)(fit_centroids)
    centroids = ray.get(fit.remote(sample, inputs.n_rows, cfg.cluster_rows, cfg.max_cluster_rows, cfg.iterations,
                                   cfg.seed))  # fmt: skip
    notice(f"dedup: k-means fitted on {len(sample)} sampled rows: {len(centroids)} clusters")
    shared = {"centroids": ray.put(centroids), "dead": ray.put(dead)}
    columns = (KEY, SOURCE, AESTHETIC_SCORE, CLIP_IMAGE_EMBEDS)
    rows = _read(inputs, inputs.shards, config.read_resources, columns=columns, **shared)
    if reference is not None:
        rows = rows.union(
            _read(
                reference,
                reference.shards,
                config.read_resources,
                columns=columns,
                is_reference=True,
                **shared,
            )
        )
    parts = max(1, min(len(centroids), math.ceil(inputs.n_rows / 50_000)))
    semantic = steps.SemanticConfig(epsilon=cfg.epsilon, block_rows=cfg.block_rows,
                                    reference_epsilon=config.reference.epsilon if config.reference else 0.0)  # fmt: skip
    return _grouped(
        rows, "dedup_cluster", parts, steps.SemanticCluster, config.group_resources, semantic
    ).materialize(), len(centroids)


def resolve_final(verdicts: steps.Verdicts, later: dict[str, str]) -> dict[str, str]:
    """Where a representative of the exact or perceptual kind was itself removed later (perceptual, semantic or
    reference), the key kept in its place: chains are followed to their end."""
    step = {k: v[0] for k, v in verdicts.perceptual.items()} | later
    final = {}
    for rep in {v[0] for v in (*verdicts.exact.values(), *verdicts.perceptual.values())}:
        key, seen = rep, set()
        while key in step and key not in seen:
            seen.add(key)
            key = step[key]
        if key != rep:
            final[rep] = key
    return final


def find_duplicates(
    config: DedupConfig, inputs: Inputs, reference: Inputs | None
) -> tuple[Any, steps.Verdicts, dict[str, Any]]:
    """Every phase but the writing: the rows to write (a materialised dataset), the verdicts and the stats."""
    import ray

    parts = max(1, math.ceil(inputs.n_rows / config.partition_rows))
    exact, perceptual, stats = {}, {}, {"n_clusters": 0, "n_capped_buckets": 0}
    small = None
    if config.exact or config.perceptual.enabled or not config.semantic.enabled:
        columns = (KEY, SOURCE, IMAGE_SHA256, PHASH, AESTHETIC_SCORE)
        small = _read(
            inputs, inputs.shards, config.read_resources, columns=columns, parts=parts
        ).materialize()
    if config.exact:
        exact = find_exact(config, small, parts)
        notice(f"dedup: exact copies: {len(exact)}")
    if config.perceptual.enabled:
        perceptual, stats["n_capped_buckets"] = find_perceptual(config, small, parts, set(exact))
        notice(f"dedup: perceptual near-copies: {len(perceptual)}")
    verdicts = steps.Verdicts(exact=exact, perceptual=perceptual, final={})
    rows, later = small, {}
    if config.semantic.enabled:
        rows, stats["n_clusters"] = _semantic(config, inputs, reference, set(exact) | set(perceptual))
        reps = ray.put({v[0] for v in (*exact.values(), *perceptual.values())})
        found = steps.collect(rows.map_batches(_removed_reps, fn_args=(reps,), batch_format="numpy"))
        later = {str(k): str(r or s) for k, r, s in zip(found.get(KEY, ()), found.get("reference_of", ()),
                                                        found.get("semantic_of", ()), strict=True)}  # fmt: skip
    verdicts = dataclasses.replace(verdicts, final=resolve_final(verdicts, later))
    return rows, verdicts, stats


def _removed_reps(batch: dict[str, np.ndarray], reps: Any) -> dict[str, np.ndarray]:
    """Rows that represent an exact or perceptual group and were removed by a later kind."""
    reps = steps.resolve(reps)
    keep = np.asarray([k in reps and bool(r or s) for k, r, s in
                       zip(batch[KEY], batch["reference_of"], batch["semantic_of"], strict=True)], dtype=bool)  # fmt: skip
    return {c: batch[c][keep] for c in (KEY, "reference_of", "semantic_of")}


def _in_shards(batch: dict[str, np.ndarray], todo: Any) -> dict[str, np.ndarray]:
    todo = steps.resolve(todo)
    keep = np.asarray([s in todo for s in batch[SHARD_ID]], dtype=bool)
    return {c: v[keep] for c, v in batch.items()}


def write_shards(
    config: DedupConfig, rows: Any, verdicts: steps.Verdicts, todo: list[str], meta: FileMetadata
) -> dict:
    """Commit every ``todo`` shard's dedup table (one task per shard, after a shuffle by shard); returns records."""
    import ray

    write = steps.WriteConfig(store=config.store, metadata=meta, verdicts=ray.put(verdicts))
    mine = rows.map_batches(_in_shards, fn_args=(ray.put(set(todo)),), batch_format="numpy")
    parts = max(1, min(len(todo), math.ceil(len(todo) / 8)))
    records: dict[str, dict[str, Any]] = {}
    with Progress("dedup", len(todo)) as progress:
        for batch in _grouped(
            mine, SHARD_ID, parts, steps.WriteShard, config.group_resources, write
        ).iter_batches(batch_size=None, batch_format="numpy"):
            done = {str(s): json.loads(r) for s, r in zip(batch[SHARD_ID], batch["record"], strict=True)}
            records |= done
            progress.update(len(done), samples=sum(r["n_input"] for r in done.values()))
    empty = DEDUP.arrow.empty_table()
    for shard in sorted(set(todo) - set(records)):  # shards with no scored rows
        records[shard] = steps.write_shard(write, shard, empty)
    return records


def run_dedup(config: DedupConfig) -> DedupSummary:
    """Find duplicates among the scored samples on the current Ray cluster; one dedup table per shard."""
    store = config.store
    inputs = open_scores(config.scores_dir, config.input_options, "scores_dir",
                         CommitStore(f"{store.root}/_inputs/scores", store.options))  # fmt: skip
    if inputs.metadata.schema_id == "scores@1" and (config.exact or config.perceptual.enabled):
        raise ValueError(
            f"scores_dir={config.scores_dir!r} is scores@1, scored before image_sha256 and phash were stored: "
            "rescore it (cascade score, on_stale=redo), or set exact=false and perceptual.enabled=false"
        )
    reference = open_reference(config, inputs)
    settings = {k: v for k, v in dataclasses.asdict(config).items() if not k.endswith(("resources", "endpoint_url"))
                and k not in ("output_dir", "on_stale", "report_groups")}  # fmt: skip
    fingerprint = {
        "settings": settings,
        "inputs": inputs.fingerprint,
        "reference": reference and reference.fingerprint,
    }
    output = JobOutput(store, fingerprint, config.on_stale)
    todo = output.start(inputs.shards)
    stats = store.read_json(STATS) or {}
    new = {}
    if todo:
        rows, verdicts, stats = find_duplicates(config, inputs, reference)
        store.write_json(STATS, stats)
        meta = FileMetadata(schema_id=DEDUP.id, encoder_flavors=inputs.metadata.encoder_flavors,
                            random_weights=inputs.metadata.made_by_random_weights)  # fmt: skip
        new = write_shards(config, rows, verdicts, todo, meta)
    manifest = output.finish(new, inputs.shards, schema=DEDUP.id, layout=LAYOUT, scores_dir=config.scores_dir,
                             random_weights=inputs.metadata.made_by_random_weights, **stats)  # fmt: skip
    totals = manifest["totals"]
    histogram = np.sum([r["nn_histogram"] for r in manifest["shards"].values()], axis=0).astype(int).tolist()
    report = {"settings": settings, **stats, "totals": totals, "random_weights": inputs.metadata.made_by_random_weights,
              "nn_histogram": {"edges": [-1.0, *np.round(np.linspace(steps.HIST_LOW, 1.0, steps.HIST_BINS + 1), 2).tolist()],
                               "counts": histogram}}  # fmt: skip
    store.write_json(REPORT, report)
    n_removed = totals.get("n_input", 0) - totals.get("n_kept", 0)
    groups = sample_groups(store.root, store.options, config.report_groups, config.semantic.seed, n_removed)
    html = render_dedup_html(report, groups, thumbnails(groups, config.input_options))
    write_bytes(store.uri(REPORT_HTML), html.encode(), store.options)
    removed = {k: totals.get(f"n_{k}", 0) for k in steps.KINDS}
    return DedupSummary(config.output_dir, len(inputs.shards), totals.get("n_input", 0), totals.get("n_kept", 0),
                        removed, stats.get("n_clusters", 0))  # fmt: skip
