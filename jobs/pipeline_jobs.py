"""Entry points of the data jobs (ingest, score, filter): config in, Ray started, pipeline run, summary out.

Each job validates its whole config before Ray starts, so a bad field fails in milliseconds with its name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipelines.filter import FilterConfig, run_filter
from pipelines.ingest import IngestConfig, run_ingest
from pipelines.score import ScoreConfig, run_score


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``RAY_ADDRESS``), or start a local Ray without the dashboard."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level="ERROR")
    else:
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")


@dataclass(frozen=True)
class Job:
    """A job: its config class, what it runs, and whether it needs Ray."""

    name: str
    config_cls: type
    run: Callable[[Any], Any]
    needs_ray: bool
    help: str


JOBS: dict[str, Job] = {
    "ingest": Job("ingest", IngestConfig, run_ingest, True,
                  "read WebDataset tars, Parquet or image folders into validated image–text shards"),
    "score": Job("score", ScoreConfig, run_score, True,
                 "CLIP aesthetic + image–text similarity + size scores per key, with the CLIP-L embedding"),
    "filter": Job("filter", FilterConfig, run_filter, False,
                  "apply declarative rules to stored scores; write kept keys and per-rule drop counts"),
}  # fmt: skip


def run_job(name: str, config: Any, address: str | None = None) -> dict[str, Any]:
    """Run a job whose config is already built and validated; returns its summary as a dict."""
    job = JOBS[name]
    if job.needs_ray:
        init_ray(address)
    summary = job.run(config)
    result = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
    json.dump(result, sys.stdout, indent=2, default=str)
    print()
    return result
