"""Image–text shards in img2dataset's layout, assembled in memory.

A shard ``NNNNN`` is ``NNNNN.tar`` (``key.<ext>``, ``key.txt``, ``key.json`` per sample) plus
``NNNNN.parquet`` (one row per input sample with its status, as img2dataset writes) and
``NNNNN_stats.json``. ``shard_files`` gives the bytes of all three; the ingest stages and commits them
(``pipelines.core.commits``), so a partial shard is never visible.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa

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

_EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "webp": "webp",
    "gif": "gif",
    "bmp": "bmp",
    "tiff": "tif",
    "mpo": "jpg",
}


def safe_key(key: str) -> str:
    """A WebDataset-safe key: no dots or slashes (they would split the key), nothing outside [A-Za-z0-9_-]."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or "_"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # deterministic bytes: the same input gives the same shard
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _sample_json(batch: Batch, i: int) -> dict[str, Any]:
    try:
        meta = json.loads(batch[META_JSON][i] or "{}")
    except json.JSONDecodeError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {"meta": meta}
    return meta | {
        "key": safe_key(str(batch[KEY][i])),
        "source_key": str(batch[KEY][i]),
        "source": str(batch[SOURCE][i]),
        "caption": batch[CAPTION][i],
        "width": int(batch[WIDTH][i]),
        "height": int(batch[HEIGHT][i]),
        "image_format": str(batch[IMAGE_FORMAT][i]),
        "status": "success",
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
                ext = _EXTENSIONS.get(record["image_format"], record["image_format"])
                _tar_member(tar, f"{key}.{ext}", bytes(batch[IMAGE][i]))
                _tar_member(tar, f"{key}.txt", str(batch[CAPTION][i]).encode("utf-8"))
                _tar_member(tar, f"{key}.json", json.dumps(record, ensure_ascii=False).encode("utf-8"))
                records.append(record)
    return buffer.getvalue(), records


def status_table(batches: Sequence[Batch]) -> pa.Table:
    """One row per input sample: key, source, caption, size, status and the reject fields."""
    rows: dict[str, list] = {c: [] for c in (KEY, SOURCE, CAPTION, WIDTH, HEIGHT, "status", REJECT_STEP,
                                             REJECT_REASON, REJECT_DETAIL)}  # fmt: skip
    for batch in batches:
        for i in range(len(batch[KEY])):
            reason = str(batch[REJECT_REASON][i])
            caption = batch[CAPTION][i]
            rows[KEY].append(str(batch[KEY][i]))
            rows[SOURCE].append(str(batch[SOURCE][i]))
            rows[CAPTION].append(caption if isinstance(caption, str) else None)
            for column in (WIDTH, HEIGHT):
                value = batch.get(column, [None] * len(batch[KEY]))[i]
                rows[column].append(None if reason or value is None else int(value))
            rows["status"].append("failed" if reason else "success")
            for column in (REJECT_STEP, REJECT_REASON, REJECT_DETAIL):
                rows[column].append(str(batch[column][i]))
    return pa.table(rows)


def shard_files(batches: Sequence[Batch], shard_index: int) -> tuple[dict[str, bytes], pa.Table]:
    """The shard's files (``NNNNN.tar``, ``NNNNN.parquet``, ``NNNNN_stats.json``) and its status table."""
    name = f"{shard_index:05d}"
    data, records = tar_bytes(batches)
    status = status_table(batches)
    stats = {"shard_index": shard_index, "count": status.num_rows, "successes": len(records),
             "failed": status.num_rows - len(records)}  # fmt: skip
    files = {f"{name}.tar": data, f"{name}.parquet": table_bytes(status),
             f"{name}_stats.json": json.dumps(stats).encode()}  # fmt: skip
    return files, status
