"""The encode pipeline's last step: stage latent parts per (input shard, bucket), plus the job fingerprint.

Parquet and WebDataset parts come from one latents@1 table (``pipelines.core.latents_io``), so both formats hold
identical tensors. Part names hash their keys: a retried task rewrites the same staged files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.latents_io import parquet_bytes, to_latent_table, webdataset_bytes
from pipelines.core.sink import rejects_table
from pipelines.core.sources import caption_text
from pipelines.core.step import Batch, Step, healthy, object_column
from pipelines.core.storage import write_bytes
from pipelines.encode.models import EncoderConfig
from pipelines.encode.steps import SHARD_ID
from schemas import FileMetadata
from schemas import columns as c

LATENT_SCALARS = (c.KEY, c.CAPTION, c.SOURCE_SHARD, c.IMAGE_SHA256, c.BUCKET, c.ORIG_WIDTH, c.ORIG_HEIGHT,
                  c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class WriteConfig:
    """Where and how the latent parts are staged."""

    output_dir: str
    metadata: FileMetadata
    dtype: str = "float16"
    formats: tuple[str, ...] = ("parquet", "webdataset")
    member_format: str = "npy"
    stage_a: bool = False
    endpoint_url: str | None = None


class WriteLatentParts(Step):
    """Group healthy rows by (shard, bucket), write each group as staged Parquet/WebDataset parts."""

    name = "write"
    requires = (
        c.KEY,
        c.SOURCE,
        c.CAPTION,
        SHARD_ID,
        c.BUCKET,
        c.EFFNET,
        c.CLIP_TEXT,
        c.CLIP_TEXT_POOLED,
        c.CLIP_IMG,
    )
    produces = ("n_encoded", "n_rejected", "buckets")

    @classmethod
    def required_columns(cls, config: WriteConfig) -> tuple[str, ...]:
        return (*cls.requires, c.STAGE_A) if config.stage_a else cls.requires

    def _rows(self, batch: Batch, rows: list[int]) -> dict[str, np.ndarray]:
        out = {name: batch[name][rows] for name in LATENT_SCALARS if name not in (c.SOURCE_SHARD, c.CAPTION)}
        out[c.SOURCE_SHARD] = batch[c.SOURCE][rows]
        out[c.CAPTION] = object_column(caption_text(v) for v in batch[c.CAPTION][rows])
        tensors = (
            c.EFFNET,
            c.CLIP_TEXT,
            c.CLIP_TEXT_POOLED,
            c.CLIP_IMG,
            *((c.STAGE_A,) if self.config.stage_a else ()),
        )
        return out | {name: np.stack([batch[name][i] for i in rows]).astype(np.float32) for name in tensors}

    def __call__(self, batch: Batch) -> Batch:
        cfg: WriteConfig = self.config
        options = {"endpoint_url": cfg.endpoint_url} if cfg.endpoint_url else {}
        groups: dict[tuple[str, str], list[int]] = {}
        for i in healthy(batch):
            groups.setdefault((str(batch[SHARD_ID][i]), str(batch[c.BUCKET][i])), []).append(int(i))
        summary: dict[str, dict[str, Any]] = {}
        for (shard, bucket), rows in sorted(groups.items()):
            part = hashlib.sha1("\n".join(str(batch[c.KEY][i]) for i in rows).encode()).hexdigest()[:16]
            table = to_latent_table(self._rows(batch, rows), cfg.dtype, cfg.metadata)
            base = f"{cfg.output_dir.rstrip('/')}/_staging/{shard}/{bucket}-{part}"
            if "parquet" in cfg.formats:
                write_bytes(f"{base}.parquet", parquet_bytes(table), options)
            if "webdataset" in cfg.formats:
                write_bytes(f"{base}.tar", webdataset_bytes(table, cfg.member_format), options)
            entry = summary.setdefault(shard, {"n_encoded": 0, "n_rejected": 0, "buckets": {}})
            entry["n_encoded"] += len(rows)
            entry["buckets"][bucket] = entry["buckets"].get(bucket, 0) + len(rows)
        bad = np.setdiff1d(np.arange(len(batch[c.KEY])), healthy(batch))
        for shard in sorted({str(batch[SHARD_ID][i]) for i in bad}):
            rows = np.asarray([i for i in bad if str(batch[SHARD_ID][i]) == shard])
            part = hashlib.sha1("\n".join(str(batch[c.KEY][i]) for i in rows).encode()).hexdigest()[:16]
            write_bytes(f"{cfg.output_dir.rstrip('/')}/_staging/{shard}/{part}.rejects.parquet",
                        _table_bytes(rejects_table(batch, rows)), options)  # fmt: skip
            summary.setdefault(shard, {"n_encoded": 0, "n_rejected": 0, "buckets": {}})["n_rejected"] += len(
                rows
            )
        shards = sorted(summary)
        return {
            SHARD_ID: object_column(shards),
            "n_encoded": np.asarray([summary[s]["n_encoded"] for s in shards], dtype=np.int64),
            "n_rejected": np.asarray([summary[s]["n_rejected"] for s in shards], dtype=np.int64),
            "buckets": object_column(json.dumps(summary[s]["buckets"]) for s in shards),
        }


def _table_bytes(table: Any) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def weights_fingerprint(encoder: EncoderConfig) -> str:
    """sha256 of an encoder's weights: the file (or an HF folder's safetensors files), or of the seeded random
    init for tiny flavors. Computed on the driver before any cluster work (it reads the whole file)."""
    from stages.weights import sha256_of, state_dict_sha256

    if encoder.weights is None:
        from stages.flavors import get_flavor

        return state_dict_sha256(get_flavor(encoder.flavor).build().state_dict())
    fs, path = __import__("fsspec").core.url_to_fs(encoder.weights)
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".safetensors"))
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{os.path.basename(file)}:{sha256_of(fs.unstrip_protocol(file))}\n".encode())
        return digest.hexdigest()
    return sha256_of(encoder.weights)


def fingerprint_metadata(encoders: dict[str, EncoderConfig], preprocessing: dict[str, Any]) -> FileMetadata:
    """The metadata every latent file carries: flavors, weights sha256 and the preprocessing hash."""
    from schemas import preprocessing_hash

    return FileMetadata(
        encoder_flavors={role: e.flavor for role, e in encoders.items()},
        weights_sha256={role: weights_fingerprint(e) for role, e in encoders.items()},
        preprocessing_hash=preprocessing_hash(preprocessing),
    )
