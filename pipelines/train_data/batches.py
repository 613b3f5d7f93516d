"""Training batches from a latent cache: one bucket per batch, a fixed order per (seed, epoch), resumable.

The order is a pure function of the seed, so every worker and every resumed run computes the same one:

- each epoch shuffles the cache files (``rng(seed, epoch)``) and cuts them into windows of
  ``shuffle_window_files`` files;
- within a window, each bucket's rows are shuffled (``rng(seed, epoch, window)``) and cut into global batches
  of ``global_batch`` rows; a bucket's remainder (< one batch) is left out of that epoch (as with
  ``drop_last``; the next epoch's windows differ); the window's batches are then shuffled together;
- global batches are numbered: batch ``s`` is optimizer step ``s``. Its rows split into ``world × accum``
  micro-batches of ``micro_batch`` rows; micro-batch ``j`` belongs to rank ``j // accum``. One worker with
  twice the accumulation therefore sees exactly the micro-batches two workers see together.

A window is read once per rank (its files, the training columns only) and yields that rank's micro-batches;
``start_step`` skips whole windows and the steps before it, so a resumed run reads no batch twice. On Ray,
one dataset per rank streams these micro-batches to the workers (``get_dataset_shard(f"rank_{r}")``).

Tensors keep the stored shapes: ``clip_text_pooled`` and ``clip_img`` are (micro_batch, C); the training specs
reshape them to Stage C's (B, 1, C) (``latents_reader.stage_c_shapes_of`` does the same for other readers).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np

from pipelines.core.latents_reader import (
    FORMATS,
    committed_records,
    file_info,
    list_latent_files,
    read_latent_table,
    table_to_batch,
)
from pipelines.core.preprocess import LATENT_CELL_PX, bucket_name
from pipelines.train_data.crops import CropSpec, training_crops
from schemas import columns as c
from schemas.core import FileMetadata, SchemaMismatchError

if TYPE_CHECKING:
    import ray.data

CONDITION_COLUMNS = (c.EFFNET, c.CLIP_TEXT, c.CLIP_TEXT_POOLED, c.CLIP_IMG)
TEXT_COLUMNS = (c.KEY, c.SOURCE_SHARD)  # per micro-batch: the samples' values joined by newlines
IMAGES = "images"  # (micro_batch, 3, H, W) uint8 training crops, for ControlNet inputs
MicroBatch = dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TrainDataConfig:
    """Where the cached latents are and how batches are drawn from them.

    Attributes:
        path: an encode output (``manifest.json``, ``_commits/``), a folder of latent files, or one file;
            local or an fsspec URL (``s3://``).
        format: ``parquet`` or ``webdataset`` (both hold the same tensors).
        endpoint_url: S3 endpoint for ``path`` (credentials come from the standard AWS environment).
        empty_caption: the empty-caption embedding (safetensors); default: the one the encode manifest names.
        buckets: train on these buckets only ("WxH" in latent cells); empty: all of them.
        shuffle_window_files: files read together and shuffled within each bucket.
        prefetch_batches: micro-batches each worker prefetches.
        read_cpus: CPUs per window-read task.
    """

    path: str
    format: str = "parquet"
    endpoint_url: str | None = None
    empty_caption: str | None = None
    buckets: tuple[str, ...] = ()
    shuffle_window_files: int = 64
    prefetch_batches: int = 2
    read_cpus: float = 0.5

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format={self.format!r}; allowed: {', '.join(FORMATS)}")
        if self.shuffle_window_files < 1:
            raise ValueError(f"shuffle_window_files={self.shuffle_window_files} must be >= 1")
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches={self.prefetch_batches} must be >= 0")

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}


@dataclass(frozen=True)
class CacheFile:
    uri: str
    bucket: str
    num_rows: int


@dataclass(frozen=True)
class Cache:
    """A checked latent cache: its files (one bucket each), the shared metadata and the empty caption."""

    files: tuple[CacheFile, ...]
    metadata: FileMetadata
    empty_caption: dict[str, np.ndarray]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample tensor shapes (effnet: channels only, its spatial size is the bucket's)."""
        shapes = {name: spec.shape for name, spec in self.metadata.tensor_shapes.items()}
        return shapes | {c.EFFNET: shapes[c.EFFNET][:1]}


def open_cache(config: TrainDataConfig, *, verify_files: int = 16, max_workers: int = 16) -> Cache:
    """The cache's files with their buckets and rows, checked, and the empty caption.

    An encode output's manifest (or, while it has none, its commit records) lists every file with its bucket
    and rows: the footers of a seeded sample of ``verify_files`` files (one per bucket at least) are checked
    against it. A folder of latent files without them has every footer read (concurrently).

    Raises:
        FileNotFoundError: no latent files, or no empty-caption embedding (``data.path``/``data.empty_caption``).
        SchemaMismatchError: files encoded with different encoders, weights, preprocessing or shapes, or a file
            whose footer disagrees with the manifest.
    """
    options = config.storage_options
    try:
        listed = _listed_files(config)
        uris = (
            [f.uri for f in listed]
            if listed is not None
            else list_latent_files(config.path, config.format, options)
        )
    except FileNotFoundError as err:
        raise FileNotFoundError(f"data.path: {err}") from None
    checked = uris if listed is None else _sample(listed, verify_files)
    columns = [c.KEY, *CONDITION_COLUMNS]
    with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(checked)))) as pool:
        infos = dict(zip(checked, pool.map(
            lambda u: file_info(u, config.format, storage_options=options, columns=columns), checked), strict=True))  # fmt: skip
    first_uri, (first, _) = checked[0], infos[checked[0]]
    for uri, (meta, _) in infos.items():
        _check_same(first_uri, first, uri, meta)
    if listed is None:
        listed = [CacheFile(uri, _bucket(meta), rows) for uri, (meta, rows) in infos.items()]
    for f in listed:
        if f.uri in infos and (_bucket(infos[f.uri][0]), infos[f.uri][1]) != (f.bucket, f.num_rows):
            meta, rows = infos[f.uri]
            raise SchemaMismatchError(
                f"{f.uri}: bucket {_bucket(meta)}, {rows} rows; the cache manifest says {f.bucket}, {f.num_rows} rows"
            )
    files = [f for f in listed if not config.buckets or f.bucket in config.buckets]
    if not files:
        found = sorted({f.bucket for f in listed})
        raise FileNotFoundError(f"data.buckets={list(config.buckets)}: the cache holds buckets {found}")
    return Cache(tuple(files), first, _empty_caption(config))


def _listed_files(config: TrainDataConfig) -> list[CacheFile] | None:
    """The files of an encode output with their buckets and rows, from its records (None: not listed there)."""
    records = committed_records(config.path, config.storage_options)
    entries = [f for r in (records or {}).values() for f in r.get("files", ())]
    if not entries or not all(isinstance(f, dict) for f in entries):
        return None  # a plain folder, or an encode output from before per-file rows were recorded
    base = config.path.rstrip("/")
    files = [CacheFile(f"{base}/{f['path']}", f["bucket"], int(f["rows"])) for f in entries
             if f["path"].startswith(f"{config.format}/")]  # fmt: skip
    if not files:
        raise FileNotFoundError(
            f"{config.path!r} holds no {config.format} files (the encode wrote other formats)"
        )
    return sorted(files, key=lambda f: f.uri)


def _sample(files: list[CacheFile], n: int) -> list[str]:
    """A seeded sample of ``n`` file URIs with at least one per bucket, in name order."""
    first_of: dict[str, str] = {}
    for f in files:
        first_of.setdefault(f.bucket, f.uri)
    rest = [f.uri for f in files if f.uri not in set(first_of.values())]
    picked = _rng(len(files)).permutation(len(rest))[: max(0, n - len(first_of))]
    return sorted({*first_of.values(), *(rest[i] for i in picked)})


def _bucket(meta: FileMetadata) -> str:
    _, h, w = meta.tensor_shapes[c.EFFNET].shape
    return bucket_name(h * LATENT_CELL_PX, w * LATENT_CELL_PX)


def _check_same(first_uri: str, first: FileMetadata, uri: str, meta: FileMetadata) -> None:
    for what in ("encoder_flavors", "weights_sha256", "preprocessing_hash"):
        if getattr(meta, what) != getattr(first, what):
            raise SchemaMismatchError(
                f"{uri}: {what} {getattr(meta, what)!r} differs from {first_uri}'s {getattr(first, what)!r}; "
                "a training set must come from one encoder configuration"
            )
    for name, spec in meta.tensor_shapes.items():
        other = first.tensor_shapes.get(name)
        if other is None or spec.dtype != other.dtype or (name != c.EFFNET and spec.shape != other.shape):
            raise SchemaMismatchError(f"{uri}: tensor {name} is {spec}, {first_uri} has {other}")


def _empty_caption(config: TrainDataConfig) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    path = config.empty_caption
    if path is None:
        manifest = f"{config.path.rstrip('/')}/manifest.json"
        fs, local = fsspec.core.url_to_fs(manifest, **config.storage_options)
        if not fs.exists(local):
            raise FileNotFoundError(
                f"data.path={config.path!r} has no manifest.json naming the empty-caption embedding "
                "(train on a `cascade encode` output, or set data.empty_caption)"
            )
        name = json.loads(fs.cat_file(local))["empty_caption"]
        path = f"{config.path.rstrip('/')}/{name}"
    with fsspec.open(path, "rb", **config.storage_options) as f:
        tensors = load(f.read())
    missing = {c.CLIP_TEXT, c.CLIP_TEXT_POOLED} - set(tensors)
    if missing:
        raise FileNotFoundError(f"data.empty_caption={path!r} lacks tensors {sorted(missing)}")
    return tensors


# --- the plan -----------------------------------------------------------------------------------------------
def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


def epoch_windows(n_files: int, seed: int, epoch: int, window_files: int) -> list[list[int]]:
    """Indices of the cache files in each window of ``epoch``."""
    order = _rng(seed, epoch).permutation(n_files).tolist()
    return [order[i : i + window_files] for i in range(0, n_files, window_files)]


def window_batches(
    buckets: Sequence[str], rows: Sequence[int], *, seed: int, epoch: int, window: int, global_batch: int
) -> list[np.ndarray]:
    """The window's global batches, in order: each a (global_batch, 2) array of (file position, row).

    ``buckets``/``rows`` describe the window's files in window order; every batch is from one bucket.
    """
    rng = _rng(seed, epoch, window)
    batches = []
    for bucket in sorted(set(buckets)):
        refs = np.array(
            [
                (i, r)
                for i, (b, n) in enumerate(zip(buckets, rows, strict=True))
                if b == bucket
                for r in range(n)
            ],
            dtype=np.int64,
        ).reshape(-1, 2)
        refs = refs[rng.permutation(len(refs))]
        batches += [refs[k * global_batch : (k + 1) * global_batch] for k in range(len(refs) // global_batch)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _steps_in(buckets: Sequence[str], rows: Sequence[int], global_batch: int) -> int:
    per_bucket: dict[str, int] = {}
    for b, n in zip(buckets, rows, strict=True):
        per_bucket[b] = per_bucket.get(b, 0) + n
    return sum(n // global_batch for n in per_bucket.values())


@dataclass(frozen=True)
class WindowPlan:
    """One window of one epoch: its files (indices into ``Cache.files``) and the steps it yields."""

    epoch: int
    window: int
    first_step: int
    n_steps: int
    files: tuple[int, ...]


def plan_windows(
    files: Sequence[CacheFile],
    *,
    seed: int,
    global_batch: int,
    max_steps: int,
    window_files: int,
    start_step: int = 0,
) -> list[WindowPlan]:
    """The windows that hold steps ``start_step .. max_steps - 1``, epoch after epoch.

    Raises:
        ValueError: no bucket of any window has ``global_batch`` rows (the batch can never be filled).
    """
    plans: list[WindowPlan] = []
    step, epoch = 0, 0
    while step < max_steps:
        epoch_steps = 0
        for w, idx in enumerate(epoch_windows(len(files), seed, epoch, window_files)):
            n = _steps_in([files[i].bucket for i in idx], [files[i].num_rows for i in idx], global_batch)
            if n and step + n > start_step and step < max_steps:
                plans.append(WindowPlan(epoch, w, step, n, tuple(idx)))
            step, epoch_steps = step + n, epoch_steps + n
        if epoch_steps == 0:
            biggest = max(_rows_by_bucket(files).values())
            raise ValueError(
                f"batch_size={global_batch} exceeds the rows of every bucket in every window (largest bucket: "
                f"{biggest} rows, shuffle_window_files={window_files}); lower batch_size or add data"
            )
        epoch += 1
    return plans


def _rows_by_bucket(files: Sequence[CacheFile]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in files:
        out[f.bucket] = out.get(f.bucket, 0) + f.num_rows
    return out


@dataclass(frozen=True, kw_only=True)
class ReadSpec:
    """What one rank reads from a window."""

    files: tuple[CacheFile, ...]
    format: str
    storage_options: dict[str, Any]
    columns: tuple[str, ...] = CONDITION_COLUMNS  # the tensors a micro-batch carries (the spec's columns)
    seed: int
    micro_batch: int
    accum: int
    world: int
    rank: int
    start_step: int = 0
    crops: CropSpec | None = None  # also yield the training crops (``IMAGES``)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum * self.world


def window_micro_batches(plan: WindowPlan, spec: ReadSpec) -> Iterator[MicroBatch]:
    """Read the window's files and yield this rank's micro-batches of steps >= ``spec.start_step``.

    Each micro-batch: ``step``, ``micro`` (0 .. world·accum − 1), ``key`` (keys joined by newlines) and the
    tensors (micro_batch, *shape) in the stored dtype; with ``spec.crops`` also ``IMAGES``.
    """
    files = [spec.files[i] for i in plan.files]
    columns = [c.KEY, c.SOURCE_SHARD, *spec.columns]
    tables = [
        table_to_batch(
            read_latent_table(f.uri, spec.format, storage_options=spec.storage_options, columns=columns)
        )
        for f in files
    ]
    batches = window_batches(
        [f.bucket for f in files], [f.num_rows for f in files],
        seed=spec.seed, epoch=plan.epoch, window=plan.window, global_batch=spec.global_batch,
    )  # fmt: skip
    m = spec.micro_batch
    mine = []  # (step, micro, rows) of this rank
    for offset, refs in enumerate(batches):
        if plan.first_step + offset >= spec.start_step:
            for a in range(spec.accum):
                micro = spec.rank * spec.accum + a
                mine.append((plan.first_step + offset, micro, refs[micro * m : (micro + 1) * m]))
    crops = _crops(tables, [r for *_, rows in mine for r in rows], spec.crops) if spec.crops else None
    for n, (step, micro, rows) in enumerate(mine):
        out: MicroBatch = {"step": step, "micro": micro}
        for name in [c.KEY, c.SOURCE_SHARD, *spec.columns]:
            values = [tables[i][name][r] for i, r in rows]
            out[name] = "\n".join(map(str, values)) if name in TEXT_COLUMNS else np.stack(values)
        if crops is not None:
            out[IMAGES] = np.stack(crops[n * m : (n + 1) * m])
        yield out


def _crops(tables: list, rows: list, spec: CropSpec) -> list[np.ndarray]:
    samples = []
    for i, r in rows:
        _, h, w = tables[i][c.EFFNET][r].shape
        samples.append((str(tables[i][c.SOURCE_SHARD][r]), str(tables[i][c.KEY][r]),
                        (h * LATENT_CELL_PX, w * LATENT_CELL_PX)))  # fmt: skip
    return training_crops(samples, spec)


# --- on Ray -------------------------------------------------------------------------------------------------
def _read_windows(items: dict[str, np.ndarray], spec: ReadSpec) -> Iterator[dict[str, np.ndarray]]:
    """Ray ``map_batches`` function: window plans → this rank's micro-batches, one row each."""
    for i in range(len(items["epoch"])):
        plan = WindowPlan(*(int(items[k][i]) for k in ("epoch", "window", "first_step", "n_steps")),
                          tuple(int(x) for x in items["files"][i]))  # fmt: skip
        for micro_batch in window_micro_batches(plan, spec):
            yield {k: np.asarray([v]) for k, v in micro_batch.items()}


def rank_datasets(
    plans: Sequence[WindowPlan], spec: ReadSpec, read_cpus: float = 0.5
) -> dict[str, ray.data.Dataset]:
    """One ordered Ray Dataset of micro-batches per rank, ``{"rank_0": ..., ...}``."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # the datasets capture the context: their order is the plan's
    items = [dataclasses.asdict(p) | {"files": list(p.files)} for p in plans]
    base = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return {
        f"rank_{r}": base.map_batches(
            _read_windows,
            batch_size=1,
            num_cpus=read_cpus,
            fn_kwargs={"spec": dataclasses.replace(spec, rank=r)},
        )
        for r in range(spec.world)
    }


def iter_rank(shard: Any, prefetch_batches: int = 2) -> Iterator[MicroBatch]:
    """A worker's micro-batches from its ``get_dataset_shard`` (rows back to plain values)."""
    for row in shard.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=prefetch_batches):
        out = {k: v[0] for k, v in row.items()}
        out["step"], out["micro"] = int(out["step"]), int(out["micro"])
        out |= {name: str(out[name]) for name in TEXT_COLUMNS}
        yield out
