"""The steps of the encode pipeline: read (with kept keys and stored CLIP-L embeddings), preprocess on CPU,
one actor pool per model (EfficientNet, Stage A, CLIP-bigG text, CLIP-L image), and the staged writer.

Each model step loads its model once per actor, runs it on sub-batches of equal shape (aspect buckets give
ragged batches), and returns float32 arrays; the writer converts them to the stored dtype once.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.images import PILLOW_MAX_PIXELS, ImageError, decode_rgb, to_float_chw
from pipelines.ingest import drop_repeated_keys
from pipelines.preprocess import PreprocessConfig, bucket_name, crop_for_encoding, crop_for_stage_a
from pipelines.sink import list_parquet
from pipelines.sources import READ_COLUMNS, SourceConfig, read_shard
from pipelines.step import Batch, Step, healthy, object_column, reject
from pipelines.validate import ValidateConfig, ValidateSamples
from schemas.columns import (
    BUCKET,
    CAPTION,
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
    SOURCE,
    STAGE_A,
)

PIXELS = "pixels"  # (3, h, w) float32 in [0, 1]: the effnet input after crop/bucket
STAGE_A_PIXELS = "stage_a_pixels"  # (3, 1024, 1024) float32: the Stage A input
SHARD_ID = "shard_id"
# Rank of every per-row tensor column. Rows without a value (rejected, or not computed yet) hold an empty
# array of that rank instead of None, so Ray Data sees one tensor type per column across all batches.
RANKS = {PIXELS: 3, STAGE_A_PIXELS: 3, EFFNET: 3, STAGE_A: 3, CLIP_TEXT: 2, CLIP_TEXT_POOLED: 1, CLIP_IMG: 1}


def empty(column: str) -> np.ndarray:
    """The placeholder of a tensor column for a row without a value."""
    return np.zeros((0,) * RANKS[column], dtype=np.float32)


def has_value(value: Any) -> bool:
    return value is not None and np.asarray(value).size > 0


def tensor_column(column: str, values: list[Any]) -> np.ndarray:
    """An object column of float32 arrays, placeholders where a row has no value."""
    return object_column(np.asarray(v, dtype=np.float32) if has_value(v) else empty(column) for v in values)


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """One model of the encode job: a flavor, its weights (a local path or fsspec URL) and where it runs."""

    flavor: str
    weights: str | None = None
    device: str = "cpu"
    bf16_autocast: bool = False
    batch_size: int = 16

    def __post_init__(self) -> None:
        from stages.flavors import get_flavor

        flavor = get_flavor(self.flavor)
        if self.weights is None and not flavor.tiny:
            raise ValueError(
                f"weights is required for flavor {self.flavor} (only */tiny flavors run on random weights)"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")

    def build(self) -> Any:
        """Build the model in eval mode (seeded random init for tiny flavors); returns (model, sha256)."""
        from stages.flavors import build_model

        return build_model(self.flavor, weights=self.weights, device=self.device)


@dataclass(frozen=True, kw_only=True)
class ReadConfig:
    """What the encode read step needs besides the shard: which keys to keep, and stored CLIP-L embeddings."""

    source: SourceConfig
    kept_keys: str | None = None
    scores_dir: str | None = None
    validate: ValidateConfig = dataclasses.field(default_factory=ValidateConfig)


def _shard_id(uri: str) -> str:
    """An input shard's id: its file name without extension (``.../00012.tar`` → ``00012``)."""
    return uri.rstrip("/").rsplit("/", 1)[-1].split(".", 1)[0]


def _keys_for_shard(path: str, shard_id: str, columns: list[str], storage_options: dict) -> dict[str, dict]:
    """Rows of a Parquet directory (``kept_keys`` or scores) whose ``source`` is this shard, keyed by ``key``."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    files, fs = list_parquet(path, storage_options)
    dataset = pads.dataset(files, format="parquet", filesystem=fs)
    table = dataset.to_table(
        columns=["key", *columns], filter=pc.ends_with(pc.field("source"), f"/{shard_id}.tar")
    )
    return dict(zip(table["key"].to_pylist(), table.select(columns).to_pylist(), strict=True))


class EncodeRead(Step):
    """Shard rows → validated sample rows of the kept keys, with stored CLIP-L embeddings attached.

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
            shard_id = _shard_id(shard["uris"][0])
            options = cfg.source.storage_options
            kept = _keys_for_shard(cfg.kept_keys, shard_id, [], options) if cfg.kept_keys else None
            stored = (
                _keys_for_shard(cfg.scores_dir, shard_id, [CLIP_IMAGE_EMBEDS], options)
                if cfg.scores_dir
                else {}
            )
            seen: set[str] = set()
            for rows in read_shard(cfg.source, shard):
                keep = np.asarray([kept is None or str(k) in kept for k in rows[KEY]], dtype=bool)
                rows = {c: v[keep] for c, v in rows.items()}
                if not len(rows[KEY]):
                    continue
                rows = drop_repeated_keys(self.validate(rows), seen, step="encode")
                rows[SHARD_ID] = object_column([shard_id] * len(rows[KEY]))
                if cfg.scores_dir:
                    rows[CLIP_IMG] = object_column(
                        np.asarray(stored[str(k)][CLIP_IMAGE_EMBEDS], np.float32)
                        if str(k) in stored
                        else None
                        for k in rows[KEY]
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


def _by_shape(batch: Batch, column: str) -> dict[tuple[int, ...], list[int]]:
    groups: dict[tuple[int, ...], list[int]] = {}
    for i in healthy(batch):
        value = batch[column][i]
        if has_value(value):
            groups.setdefault(tuple(value.shape), []).append(int(i))
    return groups


class _ModelStep(Step):
    """Loads one model per actor; runs it on equal-shape sub-batches under no_grad (and bf16 autocast)."""

    stateful = True
    source_column = ""
    output_columns: tuple[str, ...] = ()

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__(config)
        import torch

        self.torch = torch
        self.model, self.sha256 = config.build()

    def _run(self, inputs: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        torch = self.torch
        n = len(batch[KEY])
        outputs = {c: [None] * n for c in self.output_columns}
        device = torch.device(self.config.device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.bf16_autocast)
        for rows in self._groups(batch):
            for start in range(0, len(rows), self.config.batch_size):
                chunk = rows[start : start + self.config.batch_size]
                with torch.no_grad(), autocast:
                    results = self._run(self._inputs(batch, chunk))
                for column, result in zip(self.output_columns, results, strict=True):
                    values = result.float().cpu().numpy()
                    for j, i in enumerate(chunk):
                        outputs[column][i] = values[j]
        return batch | {c: tensor_column(c, v) for c, v in outputs.items()}

    def _groups(self, batch: Batch) -> list[list[int]]:
        return list(_by_shape(batch, self.source_column).values())

    def _inputs(self, batch: Batch, rows: list[int]) -> Any:
        stacked = np.stack([batch[self.source_column][i] for i in rows])
        return self.torch.from_numpy(stacked).to(self.config.device)


class EncodeEffnet(_ModelStep):
    name = "effnet"
    requires = (PIXELS,)
    produces = (EFFNET,)
    source_column, output_columns = PIXELS, (EFFNET,)

    def _run(self, pixels: Any) -> tuple[Any, ...]:
        return (self.model.encode(pixels),)


class EncodeStageA(_ModelStep):
    name = "stage_a"
    requires = (STAGE_A_PIXELS,)
    produces = (STAGE_A,)
    source_column, output_columns = STAGE_A_PIXELS, (STAGE_A,)

    def _run(self, pixels: Any) -> tuple[Any, ...]:
        return (self.model.encode(pixels),)  # unquantized latent / 0.43


class EncodeImage(_ModelStep):
    """CLIP-L ``image_embeds`` of the encode crop (the official training path); rows that already carry a
    stored embedding (from ``cascade score``) keep it."""

    name = "clip_image"
    requires = (PIXELS,)
    produces = (CLIP_IMG,)
    source_column, output_columns = PIXELS, (CLIP_IMG,)

    def _groups(self, batch: Batch) -> list[list[int]]:
        stored = batch.get(CLIP_IMG)
        todo = {
            k: [i for i in rows if stored is None or stored[i] is None]
            for k, rows in _by_shape(batch, PIXELS).items()
        }
        return [rows for rows in todo.values() if rows]

    def __call__(self, batch: Batch) -> Batch:
        stored = batch.get(CLIP_IMG)
        out = super().__call__(batch)
        if stored is not None:
            out[CLIP_IMG] = object_column(
                s if s is not None else c for s, c in zip(stored, out[CLIP_IMG], strict=True)
            )
        return out

    def _run(self, pixels: Any) -> tuple[Any, ...]:
        return (self.model(pixels),)


class EncodeText(_ModelStep):
    """CLIP-bigG text: ``hidden_states[-1]`` (77×1280) and pooled ``text_embeds`` (1×1280) per caption."""

    name = "clip_text"
    requires = (CAPTION,)
    produces = (CLIP_TEXT, CLIP_TEXT_POOLED)
    output_columns = (CLIP_TEXT, CLIP_TEXT_POOLED)

    def _groups(self, batch: Batch) -> list[list[int]]:
        rows = [int(i) for i in healthy(batch)]
        return [rows] if rows else []

    def _inputs(self, batch: Batch, rows: list[int]) -> Any:
        captions = batch[CAPTION]
        return [
            c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
            for c in (captions[i] for i in rows)
        ]

    def _run(self, captions: Any) -> tuple[Any, ...]:
        clip_text, pooled = self.model(captions)
        return clip_text, pooled.squeeze(1)


def encode_captions(config: EncoderConfig, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Text conditions for a few captions outside the pipeline (the dataset's empty-caption embedding)."""
    step = EncodeText(config)
    batch = {KEY: object_column(range(len(captions))), CAPTION: object_column(captions),
             SOURCE: object_column([""] * len(captions))}  # fmt: skip
    out = step(batch)
    return np.stack(list(out[CLIP_TEXT])), np.stack(list(out[CLIP_TEXT_POOLED]))
