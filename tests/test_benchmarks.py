"""The benchmark helpers' arithmetic (the benchmarks themselves run outside the test suite)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _part(path: Path, rows: int, mtime: float) -> Path:
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(rows)]}), path)
    os.utime(path, (mtime, mtime))
    return path


def test_steady_rate_counts_rows_after_the_first_part_over_the_first_to_last_span(tmp_path):
    steady = _module("steady")
    parts = [_part(tmp_path / "c.parquet", 4, 1030.0), _part(tmp_path / "a.parquet", 2, 1000.0),
             _part(tmp_path / "b.parquet", 2, 1010.0)]  # fmt: skip
    rate = steady.steady_rate(parts)
    # the first part (2 rows at t=1000) is the pipeline fill; 2 + 4 rows follow in 30 s
    assert rate["rows_per_s"] == pytest.approx(6 / 30)
    assert (rate["parts"], rate["rows"], rate["first_to_last_part_s"]) == (3, 8, pytest.approx(30.0))
    with pytest.raises(ValueError, match="at least 3"):
        steady.steady_rate(parts[:2])


def test_run_all_rows_put_each_ratio_beside_its_goal_and_name_a_failed_benchmark():
    run_all = _module("run_all")
    results = {
        "encode": {"ratio_pipeline_over_bare_all_cores": 0.9, "ratio_pipeline_over_bare": 1.8, "sizes": "mixed",
                   "pipeline_run": {"parts": 6}, "bytes": {"ratio": 0.7, "ratio_as_written": 0.8,
                                                           "rows_per_part_as_written": 2.0}},
        "score": {"error": "timed out after 180 s", "wall_s": 180.0},
        "read": {"ratio_cache_parquet_over_raw": 0.4},
    }  # fmt: skip
    rows = {r["ratio"]: r for r in run_all.ratio_rows(results)}
    assert rows["encode / bare model forward (all cores)"]["met"] is True
    assert "steady rate over 6 parts" in rows["encode / bare model forward (all cores)"]["note"]
    score = rows["score / bare model forward"]
    assert score["value"] is None and score["met"] is None
    assert rows["cached read rate / raw pyarrow read"]["met"] is False
    assert rows["bytes on disk per sample / raw tensor bytes"]["met"] is True
    assert rows["score benchmark"]["note"] == "timed out after 180 s"
    table = run_all.markdown(list(rows.values()), results)
    assert "| cached read rate / raw pyarrow read | 0.4 | ≥ 0.5 | **no** |" in table


def test_scale_ratios_compare_the_largest_size_with_the_smallest_and_flag_their_goals():
    scale, run_all = _module("scale"), _module("run_all")
    sizes = [
        {"n_shards": 100, "driver_s": {"filter": 2.0}, "driver_s_per_shard": {"filter": 0.02},
         "join_s_per_shard": 0.002, "driver_peak_rss_mib": 900.0},
        {"error": "exit 1"},  # a size that failed is left out
        {"n_shards": 1000, "driver_s": {"filter": 30.0}, "driver_s_per_shard": {"filter": 0.03},
         "join_s_per_shard": 0.002, "driver_peak_rss_mib": 1000.0},
        {"n_shards": 10000, "driver_s": {"filter": 400.0}, "driver_s_per_shard": {"filter": 0.04},
         "join_s_per_shard": 0.0021, "driver_peak_rss_mib": 1200.0},
    ]  # fmt: skip
    e2e = [{"n_samples": 1000, "s_per_sample": 0.1}, {"n_samples": 10000, "s_per_sample": 0.11}]
    ratios = scale.summarize(sizes, e2e)
    assert ratios["driver_per_shard_largest_over_smallest"] == {"filter": pytest.approx(2.0)}
    # one more shard: (400 - 30) / 9000 s at 10⁴ over (30 - 2) / 900 s at 10²–10³ (start-up cancels)
    assert ratios["driver_marginal_per_shard_largest_over_smallest"] == {
        "filter": pytest.approx(370 / 9000 / (28 / 900))
    }
    assert ratios["join_per_shard_largest_over_smallest"] == pytest.approx(1.05)
    assert ratios["e2e_s_per_sample_largest_over_smallest"] == pytest.approx(1.1)
    rows = {r["ratio"]: r for r in run_all.scale_rows({"ratios": ratios, "e2e": e2e})}
    assert rows["driver time per shard, 10000 / 100 shards (filter)"]["met"] is False  # 2.0 > 1.5
    marginal = rows["one more shard's driver time, at 10000 / at 100 shards (filter)"]
    assert marginal["value"] == pytest.approx(1.3214, rel=1e-4) and marginal["met"] is None
    assert rows["join per shard, 10000 / 100 shards"]["met"] is True
    assert rows["driver peak RSS at 10000 shards (MiB)"]["met"] is True
    assert rows["end to end per sample, largest / smallest run"]["met"] is True
