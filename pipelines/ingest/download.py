"""img2dataset's reader, downloader and writer, run shard by shard with the checked opener installed.

``img2dataset.download`` has no hook for its HTTP client: every downloader thread calls
``urllib.request.urlopen``. So this module builds img2dataset's own parts as ``img2dataset.download`` does
(``Reader`` splits the list into ``_tmp/NNNNN.feather`` shards, ``Resizer``, ``Downloader`` with
``WebDatasetSampleWriter``, the same defaults) and runs each shard in a Ray task (``num_cpus=1``, as
img2dataset's Ray distributor does) or in a spawned process, inside ``fetch.checked_downloads``: every request
the shard makes goes through ``fetch.checked_opener``. The output is img2dataset's, byte for byte: the same
``NNNNN.tar``, ``NNNNN.parquet`` and ``NNNNN_stats.json``.

Shards whose ``NNNNN_stats.json`` exists are skipped (img2dataset's incremental mode). A shard whose task
fails leaves no stats file; the caller counts it as failed.
"""

from __future__ import annotations

import os
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import fsspec

from pipelines.ingest.fetch import FetchPolicy, checked_downloads

if TYPE_CHECKING:
    from pipelines.ingest.urls import UrlIngestConfig

# img2dataset.download's defaults for what UrlIngestConfig does not expose
DISALLOWED_HEADER_DIRECTIVES = frozenset({"noai", "noimageai", "noindex", "noimageindex"})
STATS_SUFFIX = "_stats.json"


def download_shards(
    config: UrlIngestConfig, list_path: str, columns: list[str], oom_shard_count: int
) -> None:
    """Download the Parquet URL list at ``list_path`` (columns ``url``, ``caption``?, ``columns``) into
    ``config.output_dir`` in img2dataset's layout, every request checked by ``config.fetch_policy``."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader
    from img2dataset.reader import Reader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter

    fs, root = fsspec.core.url_to_fs(config.output_dir)
    output = os.path.abspath(root) if fs.protocol in ("file", ("file", "local")) else config.output_dir
    tmp = f"{root.rstrip('/')}/_tmp"
    fs.makedirs(tmp, exist_ok=True)
    done = {int(p.rsplit("/", 1)[-1].removesuffix(STATS_SUFFIX)) for p in fs.glob(f"{root}/*{STATS_SUFFIX}")}
    caption = "caption" if config.caption_col is not None else None
    reader = Reader(list_path, "parquet", "url", caption, None, None, list(columns),
                    config.number_sample_per_shard, done, f"{output.rstrip('/')}/_tmp")  # fmt: skip
    resizer = Resizer(
        image_size=config.image_size_px or 256, resize_mode=config.resize_mode,
        resize_only_if_bigger=config.resize_only_if_bigger, encode_quality=config.encode_quality,
        encode_format=config.encode_format, skip_reencode=config.skip_reencode,
    )  # fmt: skip
    downloader = Downloader(
        sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=config.thread_count,
        save_caption=caption is not None, extract_exif=True, output_folder=output, column_list=reader.column_list,
        timeout=config.timeout_s, number_sample_per_shard=config.number_sample_per_shard,
        oom_shard_count=oom_shard_count, compute_hash="sha256", verify_hash_type=None,
        encode_format=config.encode_format, retries=config.retries, user_agent_token=None,
        disallowed_header_directives=set(DISALLOWED_HEADER_DIRECTIVES),
    )  # fmt: skip
    policy = config.fetch_policy
    if config.distributor == "ray":
        _on_ray(downloader, reader, policy)
    else:
        _in_processes(downloader, reader, policy, config.processes_count or os.cpu_count() or 1)
    fs.rm(tmp, recursive=True)


def download_shard(downloader: Any, shard: tuple[int, str], policy: FetchPolicy) -> bool:
    """One shard through img2dataset's downloader, its requests through the checked opener; True when done."""
    with checked_downloads(policy):
        ok, _ = downloader(shard)
    return bool(ok)


def _on_ray(downloader: Any, reader: Any, policy: FetchPolicy) -> None:
    import ray

    task = ray.remote(num_cpus=1)(download_shard)
    shared = ray.put(downloader)
    ray.get([task.remote(shared, shard, policy) for shard in reader])


def _in_processes(downloader: Any, reader: Any, policy: FetchPolicy, processes: int) -> None:
    """Spawned processes, each replaced after 5 shards as img2dataset does (a multiprocessing Pool: Python
    3.11's ProcessPoolExecutor can hang when it replaces a worker after ``max_tasks_per_child``)."""
    with get_context("spawn").Pool(processes, maxtasksperchild=5) as pool:
        for _ in pool.imap_unordered(_download_one, ((downloader, shard, policy) for shard in reader)):
            pass


def _download_one(task: tuple[Any, tuple[int, str], FetchPolicy]) -> bool:
    return download_shard(*task)
