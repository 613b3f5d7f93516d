"""Ingest URL lists into WebDataset shards in img2dataset's layout, optionally distributed over Ray.

``ingest_urls(config)`` reads a URL list (parquet, csv, tsv or jsonl with a url and a caption column), refuses
URLs the SSRF guard (``pipelines.ingest.ssrf``) rejects, downloads the rest with img2dataset's downloader
(``pipelines.ingest.download``), every hop checked, pinned and capped by ``pipelines.ingest.fetch``, and turns
every row that did not become a sample into a reject, so ``n_success + n_rejected == n_input``.

Output (img2dataset's layout): ``NNNNN.tar`` with ``key.jpg``, ``key.txt``, ``key.json``; ``NNNNN.parquet``
(one row per URL given to img2dataset, with ``status`` and ``error_message``); ``NNNNN_stats.json``; plus
``rejects/`` (key, source, step, reason, detail, row_index): ``NNNNN.parquet`` per shard and
``refused.parquet`` for URLs the guard refused. Every sample's JSON and every shard Parquet row carry
``row_index``, the row's position in the input list. Sample keys are img2dataset's keys over the URLs that
passed the guard. Rejects refused before the download have an empty key.

Exactly once (``pipelines.core.commits``): after the download, one Ray task per shard (threads without Ray)
reads that shard's status file, stages its rejects and commits it with its counts; the driver reads no
shard. ``manifest.json`` is written last. A rerun skips committed shards (img2dataset's incremental mode
skips complete ones); another list or other download settings are refused (``_commits/_fingerprint.json``).

How the download runs: ``distributor="ray"`` submits one Ray task per shard (``num_cpus=1``,
``thread_count`` download threads each) to the Ray instance this process is connected to, so Ray must be
initialised first; ``"multiprocessing"`` uses ``processes_count`` spawned processes. A shard counts only once
its ``_stats.json`` exists; rows of other shards become rejects with reason "shard failed". Workers write to
``output_dir`` directly and read the driver-written ``output_dir/_tmp`` shards, so on a multi-node cluster
``output_dir`` must be shared storage (an fsspec URL such as ``s3://`` or a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from pipelines.core.commits import COMMIT_CPUS, REJECTS, STAGING, CommitStore, totals
from pipelines.core.images import PILLOW_MAX_PIXELS
from pipelines.core.progress import Progress, polling
from pipelines.ingest.download import download_shards
from pipelines.ingest.fetch import FetchPolicy, parse_refusal
from pipelines.ingest.ssrf import UrlPolicy, check_urls

STEP = "ingest"
MANIFEST = "manifest.json"
ROW_INDEX = "row_index"
INPUT_FORMATS = ("parquet", "csv", "tsv", "jsonl")
RESIZE_MODES = ("no", "border", "keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = ("jpg", "png", "webp")
DISTRIBUTORS = ("ray", "multiprocessing")
INCREMENTAL_MODES = ("incremental", "overwrite")
OOM_SHARD_COUNT = 5  # img2dataset's default: shard names are 5 digits
# img2dataset reserves these names in its output (save_additional_columns may not use them).
_RESERVED_COLUMNS = frozenset(
    {"key", "caption", "url", "width", "height", "original_width", "original_height", "status"}
    | {"error_message", "exif", "md5", "sha256", "sha512", ROW_INDEX}
)

REJECTS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("step", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        (ROW_INDEX, pa.int64()),
    ]
)


@dataclass(frozen=True, kw_only=True)
class UrlIngestConfig:
    """What to download and how.

    Attributes:
        input_path: URL list (local path or fsspec URL).
        output_dir: where the shards go (local path or fsspec URL; shared storage for multi-node Ray).
        input_format: "auto" (from the extension) or one of ``INPUT_FORMATS``.
        url_col: column holding the image URL.
        caption_col: column holding the caption (None: no ``.txt`` members).
        additional_cols: input columns copied into each sample's JSON and the shard Parquet.
        resize_mode: "no" keeps originals (default: encoding quality depends on them), else an img2dataset
            mode (``border``, ``keep_ratio``, ``keep_ratio_largest``, ``center_crop``) to ``image_size_px``.
        image_size_px: target size; required unless ``resize_mode == "no"``.
        resize_only_if_bigger: never upscale.
        skip_reencode: store the downloaded bytes unchanged when no resize happened and the image is
            already in ``encode_format`` (with ``resize_mode="no"`` JPEG originals stay byte-identical).
        encode_format: format of re-encoded images ("jpg", "png", "webp").
        encode_quality: JPEG/WebP quality 0–100, PNG compression 0–9.
        timeout_s: socket timeout of each connect, read and write.
        deadline_s: total time per URL, redirects and the whole body included (a slow-drip server is cut off).
        max_redirects: redirects followed per URL; each target is checked like the first URL.
        max_response_bytes: body bytes read per URL (reading stops there; a gzip body is inflated up to it).
        max_pixels: refuse an image whose header claims more pixels, before it is decoded.
        retries: extra attempts per URL after a failed download.
        thread_count: download threads per shard task/process.
        processes_count: processes for the multiprocessing distributor (None: all CPUs).
        number_sample_per_shard: URLs per output shard.
        distributor: "ray" (needs an initialised Ray) or "multiprocessing".
        incremental_mode: "incremental" skips shards already complete in ``output_dir``; "overwrite"
            deletes ``output_dir`` first.
        url_policy: SSRF guard, applied to every hop at connect time; the default refuses internal addresses.
        dns_threads: concurrent DNS lookups for the guard.
    """

    input_path: str
    output_dir: str
    input_format: str = "auto"
    url_col: str = "url"
    caption_col: str | None = "caption"
    additional_cols: tuple[str, ...] = ()
    resize_mode: str = "no"
    image_size_px: int | None = None
    resize_only_if_bigger: bool = False
    skip_reencode: bool = True
    encode_format: str = "jpg"
    encode_quality: int = 95
    timeout_s: float = 10.0
    deadline_s: float = 60.0
    max_redirects: int = 5
    max_response_bytes: int = 32 * 2**20
    max_pixels: int = PILLOW_MAX_PIXELS
    retries: int = 0
    thread_count: int = 64
    processes_count: int | None = None
    number_sample_per_shard: int = 10_000
    distributor: str = "ray"
    incremental_mode: str = "incremental"
    url_policy: UrlPolicy = field(default_factory=UrlPolicy)
    dns_threads: int = 32

    def __post_init__(self) -> None:
        for name in ("input_path", "output_dir", "url_col"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a non-empty string")
        _check_choice("input_format", self.input_format, ("auto", *INPUT_FORMATS))
        _ = self.resolved_input_format
        if self.caption_col is not None and (not self.caption_col or self.caption_col == self.url_col):
            raise ValueError(f"caption_col={self.caption_col!r} must be None or a column other than url_col")
        object.__setattr__(self, "additional_cols", tuple(self.additional_cols))
        for col in self.additional_cols:
            if col in _RESERVED_COLUMNS or col in (self.url_col, self.caption_col):
                raise ValueError(
                    f"additional_cols entry {col!r} is reserved; reserved: {sorted(_RESERVED_COLUMNS)}"
                )
        self._check_image_options()
        self._check_download_options()
        if not isinstance(self.url_policy, UrlPolicy):
            raise ValueError(f"url_policy={self.url_policy!r} must be a pipelines.ingest.ssrf.UrlPolicy")

    def _check_image_options(self) -> None:
        _check_choice("resize_mode", self.resize_mode, RESIZE_MODES)
        _check_choice("encode_format", self.encode_format, ENCODE_FORMATS)
        if self.resize_mode != "no" and (self.image_size_px is None or self.image_size_px < 1):
            raise ValueError(
                f"image_size_px={self.image_size_px!r} must be >= 1 with resize_mode={self.resize_mode!r}"
            )
        if self.resize_mode == "no" and self.image_size_px is not None:
            warnings.warn(
                f"image_size_px={self.image_size_px} is ignored with resize_mode='no'", stacklevel=3
            )
        top = 9 if self.encode_format == "png" else 100
        if not 0 <= self.encode_quality <= top:
            raise ValueError(
                f"encode_quality={self.encode_quality} must be in [0, {top}] for {self.encode_format}"
            )

    def _check_download_options(self) -> None:
        _check_choice("distributor", self.distributor, DISTRIBUTORS)
        _check_choice("incremental_mode", self.incremental_mode, INCREMENTAL_MODES)
        for name in ("timeout_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("retries", "max_redirects"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in (
            "thread_count",
            "number_sample_per_shard",
            "dns_threads",
            "max_response_bytes",
            "max_pixels",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.processes_count is not None and self.processes_count < 1:
            raise ValueError(f"processes_count={self.processes_count} must be None or >= 1")
        if self.distributor == "ray" and self.processes_count is not None:
            warnings.warn(
                f"processes_count={self.processes_count} is ignored with distributor='ray' "
                "(one Ray task per shard, as many at once as the cluster has CPUs)",
                stacklevel=3,
            )

    @property
    def fetch_policy(self) -> FetchPolicy:
        """What each download may do (``pipelines.ingest.fetch``)."""
        return FetchPolicy(urls=self.url_policy, max_redirects=self.max_redirects, max_bytes=self.max_response_bytes,
                           max_pixels=self.max_pixels, deadline_s=self.deadline_s)  # fmt: skip

    @property
    def resolved_input_format(self) -> str:
        if self.input_format != "auto":
            return self.input_format
        extension = os.path.splitext(self.input_path)[1].lstrip(".").lower()
        if extension not in INPUT_FORMATS:
            raise ValueError(
                f"input_format='auto' cannot tell the format of input_path={self.input_path!r}; "
                f"use an extension or input_format in {INPUT_FORMATS}"
            )
        return extension


@dataclass(frozen=True)
class IngestResult:
    """What an ingest produced: counts add up, ``n_success + n_rejected == n_input``."""

    output_dir: str
    n_input: int
    n_success: int
    n_rejected: int
    reject_reasons: dict[str, int]
    n_shards: int
    failed_shards: tuple[str, ...]


def ingest_urls(config: UrlIngestConfig) -> IngestResult:
    """Download ``config.input_path`` into WebDataset shards in ``config.output_dir``; see the module doc."""
    if config.distributor == "ray":
        _require_ray()
    table = read_url_list(config)
    refusals = check_urls(table["url"].to_pylist(), config.url_policy, threads=config.dns_threads)
    allowed = table.filter(pa.array([r is None for r in refusals], pa.bool_()))
    refused = [
        {"key": "", "source": url, "step": STEP, "reason": reason, ROW_INDEX: index}
        | {"detail": "refused before download by the URL policy (pipelines.ingest.ssrf.UrlPolicy)"}
        for url, index, reason in zip(
            table["url"].to_pylist(), table[ROW_INDEX].to_pylist(), refusals, strict=True
        )
        if reason is not None
    ]
    store = CommitStore(config.output_dir)
    # img2dataset's own "overwrite" deletes its _tmp folder after creating it (then fails): do it here.
    if config.incremental_mode == "overwrite":
        store.wipe()
    try:
        store.prepare(_fingerprint(config, allowed), "refuse")
    except ValueError:
        raise ValueError(
            f"output_dir={config.output_dir!r} holds shards of a different URL list or other download settings; "
            "use a fresh output_dir or incremental_mode='overwrite'"
        ) from None
    committed = store.recover()
    store.remove(MANIFEST)
    n = config.number_sample_per_shard
    shard_ids = [f"{s:0{OOM_SHARD_COUNT}d}" for s in range(math.ceil(allowed.num_rows / n))]
    todo = [s for s in shard_ids if s not in committed]
    if todo:
        with _watch_shards(store, todo):
            _download(config, allowed)  # incremental: shards completed before are skipped
    rows = {s: allowed.slice(int(s) * n, n).select([ROW_INDEX, "url"]).to_pylist() for s in todo}
    new = _commit_shards(store, rows)
    failed = tuple(s for s in todo if new.get(s) is None)
    for shard in failed:  # img2dataset left no complete shard: a rerun retries it
        rejects = [{"key": "", "source": r["url"], "step": STEP, "reason": "shard failed", ROW_INDEX: r[ROW_INDEX],
                    "detail": "no complete output shard holds this row"} for r in rows[shard]]  # fmt: skip
        store.write_table(f"{REJECTS}/{shard}.parquet", pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))
    if refused:
        store.write_table(f"{REJECTS}/refused.parquet", pa.Table.from_pylist(refused, schema=REJECTS_SCHEMA))
    records = store.records(committed) | {s: r for s, r in new.items() if r is not None}
    counts = totals(records.values())
    reasons = Counter({k.removeprefix("reason:"): v for k, v in counts.items() if k.startswith("reason:")})
    reasons.update(r["reason"] for r in refused)
    reasons.update({"shard failed": sum(len(rows[s]) for s in failed)} if failed else {})
    result = IngestResult(config.output_dir, table.num_rows, counts.get("n_samples", 0), sum(reasons.values()),
                          dict(reasons.most_common()), len(shard_ids), failed)  # fmt: skip
    if result.n_success + result.n_rejected != table.num_rows:
        raise RuntimeError(
            f"internal: {result.n_success} successes + {result.n_rejected} rejects != {table.num_rows}"
        )
    store.write_json(MANIFEST, {"schema": "samples", "layout": "img2dataset webdataset", "source": config.input_path,
                                "fingerprint": _fingerprint(config, allowed), "summary": dataclasses.asdict(result),
                                "totals": counts, "shards": dict(sorted(records.items()))})  # fmt: skip
    store.remove_if_empty(STAGING)
    return result


def _fingerprint(config: UrlIngestConfig, allowed: pa.Table) -> dict[str, Any]:
    """The URL list (rows that passed the guard) and the settings that shape each shard's bytes."""
    digest = hashlib.sha256()
    for index, url in zip(allowed[ROW_INDEX].to_pylist(), allowed["url"].to_pylist(), strict=True):
        digest.update(f"{index}\t{url}\n".encode())
    settings = ("caption_col", "additional_cols", "resize_mode", "image_size_px", "resize_only_if_bigger",
                "skip_reencode", "encode_format", "encode_quality", "number_sample_per_shard")  # fmt: skip
    return {"urls_sha256": digest.hexdigest(), "n_urls": allowed.num_rows,
            **{name: getattr(config, name) for name in settings}}  # fmt: skip


def _commit_shards(store: CommitStore, rows: dict[str, list[dict]]) -> dict[str, dict | None]:
    """Commit every completed shard from its own status file: Ray tasks when Ray runs, else threads."""
    import ray

    if ray.is_initialized():
        task = ray.remote(num_cpus=COMMIT_CPUS, max_retries=3)(commit_url_shard)
        refs = {s: task.remote(store, s, r) for s, r in rows.items()}
        return {s: ray.get(ref) for s, ref in refs.items()}
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(zip(rows, pool.map(lambda s: commit_url_shard(store, s, rows[s]), rows), strict=True))


def commit_url_shard(store: CommitStore, shard: str, rows: list[dict]) -> dict | None:
    """Commit one img2dataset shard: its rejects from its status Parquet, its counts (None: not complete)."""
    if not store.fs.exists(f"{store.path}/{shard}_stats.json"):
        return None
    with store.fs.open(f"{store.path}/{shard}.parquet", "rb") as f:
        status = pq.read_table(f, columns=["key", "status", "error_message", "url", ROW_INDEX]).to_pylist()
    urls = {r[ROW_INDEX]: r["url"] for r in rows}
    for record in status:
        if urls.get(record[ROW_INDEX]) != record["url"]:
            raise ValueError(
                f"output_dir={store.root!r} holds shard {shard} of a different URL list (row {record[ROW_INDEX]}); "
                "use a fresh output_dir or incremental_mode='overwrite'"
            )
    rejects = []
    for record in status:
        if record["status"] != "success":
            message = record["error_message"] or record["status"] or ""
            rejects.append({"key": record["key"], "source": record["url"], "step": STEP, ROW_INDEX: record[ROW_INDEX],
                            "reason": short_reason(record["status"], record["error_message"]), "detail": message[:2000]})  # fmt: skip
    if rejects:
        store.stage_rejects(shard, "download", pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA))
    n_samples = len(status) - len(rejects)
    files = [
        {"path": f"{shard}.tar", "rows": n_samples},
        {"path": f"{shard}.parquet"},
        {"path": f"{shard}_stats.json"},
    ]
    reasons = Counter(f"reason:{r['reason']}" for r in rejects)
    return store.commit(shard, {"shard_id": shard, "files": files, "n_input": len(status), "n_samples": n_samples,
                                "n_rejected": len(rejects), **reasons})  # fmt: skip


def read_url_list(config: UrlIngestConfig) -> pa.Table:
    """The input list as a table with ``url``, ``caption`` (when configured), additional columns and
    ``row_index`` (the row's position in the input)."""
    fmt = config.resolved_input_format
    fs, path = fsspec.core.url_to_fs(config.input_path)
    if not fs.isfile(path):
        raise ValueError(f"input_path={config.input_path!r} is not a file")
    wanted = {config.url_col: "url", **{c: c for c in config.additional_cols}}
    if config.caption_col is not None:
        wanted[config.caption_col] = "caption"
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            parquet = pq.ParquetFile(f)
            _require_columns(config, wanted, parquet.schema_arrow.names)
            table = parquet.read(columns=list(wanted))
        elif fmt == "jsonl":
            table = pa_json.read_json(f)
        else:
            delimiter = "\t" if fmt == "tsv" else ","
            table = pa_csv.read_csv(f, parse_options=pa_csv.ParseOptions(delimiter=delimiter))
    _require_columns(config, wanted, table.column_names)
    columns = {new: table[old] for old, new in wanted.items()}
    for name in ("url", "caption"):
        if name in columns:
            columns[name] = pc.cast(columns[name], pa.string())
    columns[ROW_INDEX] = pa.array(range(table.num_rows), pa.int64())
    return pa.table(columns)


def short_reason(status: str, error_message: str | None) -> str:
    """A short, groupable reason ("http 404", "timeout", "not an image", ...) for an img2dataset failure."""
    message = (error_message or "").strip()
    if refused := parse_refusal(message):
        return refused
    low = message.lower()
    if http := re.search(r"http error (\d{3})", low):
        return f"http {http.group(1)}"
    for needles, reason in _REASONS:
        if any(n in low for n in needles):
            return reason
    if status == "failed_to_resize":
        return message if message in _RESIZER_REASONS else "resize error"
    return "download error" if status == "failed_to_download" else (status or "unknown")


_REASONS = (
    (("timed out", "timeout"), "timeout"),
    (("image decoding error",), "image decoding error"),  # OpenCV (img2dataset's decoder) could not decode it
    (("x-robots-tag",), "disallowed by X-Robots-Tag"),
    (("hash mismatch",), "hash mismatch"),
    (("connection refused",), "connection refused"),
    (("name or service not known", "nodename nor servname", "name resolution", "getaddrinfo"), "dns error"),
    (("certificate", "ssl"), "tls error"),
    (("remote end closed", "connection reset", "incompleteread"), "connection closed"),
    (("unknown url type",), "invalid url"),
)
_RESIZER_REASONS = ("image too small", "image area too large", "aspect ratio too large")


def _require_columns(config: UrlIngestConfig, wanted: dict[str, str], names: list[str]) -> None:
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(f"input_path={config.input_path!r} lacks columns {missing}; it has {names}")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} must be one of {allowed}")


def _require_ray() -> None:
    import ray

    if not ray.is_initialized():
        raise ValueError(
            "distributor='ray' needs an initialised Ray in this process: call ray.init(...) first "
            "(otherwise img2dataset's tasks would start a fresh local Ray instance)"
        )


@contextlib.contextmanager
def _watch_shards(store: CommitStore, todo: list[str], every_s: float = 30.0) -> Iterator[None]:
    """Progress of img2dataset's download: each shard it finishes writes ``<shard>_stats.json`` (its success
    and failure counts); the driver lists them every ``every_s`` seconds (one listing, paged on an object store)
    and reads each new one once, so the reads add up to one per shard over the whole job."""
    pending = set(todo)
    progress = Progress("ingest", len(todo))

    def read() -> None:
        try:
            store.fs.invalidate_cache(store.path)
            done = [p for p in store.fs.glob(f"{store.path}/*_stats.json")
                    if p.rsplit("/", 1)[-1].removesuffix("_stats.json") in pending]  # fmt: skip
            for path in done:
                stats = json.loads(store.fs.cat_file(path))
                pending.discard(path.rsplit("/", 1)[-1].removesuffix("_stats.json"))
                progress.update(1, samples=int(stats.get("successes", 0)),
                                rejects=int(stats.get("count", 0)) - int(stats.get("successes", 0)))  # fmt: skip
        except (OSError, ValueError):
            return  # written while listed: the next poll reads it

    with progress, polling(read, every_s):
        yield


def _download(config: UrlIngestConfig, allowed: pa.Table) -> None:
    """Download the allowed rows through img2dataset's downloader, every request checked (its SIGINT handler
    is removed again afterwards)."""
    with tempfile.TemporaryDirectory(prefix="ingest_urls_") as tmp:
        list_path = os.path.join(tmp, "urls.parquet")
        pq.write_table(allowed, list_path)
        download_shards(config, list_path, [*config.additional_cols, ROW_INDEX], OOM_SHARD_COUNT)
