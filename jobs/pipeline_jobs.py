"""Entry points of the jobs: config in, checks, Ray started, pipeline run, summary out.

Each job validates its whole config and its paths (``jobs.preflight``) before Ray starts, so a bad field fails
in milliseconds with its name; a job that runs any random-weight model says so in its first line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jobs import console
from jobs.preflight import absolute_paths, preflight
from jobs.train import check_train, run_train
from jobs.train_config import TrainConfig
from pipelines.core.notice import notice
from pipelines.dedup.pipeline import DedupConfig, run_dedup
from pipelines.encode.pipeline import EncodeConfig, run_encode
from pipelines.export.pipeline import ExportConfig, run_export
from pipelines.filter.pipeline import FilterConfig, run_filter
from pipelines.ingest.existing import IngestConfig, run_ingest
from pipelines.ingest.urls import UrlIngestConfig, ingest_urls
from pipelines.report.pipeline import ReportConfig, run_report
from pipelines.score.pipeline import ScoreConfig, run_score


@dataclass(frozen=True, kw_only=True)
class IngestJobConfig:
    """``cascade ingest``: exactly one of ``existing`` (tars, Parquet, folders) or ``urls`` (img2dataset)."""

    existing: IngestConfig | None = None
    urls: UrlIngestConfig | None = None

    def __post_init__(self) -> None:
        if (self.existing is None) == (self.urls is None):
            raise ValueError(
                "set exactly one of existing (WebDataset/Parquet/folder data) or urls (a URL list)"
            )


def run_ingest_job(config: IngestJobConfig) -> Any:
    if config.urls is not None:
        result = ingest_urls(config.urls)
        return {"output_dir": result.output_dir, "n_input": result.n_input, "n_samples": result.n_success,
                "n_rejected": result.n_rejected, "reject_reasons": result.reject_reasons,
                "n_shards": result.n_shards, "failed_shards": list(result.failed_shards)}  # fmt: skip
    return run_ingest(config.existing)


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {"logging_level": "ERROR", "log_to_driver": console.log_to_driver()}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", include_dashboard=False, **quiet)
    console.quiet_ray()


@dataclass(frozen=True)
class Job:
    """A job: its config class, what it runs, and whether it needs Ray."""

    name: str
    config_cls: type
    run: Callable[[Any], Any]
    needs_ray: bool
    help: str
    fixed: tuple[str, ...] = ()  # overrides the job always applies (``mode=lora``)
    check: Callable[[Any], Any] | None = None  # runs before Ray starts; its result goes to ``run``


JOBS: dict[str, Job] = {
    "ingest": Job("ingest", IngestJobConfig, run_ingest_job, True,
                  "URL lists (img2dataset, SSRF-guarded) or WebDataset/Parquet/folders into image–text shards"),
    "score": Job("score", ScoreConfig, run_score, True,
                 "CLIP aesthetic + image–text similarity + size scores per key, with the CLIP-L embedding"),
    "dedup": Job("dedup", DedupConfig, run_dedup, True,
                 "exact (sha256), perceptual (pHash, LSH) and semantic (SemDeDup on CLIP-L) duplicates per key"),
    "filter": Job("filter", FilterConfig, run_filter, True,
                  "apply declarative rules to stored scores; write kept keys and per-rule drop counts"),
    "encode": Job("encode", EncodeConfig, run_encode, True,
                  "effnet/Stage A latents + CLIP-bigG text + CLIP-L image embeddings into Parquet/WebDataset, once"),
    "export": Job("export", ExportConfig, run_export, True,
                  "latents as Parquet for third-party models: one folder per bucket, tensors readable by "
                  "pyarrow, polars, duckdb and HF datasets"),
    "report": Job("report", ReportConfig, run_report, True,
                  "reconstruct a sample of a cache or of raw images through Stage B + A: PSNR/SSIM/LPIPS, JSON + HTML"),
    "train-c": Job("train-c", TrainConfig, run_train, True,
                   "train Stage C on cached latents with Ray Train (DDP/FSDP), checkpoints in the official layout",
                   ("mode=stage_c",), check_train),
    "train-lora": Job("train-lora", TrainConfig, run_train, True,
                      "train an official-format LoRA on a frozen Stage C from cached latents",
                      ("mode=lora",), check_train),
    "train-controlnet": Job("train-controlnet", TrainConfig, run_train, True,
                            "train a ControlNet (canny, inpainting, super-resolution) on a frozen Stage C",
                            ("mode=controlnet",), check_train),
    "train-b": Job("train-b", TrainConfig, run_train, True,
                   "train Stage B on cached Stage A latents and their effnet conditioning (official train_b)",
                   ("mode=stage_b",), check_train),
}  # fmt: skip


def run_job(name: str, config: Any, address: str | None = None) -> dict[str, Any]:
    """Run a job whose config is already built and validated; returns its summary as a dict."""
    job = JOBS[name]
    config = absolute_paths(config)
    preflight(config)
    warning = console.random_weights_line(config)
    if warning:
        notice(warning)
    checked = job.check(config) if job.check is not None else None  # once, before Ray; the run reuses it
    if job.needs_ray:
        init_ray(address)
    summary = job.run(config) if job.check is None else job.run(config, checked)
    result = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    return result
