"""Image–text shards in img2dataset's layout, assembled in memory.

A shard ``NNNNN`` is ``NNNNN.tar`` (``key.<ext>``, ``key.txt``, ``key.json`` per sample; ``<ext>`` from the
format policy, ``pipelines.core.images.member_extension``) plus ``NNNNN.parquet`` (one row per input sample
with its status) and ``NNNNN_stats.json``. ``shard_files`` gives the bytes of all three; the ingest stages and
commits them (``pipelines.core.commits``), so a partial shard is never visible.

img2dataset-based tools read them: the status Parquet has img2dataset's columns (``key``, ``url``,
``caption``, ``status``, ``error_message``, ``width``, ``height``, ``original_width``, ``original_height``,
``exif``, ``sha256``) with ours beside them (``source``, ``image_format``, ``reject_step``, ``reject_reason``,
``reject_detail``); each sample JSON has img2dataset's fields too; ``_stats.json`` has img2dataset's keys
(``count``, ``successes``, ``failed_to_download``, ``failed_to_resize``, ``duration``, ``start_time``,
``end_time``, ``status_dict``) plus ``shard_index`` and ``failed``; the timings are 0, so that the same input
always gives the same bytes. As img2dataset counts them, a sample that
could not be read (step ``read``) is ``failed_to_download`` and one the checks refused is ``failed_to_resize``
(img2dataset's decode and size checks live in its resizer); ``error_message`` is the reject reason. Without
a resize, ``original_width``/``original_height`` equal ``width``/``height`` (upright, after EXIF
orientation); ``url`` comes from the source sample's JSON when it has one; ``exif`` is img2dataset's
(exifread's tags as JSON).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

from pipelines.core.images import member_extension
from pipelines.core.step import Batch, healthy
from pipelines.core.storage import table_bytes
from schemas.columns import (
    CAPTION,
    HEIGHT,
    IMAGE,
    IMAGE_FORMAT,
    KEY,
    META_JSON,
    REJECT_DETAIL,
    REJECT_REASON,
    REJECT_STEP,
    SOURCE,
    WIDTH,
)

SUCCESS, FAILED_TO_DOWNLOAD, FAILED_TO_RESIZE = "success", "failed_to_download", "failed_to_resize"
STATUS_SCHEMA = pa.schema(
    [
        # img2dataset's columns
        ("key", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),
        # ours
        ("source", pa.string()),
        ("image_format", pa.string()),
        (REJECT_STEP, pa.string()),
        (REJECT_REASON, pa.string()),
        (REJECT_DETAIL, pa.string()),
    ]
)


def safe_key(key: str) -> str:
    """A WebDataset-safe key: no dots or slashes (they would split the key), nothing outside [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or "_"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same input gives the same shard
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _meta(batch: Batch, i: int) -> dict[str, Any]:
    try:
        meta = json.loads(batch[META_JSON][i] or "{}")
    except (json.JSONDecodeError, TypeError):
        meta = {}
    return meta if isinstance(meta, dict) else {"meta": meta}


def _url(meta: dict[str, Any]) -> str | None:
    url = meta.get("url")
    return url if isinstance(url, str) else None


logging.getLogger("exifread").setLevel(logging.ERROR)  # it logs "File format not recognized." per PNG/GIF/...


def exif_json(data: bytes) -> str | None:
    """The image's EXIF tags as img2dataset stores them (exifread, ``{tag: str(value)}`` as JSON); None when
    exifread cannot read the file."""
    import exifread

    try:
        tags = exifread.process_file(io.BytesIO(data), details=False)
        return json.dumps({k: str(v).strip() for k, v in tags.items() if v is not None})
    except Exception:  # img2dataset stores None for a file exifread fails on
        return None


def _sample_json(batch: Batch, i: int) -> dict[str, Any]:
    """img2dataset's sample fields (over the source's own metadata), plus ours."""
    meta = _meta(batch, i)
    data = bytes(batch[IMAGE][i])
    width, height = int(batch[WIDTH][i]), int(batch[HEIGHT][i])
    return meta | {
        "url": _url(meta),
        "key": safe_key(str(batch[KEY][i])),
        "caption": batch[CAPTION][i],
        "status": SUCCESS,
        "error_message": None,
        "width": width,
        "height": height,
        "original_width": width,
        "original_height": height,
        "exif": exif_json(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "source_key": str(batch[KEY][i]),
        "source": str(batch[SOURCE][i]),
        "image_format": str(batch[IMAGE_FORMAT][i]),
    }


def members_tar_bytes(samples: Iterable[tuple[str, dict[str, bytes]]]) -> bytes:
    """A WebDataset tar of ``(key, {extension: bytes})`` samples, members in order, deterministic bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                _tar_member(tar, f"{key}.{ext}", data)
    return buffer.getvalue()


def tar_bytes(batches: Sequence[Batch]) -> tuple[bytes, list[dict[str, Any]]]:
    """A tar of the healthy rows of ``batches`` and the JSON record of each written sample."""
    buffer = io.BytesIO()
    records = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for batch in batches:
            for i in healthy(batch):
                record = _sample_json(batch, i)
                key = record["key"]
                ext = member_extension(record["image_format"])
                _tar_member(tar, f"{key}.{ext}", bytes(batch[IMAGE][i]))
                _tar_member(tar, f"{key}.txt", str(batch[CAPTION][i]).encode("utf-8"))
                _tar_member(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
                records.append(record)
    return buffer.getvalue(), records


def _status(step: str, reason: str) -> str:
    if not reason:
        return SUCCESS
    return FAILED_TO_DOWNLOAD if step == "read" else FAILED_TO_RESIZE


def status_table(batches: Sequence[Batch], records: Sequence[dict[str, Any]] = ()) -> pa.Table:
    """One row per input sample (``STATUS_SCHEMA``): img2dataset's columns, then source and reject fields.

    ``records`` are ``tar_bytes``'s sample records, in order: the written samples' exif and sha256.
    """
    written = iter(records)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        for i in range(len(batch[KEY])):
            step, reason = str(batch[REJECT_STEP][i]), str(batch[REJECT_REASON][i])
            caption = batch[CAPTION][i]
            record = next(written) if not reason else {}
            size = (
                {c: int(batch[c][i]) for c in (WIDTH, HEIGHT)} if not reason else {WIDTH: None, HEIGHT: None}
            )
            rows.append({
                "key": str(batch[KEY][i]), "url": _url(_meta(batch, i)),
                "caption": caption if isinstance(caption, str) else None,
                "status": _status(step, reason), "error_message": reason or None,
                "width": size[WIDTH], "height": size[HEIGHT],
                "original_width": size[WIDTH], "original_height": size[HEIGHT],
                "exif": record.get("exif"), "sha256": record.get("sha256"),
                "source": str(batch[SOURCE][i]),
                "image_format": str(batch[IMAGE_FORMAT][i]) if not reason and IMAGE_FORMAT in batch else None,
                REJECT_STEP: step, REJECT_REASON: reason, REJECT_DETAIL: str(batch[REJECT_DETAIL][i]),
            })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)


def shard_files(batches: Sequence[Batch], shard_index: int) -> tuple[dict[str, bytes], pa.Table]:
    """The shard's files (``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``) and its status table.

    Every byte is a function of the input, so a retried task rewrites the same files: ``_stats.json``'s
    timing fields (``duration``, ``start_time``, ``end_time``) are there for img2dataset's tools, at 0.
    """
    name = f"{shard_index:05d}"
    data, records = tar_bytes(batches)
    status = status_table(batches, records)
    statuses = Counter(status["status"].to_pylist())
    status_dict = Counter(r or SUCCESS for r in status["error_message"].to_pylist())
    stats = {"count": status.num_rows, "successes": len(records),
             "failed_to_download": statuses[FAILED_TO_DOWNLOAD], "failed_to_resize": statuses[FAILED_TO_RESIZE],
             "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
             "status_dict": dict(status_dict.most_common()),
             "shard_index": shard_index, "failed": status.num_rows - len(records)}  # fmt: skip
    files = {f"{name}.tar": data, f"{name}.parquet": table_bytes(status),
             f"{name}_stats.json": json.dumps(stats).encode()}  # fmt: skip
    return files, status
