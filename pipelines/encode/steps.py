"""The CPU steps of the encode pipeline: read (kept keys, stored CLIP-L embeddings, validation) and
decode + crop. The model steps are in ``pipelines.encode.models``, the writer in ``pipelines.encode.writer``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.by_shard import read_for_shard
from pipelines.core.completion import SHARD_ID, closed
from pipelines.core.images import PILLOW_MAX_PIXELS, ImageError, decode_rgb, to_float_chw
from pipelines.core.preprocess import PreprocessConfig, bucket_name, crop_for_encoding, crop_for_stage_a
from pipelines.core.sources import READ_COLUMNS, SourceConfig, read_shard, shard_id
from pipelines.core.step import Batch, Step, healthy, object_column, reject
from pipelines.core.validate import ValidateConfig, ValidateSamples, drop_repeated_keys
from schemas.columns import (
    BUCKET,
    CLIP_IMAGE_EMBEDS,
    CLIP_IMG,
    CLIP_TEXT,
    CLIP_TEXT_POOLED,
    CROP_BOTTOM,
    CROP_LEFT,
    CROP_RIGHT,
    CROP_TOP,
    EFFNET,
    IMAGE,
    IMAGE_SHA256,
    KEY,
    ORIG_HEIGHT,
    ORIG_WIDTH,
    STAGE_A,
)

PIXELS = "pixels"  # (3, h, w) float32 in [0, 1]: the effnet input after crop/bucket
STAGE_A_PIXELS = "stage_a_pixels"  # (3, 1024, 1024) float32: the Stage A input
# (Σ 16·s²,) float32: the Stage B effnet latents of every stored size s, flattened and concatenated in
# ascending s; the writer splits it into the stage_b_effnet_{s} columns (one column whatever the sizes, so
# the plan check knows it).
STAGE_B_FLAT = "stage_b_flat"
# Rank of every per-row tensor column. Rows without a value (rejected, or not computed yet) hold an empty
# array of that rank instead of None, so Ray Data sees one tensor type per column across all batches.
RANKS = {PIXELS: 3, STAGE_A_PIXELS: 3, EFFNET: 3, STAGE_A: 3, CLIP_TEXT: 2, CLIP_TEXT_POOLED: 1, CLIP_IMG: 1,
         STAGE_B_FLAT: 1}  # fmt: skip


def empty(column: str) -> np.ndarray:
    """The placeholder of a tensor column for a row without a value."""
    return np.zeros((0,) * RANKS[column], dtype=np.float32)


def has_value(value: Any) -> bool:
    return value is not None and np.asarray(value).size > 0


def tensor_column(column: str, values: list[Any]) -> np.ndarray:
    """An object column of float32 arrays, placeholders where a row has no value."""
    return object_column(np.asarray(v, dtype=np.float32) if has_value(v) else empty(column) for v in values)


@dataclass(frozen=True, kw_only=True)
class ReadConfig:
    """What the encode read step needs besides the shard: the per-shard kept keys and stored embeddings.

    Attributes:
        source: the image–text shards.
        kept_keys: a per-shard kept-keys root (``cascade filter``'s output); None: every sample.
        scores: a per-shard scores root (``cascade score``'s output) whose CLIP-L embeddings are reused.
        storage_options: fsspec options of both roots.
        validate: the ingest's sample checks.
    """

    source: SourceConfig
    kept_keys: str | None = None
    scores: str | None = None
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)

    @property
    def columns(self) -> tuple[str, ...]:
        return (*READ_COLUMNS, SHARD_ID, *((CLIP_IMG,) if self.scores else ()))


def shard_rows(root: str, shard: str, columns: list[str], storage_options: dict) -> dict[str, dict]:
    """One shard's rows of a per-shard table set, keyed by ``key`` (its file alone is opened, by name)."""
    table = read_for_shard(root, shard, [KEY, *columns], storage_options)
    if table is None:
        return {}
    return dict(zip(table[KEY].to_pylist(), table.select(columns).to_pylist(), strict=True))


class EncodeRead(Step):
    """Shard rows → validated sample rows of the kept keys, with stored CLIP-L embeddings attached, each shard
    closed by its end marker.

    Validation is the ingest's (captions, image headers, sizes, duplicate keys), without its full decode:
    the preprocess step decodes each image once and reports truncated files itself.
    """

    name = "read"
    requires = ("shard_index", "uris")
    produces = (*READ_COLUMNS, SHARD_ID)

    def __init__(self, config: ReadConfig) -> None:
        super().__init__(config)
        self.validate = ValidateSamples(dataclasses.replace(config.validate, full_decode=False))

    def __call__(self, batch: Batch) -> Iterator[Batch]:
        cfg: ReadConfig = self.config
        for shard_index, uris in zip(batch["shard_index"], batch["uris"], strict=True):
            shard = {"shard_index": int(shard_index), "uris": list(uris)}
            sid = shard_id(shard["uris"][0])
            yield from closed(
                self._rows(shard, sid), cfg.columns, sid, shard["uris"][0], {CLIP_IMG: empty(CLIP_IMG)}
            )

    def _rows(self, shard: dict[str, Any], sid: str) -> Iterator[Batch]:
        cfg: ReadConfig = self.config
        kept = shard_rows(cfg.kept_keys, sid, [], cfg.storage_options) if cfg.kept_keys else None
        stored = shard_rows(cfg.scores, sid, [CLIP_IMAGE_EMBEDS], cfg.storage_options) if cfg.scores else {}
        seen: set[str] = set()
        for rows in read_shard(cfg.source, shard):
            keep = np.asarray([kept is None or str(k) in kept for k in rows[KEY]], dtype=bool)
            rows = drop_repeated_keys(
                self.validate({c: v[keep] for c, v in rows.items()}), seen, step="encode"
            )
            if cfg.scores:
                rows[CLIP_IMG] = tensor_column(
                    CLIP_IMG, [stored.get(str(k), {}).get(CLIP_IMAGE_EMBEDS) for k in rows[KEY]]
                )
            yield rows


@dataclass(frozen=True, kw_only=True)
class PreprocessStepConfig:
    preprocess: PreprocessConfig
    stage_a: bool = False
    max_pixels: int = PILLOW_MAX_PIXELS


class PreprocessImages(Step):
    """Decode once, crop (center or aspect bucket) for effnet, optionally crop 1024² for Stage A (CPU tasks)."""

    name = "preprocess"
    requires = (KEY, IMAGE)
    produces = (PIXELS, STAGE_A_PIXELS, BUCKET, ORIG_WIDTH, ORIG_HEIGHT, CROP_LEFT, CROP_TOP, CROP_RIGHT,
                CROP_BOTTOM, IMAGE_SHA256)  # fmt: skip

    def __call__(self, batch: Batch) -> Batch:
        import torch

        cfg: PreprocessStepConfig = self.config
        n = len(batch[KEY])
        pixels, stage_a = [None] * n, [None] * n
        ints = {
            c: np.zeros(n, np.int32)
            for c in (ORIG_WIDTH, ORIG_HEIGHT, CROP_LEFT, CROP_TOP, CROP_RIGHT, CROP_BOTTOM)
        }
        buckets, shas = [""] * n, [""] * n
        for i in healthy(batch):
            data = bytes(batch[IMAGE][i])
            try:
                image = torch.from_numpy(to_float_chw(decode_rgb(data, max_pixels=cfg.max_pixels)))
            except ImageError as exc:
                reject(batch, i, self.name, exc.reason, exc.detail)
                continue
            crop = crop_for_encoding(image, cfg.preprocess)
            pixels[i] = crop.pixels.numpy()
            if cfg.stage_a:
                stage_a[i] = crop_for_stage_a(image, cfg.preprocess).pixels.numpy()
            buckets[i] = bucket_name(*crop.bucket)
            ints[ORIG_HEIGHT][i], ints[ORIG_WIDTH][i] = crop.orig
            ints[CROP_LEFT][i], ints[CROP_TOP][i], ints[CROP_RIGHT][i], ints[CROP_BOTTOM][i] = crop.crop_box
            shas[i] = hashlib.sha256(data).hexdigest()
        batch[IMAGE] = object_column([b""] * n)  # the bytes are not needed downstream
        out = ints | {
            PIXELS: tensor_column(PIXELS, pixels),
            BUCKET: object_column(buckets),
            IMAGE_SHA256: object_column(shas),
        }
        if cfg.stage_a:
            out[STAGE_A_PIXELS] = tensor_column(STAGE_A_PIXELS, stage_a)
        return batch | out
