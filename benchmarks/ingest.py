"""URL-list ingest throughput: ``ingest_urls`` on Ray against plain ``img2dataset.download``, same list, same box.

    python benchmarks/ingest.py --out benchmarks/results/ingest.json [--rows 200] [--copies 1] [--cpus 2] [--repeats 3]

Serves real photos (scikit-image samples) on 127.0.0.1 under the URL paths of the real LAION list
``tests/data/laion_urls_200.parquet``, then downloads that list with
(a) ``ingest_urls`` with ``distributor="ray"`` (SSRF guard, img2dataset's downloader in one Ray task per shard
with every hop checked, pinned and capped by ``pipelines.ingest.fetch``, and the reject table),
(b) ``ingest_urls`` with ``distributor="multiprocessing"``, and
(c) plain ``img2dataset.download`` (multiprocessing), with identical shard size, threads and resize policy
(originals kept). Samples/s = successful samples / wall time of the call; Ray start-up is timed apart.
``--copies N`` repeats the list N times (same paths) to see steady-state rates past the fixed start-up costs
(img2dataset spawns a logger process and, with multiprocessing, fresh worker processes on every call).
The local server keeps the network out of it: this measures per-call and per-shard overheads, not bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

LAION = REPO / "tests" / "data" / "laion_urls_200.parquet"


def _plain_img2dataset(list_path: Path, out: Path, args) -> int:
    import img2dataset

    img2dataset.download(
        url_list=str(list_path),
        input_format="parquet",
        url_col="URL",
        caption_col="TEXT",
        output_folder=str(out),
        output_format="webdataset",
        resize_mode="no",
        skip_reencode=True,
        timeout=10,
        thread_count=args.threads,
        processes_count=args.cpus,
        number_sample_per_shard=args.per_shard,
        distributor="multiprocessing",
        enable_wandb=False,
    )
    stats = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
    return sum(s["successes"] for s in stats)


def _ingest(list_path: Path, out: Path, args, distributor: str) -> int:
    from pipelines.ingest.ssrf import UrlPolicy
    from pipelines.ingest.urls import UrlIngestConfig, ingest_urls

    config = UrlIngestConfig(
        input_path=str(list_path),
        output_dir=str(out),
        url_col="URL",
        caption_col="TEXT",
        timeout_s=10,
        thread_count=args.threads,
        processes_count=args.cpus if distributor == "multiprocessing" else None,
        number_sample_per_shard=args.per_shard,
        distributor=distributor,
        url_policy=UrlPolicy(allow_networks=("127.0.0.0/8",)),
    )
    return ingest_urls(config).n_success


def _time(fn, n_rows: int) -> dict:
    start = time.perf_counter()
    n_success = fn()
    seconds = time.perf_counter() - start
    if n_success != n_rows:
        raise RuntimeError(f"only {n_success} of {n_rows} URLs became samples")
    return {"seconds": seconds, "samples_per_s": n_success / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/ingest.json")
    parser.add_argument("--rows", type=int, default=200, help="rows of the LAION list (at most 200)")
    parser.add_argument("--copies", type=int, default=1, help="repeat the list this many times")
    parser.add_argument("--cpus", type=int, default=2, help="Ray CPUs = img2dataset processes")
    parser.add_argument("--threads", type=int, default=16, help="download threads per shard task/process")
    parser.add_argument("--per-shard", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import ray

    from tests.pipelines.http_server import PhotoServer

    table = pa.concat_tables([pq.read_table(LAION).slice(0, args.rows)] * args.copies)
    n_rows = table.num_rows
    runs: dict[str, list[dict]] = {
        "ingest_urls_ray": [],
        "ingest_urls_multiprocessing": [],
        "img2dataset_plain": [],
    }
    with PhotoServer() as server, tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        urls = server.serve_urls(table["URL"].to_pylist())
        list_path = Path(tmp) / "laion_local.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": table["TEXT"]}), list_path)
        start = time.perf_counter()
        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        ray_init_s = time.perf_counter() - start
        try:
            for rep in range(args.repeats):  # interleaved, so drift hits every variant alike
                out = Path(tmp) / f"rep{rep}"
                runs["ingest_urls_ray"].append(
                    _time(lambda o=out: _ingest(list_path, o / "ray", args, "ray"), n_rows)
                )
                runs["ingest_urls_multiprocessing"].append(
                    _time(lambda o=out: _ingest(list_path, o / "mp", args, "multiprocessing"), n_rows)
                )
                runs["img2dataset_plain"].append(
                    _time(lambda o=out: _plain_img2dataset(list_path, o / "plain", args), n_rows)
                )
        finally:
            ray.shutdown()

    best = {name: max(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    median = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    report = {
        "benchmark": "ingest_urls vs plain img2dataset, local HTTP server on 127.0.0.1",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"}
        | {"resize_mode": "no", "images": "jpeg"},
        "ray_init_s": ray_init_s,
        "runs": runs,
        "best_samples_per_s": best,
        "median_samples_per_s": median,
        "ratio_ray_vs_plain_best": best["ingest_urls_ray"] / best["img2dataset_plain"],
        "ratio_ray_vs_plain_median": median["ingest_urls_ray"] / median["img2dataset_plain"],
        "ratio_multiprocessing_vs_plain_best": best["ingest_urls_multiprocessing"]
        / best["img2dataset_plain"],
    }
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2))
    print(
        json.dumps(
            {k: report[k] for k in ("best_samples_per_s", "ratio_ray_vs_plain_best", "ray_init_s")}, indent=2
        )
    )


if __name__ == "__main__":
    main()
