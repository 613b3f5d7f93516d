"""The encode pipeline's last step: stage latent parts per (input shard, bucket), plus the job fingerprint.

Parquet and WebDataset parts come from one latents@1 table (``pipelines.core.latents_io``), so both formats
hold identical tensors. A part is staged as ``parquet/<bucket>/<shard>-<hash>.parquet`` (and ``.tar`` under
``webdataset/<bucket>/``; layout ``latents_io.LAYOUT``), the hash of its keys: a retried task rewrites the
same staged files. The commit moves them
into place under the same names; the writer reports each part's rows and bucket, which the commit record and
the manifest keep, so readers plan from the manifest instead of reading footers.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.commits import CommitStore
from pipelines.core.completion import SHARD_ID, SUMMARY_COLUMNS, ShardSummary
from pipelines.core.latents_io import latent_path, parquet_bytes, to_latent_table, webdataset_bytes
from pipelines.core.sink import part_name, rows_by_shard, stage_rejects
from pipelines.core.sources import caption_text
from pipelines.core.step import Batch, Step, object_column
from pipelines.encode.models import EncoderConfig
from pipelines.encode.steps import STAGE_B_FLAT
from schemas import FileMetadata
from schemas import columns as c

LATENT_SCALARS = (c.KEY, c.CAPTION, c.SOURCE_SHARD, c.IMAGE_SHA256, c.BUCKET, c.ORIG_WIDTH, c.ORIG_HEIGHT,
                  c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class WriteConfig:
    """Where and how the latent parts are staged (``stage_b_cells``: the Stage B sizes the rows carry)."""

    output_dir: str
    metadata: FileMetadata
    dtype: str = "float16"
    formats: tuple[str, ...] = ("parquet", "webdataset")
    member_format: str = "npy"
    stage_a: bool = False
    stage_b_cells: tuple[int, ...] = ()
    endpoint_url: str | None = None

    @property
    def store(self) -> CommitStore:
        return CommitStore(self.output_dir, {"endpoint_url": self.endpoint_url} if self.endpoint_url else {})


def part_paths(shard: str, bucket: str, part: str, formats: tuple[str, ...]) -> dict[str, str]:
    """The relative path of one part in each format: ``{format}/{bucket}/{shard}-{part}.{ext}``."""
    return {fmt: latent_path(fmt, bucket, f"{shard}-{part}") for fmt in formats}


class WriteLatentParts(Step):
    """Group healthy rows by (shard, bucket), stage each group as Parquet/WebDataset parts, stage rejects;
    returns one summary row per shard (``pipelines.core.completion``)."""

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
    produces = SUMMARY_COLUMNS

    @classmethod
    def required_columns(cls, config: WriteConfig) -> tuple[str, ...]:
        extra = ((c.STAGE_A,) if config.stage_a else ()) + ((STAGE_B_FLAT,) if config.stage_b_cells else ())
        return (*cls.requires, *extra)

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
        out |= {name: np.stack([batch[name][i] for i in rows]).astype(np.float32) for name in tensors}
        if self.config.stage_b_cells:
            out |= split_stage_b(np.stack([batch[STAGE_B_FLAT][i] for i in rows]), self.config.stage_b_cells)
        return out

    def __call__(self, batch: Batch) -> Batch:
        cfg: WriteConfig = self.config
        store = cfg.store
        summary = ShardSummary(batch)
        for shard, (ok, bad) in rows_by_shard(batch).items():
            buckets: dict[str, list[int]] = {}
            for i in ok:
                buckets.setdefault(str(batch[c.BUCKET][i]), []).append(int(i))
            for bucket, rows in sorted(buckets.items()):
                table = to_latent_table(self._rows(batch, rows), cfg.dtype, cfg.metadata)
                paths = part_paths(shard, bucket, part_name(batch, rows)[:16], cfg.formats)
                if "parquet" in paths:
                    store.stage(shard, paths["parquet"], parquet_bytes(table))
                if "webdataset" in paths:
                    store.stage(shard, paths["webdataset"], webdataset_bytes(table, cfg.member_format))
                for path in paths.values():
                    summary.add_part(shard, {"path": path, "rows": len(rows), "bucket": bucket})
                summary.count(shard, n_encoded=len(rows), **{f"bucket:{bucket}": len(rows)})
            stage_rejects(store, summary, shard, batch, bad)
        return summary.batch()


def split_stage_b(flat: np.ndarray, cells: tuple[int, ...]) -> dict[str, np.ndarray]:
    """(N, Σ C·s²) concatenated Stage B latents -> ``{stage_b_effnet_{s}: (N, C, s, s)}`` float32."""
    area = sum(s * s for s in cells)
    channels, rest = divmod(flat.shape[1], area)
    assert rest == 0 and channels > 0, (flat.shape, cells)
    out, start = {}, 0
    for s in cells:
        stop = start + channels * s * s
        out[c.stage_b_effnet_column(s)] = flat[:, start:stop].reshape(-1, channels, s, s).astype(np.float32)
        start = stop
    return out


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


def runs_on_random_weights(encoder: EncoderConfig) -> bool:
    """A ``*/tiny`` flavor without a weights file: seeded random init (``EncoderConfig`` allows no other)."""
    return encoder.weights is None and encoder.flavor.endswith("/tiny")


def fingerprint_metadata(encoders: dict[str, EncoderConfig], preprocessing: dict[str, Any]) -> FileMetadata:
    """The metadata every latent file carries: flavors, weights sha256, the preprocessing hash and
    ``cascade.random_weights`` (true when any encoder ran on random weights)."""
    from schemas import preprocessing_hash

    return FileMetadata(
        encoder_flavors={role: e.flavor for role, e in encoders.items()},
        weights_sha256={role: weights_fingerprint(e) for role, e in encoders.items()},
        preprocessing_hash=preprocessing_hash(preprocessing),
        random_weights=any(runs_on_random_weights(e) for e in encoders.values()),
    )
