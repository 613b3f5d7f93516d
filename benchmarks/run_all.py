"""Every benchmark, quickly, one after the other: one JSON file and a markdown table of ratios beside their goals.

    python benchmarks/run_all.py [--out benchmarks/results/all] [--only encode score train train_b read]

Runs, each in its own process with its own timeout (7 to 9 minutes in all on 2 CPU cores, plus ``train_b``:
12 minutes at load 6, its full default 5.5 minutes on a quiet machine):

* ``encode.py --sizes mixed``: the encode pipeline against the bare model forwards (released-size effnet and
  CLIP-L, tiny CLIP-bigG text), and bytes on disk per sample against the raw tensor bytes;
* ``score.py --flavor clip_score/l14``: the score pipeline against the bare scorer forward;
* ``train.py --quick``: the training step on the cache against the same step on in-memory tensors and against
  the on-the-fly step, per Stage C flavor (tiny, 1B-shaped), and the Ray Train data-wait fraction;
* ``train_b.py --quick``: the same for Stage B (tiny, 700M-shaped at 128/256 px crops; the official crop is 1024):
  the step on the cache (read included) against in-memory tensors and the on-the-fly step (Stage A, effnet,
  CLIP-bigG text), and the FLOP projection of the on-the-fly cost for ``stage_b/700m`` and ``stage_b/1.5b``;
* ``read.py``: the cache readers against a raw pyarrow read of the same files;
* ``scale.py --quick``: per-shard driver and join costs at 100 and 1000 shards, end to end per sample at two
  sizes (the full sizes, 10² → 10⁴ shards and 10³ → 10⁴ samples, run on their own: ``python benchmarks/scale.py``);
* ``dedup.py --sizes 10000 100000``: ``cascade dedup`` time, memory and recall on synthetic 768-d embeddings
  (the full sizes, 10⁵ and 10⁶, run on their own: ``python benchmarks/dedup.py``);
* ``app.py``: the app's Explore tab over a synthetic 10⁶-row scores set, first render and slider update, in
  process and in Chromium.

Writes ``{out}.json`` (every benchmark's full result, the settings and the ratio rows) and ``{out}.md`` (the
table). A benchmark that fails or times out shows as such in its rows; the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# name → (arguments, timeout seconds)
BENCHMARKS: dict[str, tuple[list[str], int]] = {
    "encode": (["encode.py", "--sizes", "mixed", "--images", "12", "--batch", "2"], 240),
    "score": (["score.py", "--flavor", "clip_score/l14", "--images", "16", "--batch", "4"], 180),
    "train": (["train.py", "--quick"], 420),
    "train_b": (["train_b.py", "--quick"], 900),
    "read": (["read.py", "--rows", "1024", "--files", "8"], 120),
    "scale": (["scale.py", "--quick"], 900),
    "dedup": (["dedup.py", "--sizes", "10000", "100000"], 600),
    "app": (["app.py", "--rows", "1000000", "--shards", "1000"], 600),
}


def run_one(name: str, out_dir: Path) -> dict[str, Any]:
    """Run one benchmark script; its JSON result, or ``{"error": ...}``."""
    args, timeout = BENCHMARKS[name]
    out = out_dir / f"{name}.json"
    command = [sys.executable, str(HERE / args[0]), *args[1:], "--out", str(out)]
    marker = f"CASCADE_BENCH_RUN={name}-{os.getpid()}"
    env = os.environ | {
        "PYTHONPATH": str(HERE.parent),
        "RAY_ADDRESS": "",
        "CASCADE_BENCH_RUN": marker.split("=")[1],
    }
    log = out_dir / f"{name}.log"
    start = time.monotonic()
    # Own session, output to a file: on a timeout the whole group goes (its local Ray included), and no
    # grandchild holds a pipe open.
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=HERE.parent, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kill_marked(marker)  # its Ray processes run in sessions of their own
            return {"error": f"timed out after {timeout} s", "wall_s": time.monotonic() - start}
    wall = time.monotonic() - start
    if code != 0 or not out.exists():
        return {"error": f"exit {code}: {log.read_text()[-1500:]}", "wall_s": wall}
    return json.loads(out.read_text()) | {"wall_s": wall}


def kill_marked(marker: str) -> None:
    """SIGKILL every process whose environment holds ``marker``."""
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


def _get(result: dict, *path: str) -> Any:
    for part in path:
        if not isinstance(result, dict) or part not in result:
            return None
        result = result[part]
    return result


def _row(ratio: str, value: Any, goal: str, check: Callable[[float], bool] | None, note: str = "") -> dict:
    met = None if value is None or check is None else bool(check(value))
    return {"ratio": ratio, "value": value, "goal": goal, "met": met, "note": note}


def ratio_rows(results: dict[str, dict]) -> list[dict]:
    """The issue's table, one row per ratio (per flavor where it asks), from the benchmarks' results."""
    enc, score, train, read = (results.get(k, {}) for k in ("encode", "score", "train", "read"))
    rows = [
        _row("encode / bare model forward (all cores)", enc.get("ratio_pipeline_over_bare_all_cores"), "≥ 0.85",
             lambda v: v >= 0.85, f"one-thread bare: {_fmt(enc.get('ratio_pipeline_over_bare'))}; sizes "
             f"{enc.get('sizes')}; steady rate over {_get(enc, 'pipeline_run', 'parts')} parts"),
        _row("score / bare model forward", score.get("ratio_pipeline_over_bare"), "≥ 0.85", lambda v: v >= 0.85,
             f"{score.get('flavor', '')}; steady rate over {_get(score, 'pipeline_run', 'parts')} parts"),
    ]  # fmt: skip
    for flavor, r in (_get(train, "results") or {}).items():
        cached, with_read = r.get("cached_step_s"), r.get("cached_step_with_read_s")
        rows.append(_row(f"training step on cache / in-memory tensors ({flavor})",
                         with_read / cached if cached and with_read else None, "≤ 1.05", lambda v: v <= 1.05,
                         f"{_fmt(with_read)} s vs {_fmt(cached)} s"))  # fmt: skip
        rows.append(_row(f"training on the fly / on cache ({flavor})", r.get("speedup_on_the_fly_over_cached"),
                         "report", None,
                         f"removes {_fmt(r.get('encoder_cpu_s_per_sample'))} CPU-s and "
                         f"{_fmt(r.get('encoder_peak_mib'))} MiB of encoders per sample (peak, batch)"))  # fmt: skip
        rows.append(_row(f"data-wait fraction ({flavor})", _get(r, "ray_train", "data_wait_fraction"), "≤ 5%",
                         lambda v: v <= 0.05, f"max row {_fmt(_get(r, 'ray_train', 'data_wait_fraction_max'))}"))  # fmt: skip
    rows += train_b_rows(results.get("train_b", {}))
    rows.append(_row("cached read rate / raw pyarrow read", read.get("ratio_cache_parquet_over_raw"), "≥ 0.5",
                     lambda v: v >= 0.5, f"WebDataset {_fmt(read.get('ratio_cache_webdataset_over_raw'))}; "
                     f"training batches {_fmt(read.get('ratio_training_batches_over_raw'))}"))  # fmt: skip
    rows.append(_row("bytes on disk per sample / raw tensor bytes", _get(enc, "bytes", "ratio"), "≤ 1.05",
                     lambda v: v <= 1.05, f"real encodes in one part; as written in {_fmt(_get(enc, 'bytes', 'rows_per_part_as_written'))}-row "
                     f"parts: {_fmt(_get(enc, 'bytes', 'ratio_as_written'))}; random fp16 tensors: {_fmt(read.get('ratio_bytes_over_raw'))}"))  # fmt: skip
    rows += scale_rows(results.get("scale", {}))
    rows += dedup_rows(results.get("dedup", {}))
    app = results.get("app", {})
    shown = app.get("browser") if "first_render_s" in (app.get("browser") or {}) else app.get("in_process") or {}
    rows.append(_row("app Explore first render at 10⁶ rows (s)", shown.get("first_render_s"), "≤ 3",
                     lambda v: v <= 3, f"in process {_fmt(_get(app, 'in_process', 'first_render_s'))} s"))
    rows.append(_row("app Explore slider update at 10⁶ rows (s)", shown.get("slider_update_s"), "≤ 1",
                     lambda v: v <= 1, f"in process {_fmt(_get(app, 'in_process', 'slider_update_s'))} s"))  # fmt: skip
    for name, result in results.items():
        if "error" in result:
            rows.append(_row(f"{name} benchmark", None, "runs", None, result["error"].splitlines()[0][:200]))
    return rows


def train_b_rows(train_b: dict) -> list[dict]:
    """Stage B: the step on the cache against in-memory tensors and on the fly, per flavor; the FLOP projection."""
    rows = []
    for flavor, r in (_get(train_b, "results") or {}).items():
        rows.append(_row(f"Stage B step on cache / in-memory tensors ({flavor})", r.get("ratio_on_cache_over_in_memory"),
                         "≤ 1.05", lambda v: v <= 1.05,
                         f"{_fmt(r.get('on_cache_step_with_read_s'))} s vs {_fmt(r.get('in_memory_step_s'))} s at "
                         f"{r.get('stage_a_size_px')} px; read {_fmt(r.get('cache_read_s_per_step'))} s/step"))  # fmt: skip
        rows.append(_row(f"Stage B on the fly / on cache ({flavor})", r.get("speedup_on_the_fly_over_on_cache"),
                         "report", None,
                         f"removes {_fmt(r.get('encoder_cpu_s_per_sample'))} CPU-s and "
                         f"{_fmt(r.get('encoder_peak_mib'))} MiB of encoders per sample (peak, batch)"))  # fmt: skip
    for flavor, p in (_get(train_b, "flop_projection") or {}).items():
        if flavor.startswith("stage_b/") and not flavor.endswith(("tiny", "narrow")):
            rows.append(_row(f"Stage B on the fly / on cache by FLOPs ({flavor}, {p.get('side_px')} px)",
                             p.get("speedup"), "report", None,
                             f"encoders {_fmt(p.get('encoder_gflop_per_sample'))} GFLOP/sample vs Stage B "
                             f"{_fmt(p.get('stage_b_gflop_per_sample_fwd_bwd'))} (fwd+bwd)"))  # fmt: skip
    return rows


def dedup_rows(dedup: dict) -> list[dict]:
    """How semantic dedup's time grows with rows, its memory, and its recall against all-pairs search."""
    sizes = dedup.get("sizes") or []
    if not sizes:
        return []
    small, large = sizes[0], sizes[-1]
    ratio, rows_ratio = dedup.get("time_ratio"), dedup.get("rows_ratio") or 10
    return [
        _row(f"dedup time, {large['rows']:,} / {small['rows']:,} rows", ratio, f"≤ {1.2 * rows_ratio:g}",
             lambda v: v <= 1.2 * rows_ratio, f"{small['seconds']} s → {large['seconds']} s (the full 10⁶ run: "
             "python benchmarks/dedup.py)"),
        _row(f"dedup peak memory at {large['rows']:,} rows (GiB)", large.get("peak_pss_gib"), "≤ 8",
             lambda v: v <= 8, "PSS of the driver and every Ray process"),
        _row("dedup ε-pair recall / all-pairs search (2·10⁴ rows)", _get(dedup, "ground_truth", "eps_pair_recall"),
             "≥ 0.98", lambda v: v >= 0.98, f"planted near-copies recalled: {large.get('planted_pair_recall')}"),
    ]  # fmt: skip


def scale_rows(scale: dict) -> list[dict]:
    """How cost grows from the smallest to the largest size of ``scale.py``."""
    ratios = scale.get("ratios") or {}
    sizes = ratios.get("sizes") or ["?", "?"]
    rows = [
        _row(f"driver time per shard, {sizes[1]} / {sizes[0]} shards ({job})", value, "≤ 1.5", lambda v: v <= 1.5,
             "planning and committing" if job.startswith("encode") else "whole job" if job in ("filter", "export")
             else "cache opened from its manifest")
        for job, value in (ratios.get("driver_per_shard_largest_over_smallest") or {}).items()
    ]  # fmt: skip
    rows += [
        _row(f"one more shard's driver time, at {sizes[1]} / at {sizes[0]} shards ({job})", value, "report", None,
             "(t(N) − t(N')) / (N − N') between the two largest sizes over the two smallest: start-up excluded")
        for job, value in (ratios.get("driver_marginal_per_shard_largest_over_smallest") or {}).items()
    ]  # fmt: skip
    rows.append(_row(f"join per shard, {sizes[1]} / {sizes[0]} shards", ratios.get("join_per_shard_largest_over_smallest"),
                     "≤ 1.5", lambda v: v <= 1.5, "kept keys + stored CLIP-L embeddings, opened by name"))  # fmt: skip
    rows.append(_row(f"driver peak RSS at {sizes[1]} shards (MiB)", ratios.get("driver_peak_rss_mib_largest"),
                     "≤ 2048", lambda v: v <= 2048, "the driver process, Ray client included"))  # fmt: skip
    e2e = [e for e in scale.get("e2e", []) if "error" not in e]
    note = " → ".join(f"{e['n_samples']} samples {e['s_per_sample']:.3g} s" for e in e2e)
    rows.append(_row("end to end per sample, largest / smallest run", ratios.get("e2e_s_per_sample_largest_over_smallest"),
                     "≤ 1.2", lambda v: v <= 1.2, f"ingest → score → filter → encode, tiny flavors; {note}"))  # fmt: skip
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict], results: dict[str, dict]) -> str:
    lines = ["| ratio | value | goal | met | note |", "|---|---|---|---|---|"]
    for r in rows:
        met = {True: "yes", False: "**no**", None: "–"}[r["met"]]
        lines.append(f"| {r['ratio']} | {_fmt(r['value'])} | {r['goal']} | {met} | {r['note']} |")
    walls = ", ".join(f"{k} {v.get('wall_s', 0):.0f} s" for k, v in results.items())
    return (
        "\n".join(lines)
        + f"\n\nWall time: {walls}; {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE / "results" / "all"), help="writes OUT.json and OUT.md")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), default=sorted(BENCHMARKS))
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cascade-bench-") as tmp:
        for name in args.only:
            print(f"running {name} …", flush=True)
            results[name] = run_one(name, Path(tmp))
            print(
                f"  {name}: {results[name].get('error', 'ok')} ({results[name]['wall_s']:.0f} s)", flush=True
            )
    rows = ratio_rows(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {name: BENCHMARKS[name][0] for name in args.only}
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "settings": settings, "results": results,
                                                    "cpu_count": os.cpu_count()}, indent=2))  # fmt: skip
    table = markdown(rows, results)
    out.with_suffix(".md").write_text("# Benchmark ratios\n\n" + table)
    print(table)


if __name__ == "__main__":
    main()
