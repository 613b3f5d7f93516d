"""``cascade report``: how well Stage B + Stage A reconstruct a sample of a latent cache or of raw images.

The driver draws a seeded sample spread over the shards/files (in a seeded order, each gives its even share
of the samples still wanted), then Ray Data runs the steps: for a cache, the original crop is re-read from the sample's source shard
(``CacheCrops``); for raw images, the encode job's own preprocess, effnet and CLIP-bigG steps make the latent
in memory. ``Reconstruct`` then samples Stage B, decodes with Stage A and measures PSNR, SSIM and LPIPS at the
crop. The output folder gets ``images/``, ``report.json`` (every number) and ``report.html`` (grids,
histograms, a PSNR–SSIM plot, aggregates per shard, bucket and encoder version, and the worst k), in that
order. Rows that cannot be reconstructed are listed in the report with their reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import posixpath
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.core.commits import CommitStore, JobOutput
from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.progress import Progress
from pipelines.core.sources import SourceConfig, caption_text, list_shards, read_shard
from pipelines.core.step import Batch, Resources
from pipelines.encode.models import EncodeEffnet, EncoderConfig, EncodeText
from pipelines.encode.steps import PreprocessImages, PreprocessStepConfig
from pipelines.report.steps import (
    DIFF_PNG,
    METRICS,
    ORIGINAL_PNG,
    RECON_PNG,
    CacheCrops,
    Reconstruct,
    ReconstructConfig,
)
from schemas import FileMetadata
from schemas import columns as c

ENCODER_VERSION = "encoder_version"
REPORT_COLUMNS = (c.KEY, c.CAPTION, c.SOURCE_SHARD, c.BUCKET, ENCODER_VERSION, *METRICS, ORIGINAL_PNG, RECON_PNG,
                  DIFF_PNG, *c.REJECT_COLUMNS)  # fmt: skip
GROUPS = {"shard": c.SOURCE_SHARD, "bucket": c.BUCKET, "encoder_version": ENCODER_VERSION}
REPORT_UNIT = "report"  # the commit unit: the whole report


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """A reconstruction report.

    Attributes:
        output_dir: where ``report.html``, ``report.json`` and ``images/`` go (local or s3://).
        latents: a latent cache (the encode job's output). Its samples' original crops are re-read from the
            source shards the cache recorded, or from ``images`` when those shards moved.
        latents_format: ``parquet`` or ``webdataset``.
        images: raw image–text shards (``webdataset``, ``parquet`` or ``folder``) to encode in memory when
            ``latents`` is not set; with ``latents``, the folder that now holds the cache's source shards.
        num_samples: samples to reconstruct; seed: the sample's seed.
        worst_k: examples shown in the worst-k section (by LPIPS, or PSNR when LPIPS is skipped).
        preprocess, effnet, clip_text: raw images only: the crop and the encoders (as in ``cascade encode``;
            required there, like every model: name ``*/tiny`` flavors for a random-weight dry run).
        reconstruct: Stage B / Stage A flavors and weights, sampler settings and the LPIPS backbone.
        endpoint_url: S3 endpoint of ``latents``; output_endpoint_url: of ``output_dir``.
        on_stale: a report made with other settings or from another cache: ``redo`` (default) or ``refuse``.
        crop_resources, encode_resources, reconstruct_resources: Ray resources of the crop/preprocess tasks,
            the raw-image encoder actors and the Stage B + A actor pool (``num_gpus`` on GPU nodes).
    """

    output_dir: str
    latents: str | None = None
    latents_format: str = "parquet"
    images: SourceConfig | None = None
    num_samples: int = 16
    seed: int = 0
    worst_k: int = 8
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    effnet: EncoderConfig | None = None
    clip_text: EncoderConfig | None = None
    reconstruct: ReconstructConfig
    endpoint_url: str | None = None
    output_endpoint_url: str | None = None
    on_stale: str = "redo"
    crop_resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.25, batch_size=4))
    encode_resources: Resources = field(default_factory=lambda: Resources(num_cpus=0.25, batch_size=4))
    reconstruct_resources: Resources = field(default_factory=lambda: Resources(num_cpus=1, batch_size=4))

    def __post_init__(self) -> None:
        if self.latents is None and self.images is None:
            raise ValueError("set latents (a latent cache) or images (raw image–text shards)")
        if self.latents is not None and self.images is not None and self.images.kind != "webdataset":
            raise ValueError(f"images.kind={self.images.kind!r}: a cache's source shards are WebDataset tars")
        if self.latents_format not in ("parquet", "webdataset"):
            raise ValueError(f"latents_format={self.latents_format!r}; allowed: parquet, webdataset")
        if self.num_samples < 1 or self.worst_k < 0:
            raise ValueError(f"num_samples={self.num_samples} must be >= 1 and worst_k={self.worst_k} >= 0")
        if self.latents is None and (self.effnet is None or self.clip_text is None):
            raise ValueError("effnet and clip_text are required for raw images (they encode them in memory)")
        for role, encoder in (("effnet", self.effnet), ("clip_text", self.clip_text)):
            if encoder is not None and not encoder.flavor.startswith(role):
                raise ValueError(f"{role}.flavor={encoder.flavor!r} is not a {role} flavor")

    def input_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.endpoint_url} if self.endpoint_url else {}

    def output_options(self) -> dict[str, Any]:
        return {"endpoint_url": self.output_endpoint_url} if self.output_endpoint_url else {}


@dataclass(frozen=True)
class ReportSummary:
    output_dir: str
    html: str
    json: str
    n_samples: int
    n_rejected: int
    psnr_mean: float | None
    ssim_mean: float | None
    lpips_mean: float | None
    lpips_skipped: str | None
    random_weights: bool


def _version(flavor: str, sha256: str | None) -> str:
    return f"{flavor}@{(sha256 or 'random')[:12]}"


def _share(wanted: int, taken: int, sources_left: int) -> int:
    """Rows to take from the next source: the rest spread evenly over the sources left (small ones give less,
    later ones make up for it)."""
    return max(0, math.ceil((wanted - taken) / max(sources_left, 1)))


def sample_cache(config: ReportConfig) -> list[dict[str, Any]]:
    """Seeded rows of a latent cache: key, caption, source shard, bucket, encoder version, effnet, pooled text.

    The files and their rows come from the cache's manifest (footers only for a cache without per-file rows);
    the driver picks files in a seeded order and rows in each, then Ray tasks read the picked rows.
    """
    import ray

    from pipelines.core.latents_reader import committed_records, file_info, list_latent_files

    options = config.input_options()
    rows_of = _rows_per_file(committed_records(config.latents, options) or {}, config)
    files = list_latent_files(config.latents, config.latents_format, options)
    rng = np.random.default_rng(config.seed)
    picks: list[tuple[str, list[int]]] = []
    taken = 0
    for position, index in enumerate(rng.permutation(len(files))):
        uri = files[index]
        n = rows_of.get(uri)
        if n is None:
            n = file_info(uri, config.latents_format, storage_options=options)[1]
        picked = sorted(
            int(r) for r in rng.permutation(n)[: _share(config.num_samples, taken, len(files) - position)]
        )
        picks.append((uri, picked))
        taken += len(picked)
        if taken >= config.num_samples:
            break
    task = ray.remote(num_cpus=config.crop_resources.num_cpus)(_read_cache_rows)
    rows = [
        row for found in ray.get([task.remote(config, uri, picked) for uri, picked in picks]) for row in found
    ]
    return rows[: config.num_samples]


def _rows_per_file(records: dict[str, Any], config: ReportConfig) -> dict[str, int]:
    base = config.latents.rstrip("/")
    return {f"{base}/{f['path']}": int(f["rows"]) for r in records.values() for f in r.get("files", ())
            if isinstance(f, dict) and "rows" in f}  # fmt: skip


def _read_cache_rows(config: ReportConfig, uri: str, picked: list[int]) -> list[dict[str, Any]]:
    """Task body: the picked rows of one cache file."""
    from pipelines.core.latents_reader import read_latent_table, table_to_batch

    wanted = [c.KEY, c.CAPTION, c.SOURCE_SHARD, c.BUCKET, c.EFFNET, c.CLIP_TEXT_POOLED]
    table = read_latent_table(
        uri, config.latents_format, storage_options=config.input_options(), columns=wanted
    )
    meta = FileMetadata.from_arrow(table.schema.metadata)  # one read per file: the table carries it
    version = _version(meta.encoder_flavors.get("effnet", "?"), meta.weights_sha256.get("effnet"))
    batch = table_to_batch(table, float32=True)
    return [{k: batch[k][r] for k in wanted} | {ENCODER_VERSION: version} for r in picked]


def sample_images(config: ReportConfig) -> list[dict[str, Any]]:
    """Seeded rows of raw image–text shards: key, caption, image bytes, shard.

    Shards are taken in a seeded order, in waves of at most one shard per missing sample; a Ray task per
    shard keeps a seeded reservoir of its share (the driver never reads a shard).
    """
    import ray

    from pipelines.encode.writer import weights_fingerprint

    shards = list_shards(config.images)
    if not shards:
        raise FileNotFoundError(f"images.path={config.images.path!r}: no shards found")
    version = _version(
        config.effnet.flavor, weights_fingerprint(config.effnet) if config.effnet.weights else None
    )
    order = [int(i) for i in np.random.default_rng(config.seed).permutation(len(shards))]
    task = ray.remote(num_cpus=config.crop_resources.num_cpus)(_reservoir)
    rows: list[dict[str, Any]] = []
    position = 0
    while len(rows) < config.num_samples and position < len(order):
        wave = order[position : position + config.num_samples - len(rows)]
        share = math.ceil((config.num_samples - len(rows)) / len(wave))
        found = ray.get([task.remote(config.images, shards[i], share, [config.seed, i]) for i in wave])
        for i, kept in zip(wave, found, strict=True):
            shard = shards[i]
            name = (
                shard["uris"][0]
                if config.images.kind != "folder"
                else f"folder shard {shard['shard_index']:05d}"
            )
            rows += [r | {c.SOURCE_SHARD: name, ENCODER_VERSION: version} for r in kept]
        position += len(wave)
    return rows[: config.num_samples]


def _reservoir(
    source: SourceConfig, shard: dict[str, Any], size: int, seed: list[int]
) -> list[dict[str, Any]]:
    """Task body: a seeded uniform sample of ``size`` rows of one shard, in one pass."""
    rng = np.random.default_rng(seed)
    kept: list[dict[str, Any]] = []
    for seen, row in enumerate(_rows(read_shard(source, shard))):
        if seen < size:
            kept.append(row)
        elif (slot := int(rng.integers(seen + 1))) < size:
            kept[slot] = row
    return kept


def _rows(batches: Iterator[Batch]) -> Iterator[dict[str, Any]]:
    for batch in batches:
        for i in range(len(batch[c.KEY])):
            yield {
                k: batch[k][i] for k in (c.KEY, c.SOURCE, c.CAPTION, c.IMAGE, c.META_JSON, *c.REJECT_COLUMNS)
            }


def report_plan(config: ReportConfig, source_columns: Sequence[str]) -> Plan:
    """Cache: crops → reconstruct. Raw images: the encode job's preprocess → effnet → CLIP text → reconstruct."""
    if config.latents is not None:
        from pipelines.train_data.crops import crop_spec

        spec = crop_spec(config.latents, config.images, config.input_options())
        steps = [PlannedStep(CacheCrops, spec, config.crop_resources)]
    else:
        steps = [
            PlannedStep(
                PreprocessImages, PreprocessStepConfig(preprocess=config.preprocess), config.encode_resources
            ),
            PlannedStep(EncodeEffnet, config.effnet, config.encode_resources),
            PlannedStep(EncodeText, config.clip_text, config.encode_resources),
        ]
    steps.append(PlannedStep(Reconstruct, config.reconstruct, config.reconstruct_resources))
    return Plan(tuple(source_columns), steps)


def run_report(config: ReportConfig) -> ReportSummary:
    """Sample, reconstruct on Ray, aggregate, and write ``images/``, ``report.json`` and ``report.html``.

    The report is one unit of the commit mechanism (``pipelines.core.commits``): its files are staged, then
    moved into place (images first, the page last) with a commit record and ``manifest.json``. A rerun with
    the same settings and cache finds it committed and returns its summary; other settings redo it.
    """
    import ray

    store = CommitStore(config.output_dir, config.output_options())
    output = JobOutput(store, report_fingerprint(config), config.on_stale)
    if not output.start([REPORT_UNIT]):
        output.finish({}, [REPORT_UNIT], schema="report@1")
        return ReportSummary(**output.records[REPORT_UNIT]["summary"])
    rows = sample_cache(config) if config.latents is not None else sample_images(config)
    if not rows:
        raise FileNotFoundError(f"no samples found in {config.latents or config.images.path!r}")
    plan = report_plan(config, list(rows[0]))
    ds = plan.apply(ray.data.from_items(rows, override_num_blocks=min(len(rows), 64)))
    keep = [name for name in REPORT_COLUMNS if name in plan.check()]
    results = []
    with Progress("report", len(rows), unit="samples", rate_of="") as progress:
        for batch in ds.select_columns(keep).iter_batches(batch_format="numpy", batch_size=None):
            done = list(_batch_rows(batch))
            results += done
            progress.update(len(done))
    results.sort(key=lambda r: (r[c.SOURCE_SHARD], r[c.KEY]))
    report = build_report(config, results)
    out = config.output_dir.rstrip("/")
    overall = report["overall"]
    summary = ReportSummary(
        output_dir=config.output_dir, html=f"{out}/report.html", json=f"{out}/report.json",
        n_samples=overall["n"], n_rejected=len(report["rejects"]), psnr_mean=overall["psnr_mean"],
        ssim_mean=overall["ssim_mean"], lpips_mean=overall["lpips_mean"],
        lpips_skipped=report["metrics"]["lpips_skipped"], random_weights=report["random_weights"],
    )  # fmt: skip
    files = _stage(store, report, results)
    record = store.commit(REPORT_UNIT, {"shard_id": REPORT_UNIT, "files": files, "summary": dataclasses.asdict(summary),
                                        "n_samples": summary.n_samples, "n_rejected": summary.n_rejected})  # fmt: skip
    output.finish({REPORT_UNIT: record}, [REPORT_UNIT], schema="report@1")
    return summary


def report_fingerprint(config: ReportConfig) -> dict[str, Any]:
    """The settings that make the report, and the encoders of the cache it samples."""
    settings = {k: v for k, v in dataclasses.asdict(config).items()
                if k not in ("output_dir", "output_endpoint_url", "on_stale") and not k.endswith("_resources")}  # fmt: skip
    cache = {}
    if config.latents is not None:
        manifest = CommitStore(config.latents, config.input_options()).read_json("manifest.json") or {}
        cache = {
            k: manifest.get(k) for k in ("encoder_flavors", "weights_sha256", "preprocessing_hash", "totals")
        }
    return {"settings": settings, "cache": cache}


def _batch_rows(batch: Batch) -> Iterator[dict[str, Any]]:
    for i in range(len(batch[c.KEY])):
        row = {}
        for name, values in batch.items():
            value = values[i]
            row[name] = value.item() if isinstance(value, np.generic) else value
        yield row


def _stats(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n": len(rows)}
    for m in METRICS:
        values = np.asarray([np.nan if r[m] is None else r[m] for r in rows], np.float64)
        values = values[np.isfinite(values)]
        out[f"{m}_mean"] = float(values.mean()) if values.size else None
        out[f"{m}_median"] = float(np.median(values)) if values.size else None
        out[f"{m}_min"] = float(values.min()) if values.size else None
        out[f"{m}_max"] = float(values.max()) if values.size else None
    return out


def _worst(rows: list[dict[str, Any]], k: int, lpips_on: bool) -> list[int]:
    """Indices of the k worst rows: highest LPIPS, or lowest PSNR when LPIPS is skipped."""
    order = sorted(range(len(rows)), key=lambda i: -rows[i]["lpips"] if lpips_on else rows[i]["psnr"])
    return order[:k]


def _models(config: ReportConfig) -> dict[str, str]:
    encoders = {"stage_b": config.reconstruct.stage_b, "stage_a": config.reconstruct.stage_a}
    if config.latents is None:
        encoders |= {"effnet": config.effnet, "clip_text": config.clip_text}
    return {role: e.flavor + (f" ({e.weights})" if e.weights else " (seeded random weights)")
            for role, e in encoders.items()}  # fmt: skip


def build_report(config: ReportConfig, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Every number of the report (``report.json``); image paths are relative to the output folder."""
    from stages.image_metrics import PSNR_CAP_DB

    good = [r for r in results if not r[c.REJECT_REASON]]
    rejected = [r for r in results if r[c.REJECT_REASON]]
    lpips = config.reconstruct.lpips
    samples = []
    for index, r in enumerate(good):
        images = {
            kind: f"images/{index:05d}_{kind}.png" for kind in ("original", "reconstruction", "difference")
        }
        samples.append({"key": r[c.KEY], "caption": caption_text(r[c.CAPTION]), "shard": posixpath.basename(str(r[c.SOURCE_SHARD])),
                        "bucket": r[c.BUCKET], "encoder_version": r[ENCODER_VERSION], "images": images}
                       | {m: (None if math.isnan(r[m]) else float(r[m])) for m in METRICS})  # fmt: skip
    groups = {}
    for name in GROUPS:
        members: dict[str, list] = defaultdict(list)
        for s in samples:
            members[s[name]].append(s)
        groups[name] = {k: _stats(v) for k, v in sorted(members.items())}
    lpips_on = lpips.skipped_reason() is None
    versions = sorted({s["encoder_version"] for s in samples})
    models = _models(config)
    return {
        "schema": "report@1",
        "source": {"latents": config.latents, "images": config.images.path if config.images else None,
                   "num_samples": config.num_samples, "seed": config.seed},
        "models": models,
        "random_weights": any("random" in v or "/tiny@" in v for v in [*models.values(), *versions]),
        "sampler": {"stage_b_timesteps": config.reconstruct.timesteps, "cfg": config.reconstruct.cfg,
                    "shift": config.reconstruct.shift, "seed": config.reconstruct.seed},
        "metrics": {"psnr": f"PSNR (dB, data range 1, capped at {PSNR_CAP_DB:g})", "ssim": "SSIM (gaussian 11, σ 1.5)",
                    "lpips": lpips.name, "lpips_skipped": lpips.skipped_reason(),
                    "compared_at": "the crop effnet saw; the Stage A decode (4/3 of it) resized with antialias"},
        "overall": _stats(samples),
        "by_shard": groups["shard"], "by_bucket": groups["bucket"], "by_encoder_version": groups["encoder_version"],
        "worst_by": "lpips" if lpips_on else "psnr",
        "worst": _worst(samples, config.worst_k, lpips_on),
        "samples": samples,
        "rejects": [{"key": r[c.KEY], "shard": str(r[c.SOURCE_SHARD]), "step": r[c.REJECT_STEP],
                     "reason": r[c.REJECT_REASON], "detail": r[c.REJECT_DETAIL]} for r in rejected],
    }  # fmt: skip


def _stage(store: CommitStore, report: dict[str, Any], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage the images, ``report.json`` and ``report.html``; returns them in commit order (the page last, so a
    page never points at missing images)."""
    from pipelines.report.html import render_html

    staged: dict[str, bytes] = {}
    good = [r for r in results if not r[c.REJECT_REASON]]
    for sample, row in zip(report["samples"], good, strict=True):
        for kind, column in (
            ("original", ORIGINAL_PNG),
            ("reconstruction", RECON_PNG),
            ("difference", DIFF_PNG),
        ):
            staged[sample["images"][kind]] = bytes(row[column])
    staged["report.json"] = json.dumps(report, indent=2).encode()
    staged["report.html"] = render_html(report).encode()
    for path, data in staged.items():
        store.stage(REPORT_UNIT, path, data)
    return [{"path": path} for path in staged]
