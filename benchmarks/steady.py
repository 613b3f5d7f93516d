"""Steady-state throughput of a streaming job from the files it wrote, and a stable bare-forward timer.

A Ray Data job's wall time mixes actor start-up, model loading and pipeline fill with the rate it sustains.
Every part a job writes is renamed into place when complete, so its modification time is the moment that part
left the pipeline. Rows written after the first part, over the time between the first and the last part, is
the rate the pipeline sustains once full: start-up and fill cancel without a second run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def steady_rate(files: Iterable[Path]) -> dict[str, float]:
    """Rows per second between the first and the last Parquet part written (needs at least three parts)."""
    import pyarrow.parquet as pq

    stamps = sorted((f.stat().st_mtime, pq.ParquetFile(f).metadata.num_rows) for f in files)
    if len(stamps) < 3:
        raise ValueError(f"{len(stamps)} parts written; a steady rate needs at least 3 (use more images)")
    span = stamps[-1][0] - stamps[0][0]
    rows_after_first = sum(n for _, n in stamps[1:])
    return {
        "rows_per_s": rows_after_first / span,
        "parts": len(stamps),
        "rows": sum(n for _, n in stamps),
        "first_to_last_part_s": span,
    }


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of ``fn`` over ``reps`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
