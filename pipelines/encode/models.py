"""The model steps of the encode pipeline: one actor pool per model (EfficientNet, Stage A, CLIP-bigG text,
CLIP-L image). With Stage B conditioning on, the EfficientNet actor also encodes the resized Stage A crops
(``EncodeEffnetStageB``): one effnet per actor, the same weights and autocast for both.

Each step loads its model once per actor, runs it on sub-batches of equal shape (aspect buckets give ragged
batches), and returns float32 arrays; the writer converts them to the stored dtype once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.core.step import Batch, Step, healthy, object_column
from pipelines.encode.stage_b import resize_nearest
from pipelines.encode.steps import PIXELS, STAGE_A_PIXELS, STAGE_B_FLAT, has_value, tensor_column
from schemas.columns import CAPTION, CLIP_IMG, CLIP_TEXT, CLIP_TEXT_POOLED, EFFNET, KEY, SOURCE, STAGE_A


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
        for rows in self._groups(batch):
            for start in range(0, len(rows), self.config.batch_size):
                chunk = rows[start : start + self.config.batch_size]
                with torch.no_grad(), self._autocast():
                    results = self._run(self._inputs(batch, chunk))
                for column, result in zip(self.output_columns, results, strict=True):
                    values = result.float().cpu().numpy()
                    for j, i in enumerate(chunk):
                        outputs[column][i] = values[j]
        return batch | {c: tensor_column(c, v) for c, v in outputs.items()}

    def _autocast(self) -> Any:
        torch = self.torch
        device = torch.device(self.config.device)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.bf16_autocast)

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


@dataclass(frozen=True, kw_only=True)
class EffnetStageBConfig(EncoderConfig):
    """The effnet encoder plus the Stage B conditioning sizes it also encodes (``pipelines.encode.stage_b``)."""

    stage_b_cells: tuple[int, ...]

    @classmethod
    def of(cls, effnet: EncoderConfig, cells: Sequence[int]) -> EffnetStageBConfig:
        """``effnet`` (the encode config's effnet encoder) with the stored sizes ``cells``."""
        fields = {f.name: getattr(effnet, f.name) for f in dataclasses.fields(EncoderConfig)}
        return cls(**fields, stage_b_cells=tuple(cells))


class EncodeEffnetStageB(EncodeEffnet):
    """The effnet latent of the crop, and of the Stage A crop resized with NEAREST to 32s×32s px for every
    stored s (official train_b.py's conditioning), flattened into ``STAGE_B_FLAT`` in ascending s.

    Rows are batched by Stage A crop size (one size per file); each stored s is one effnet call per chunk of
    ``batch_size`` rows.
    """

    requires = (PIXELS, STAGE_A_PIXELS)
    produces = (EFFNET, STAGE_B_FLAT)

    def __call__(self, batch: Batch) -> Batch:
        out = super().__call__(batch)
        flat: list[Any] = [None] * len(batch[KEY])
        size = self.config.batch_size
        for rows in _by_shape(batch, STAGE_A_PIXELS).values():
            for start in range(0, len(rows), size):
                chunk = rows[start : start + size]
                stacked = np.stack([batch[STAGE_A_PIXELS][i] for i in chunk])
                values = self._stage_b(self.torch.from_numpy(stacked).to(self.config.device))
                for j, i in enumerate(chunk):
                    flat[i] = values[j]
        return out | {STAGE_B_FLAT: tensor_column(STAGE_B_FLAT, flat)}

    def _stage_b(self, pixels_bchw: Any) -> np.ndarray:
        torch = self.torch
        parts = []
        for cells in self.config.stage_b_cells:
            with torch.no_grad(), self._autocast():
                latents = self.model.encode(resize_nearest(pixels_bchw, cells))
            parts.append(latents.float().flatten(1))
        return torch.cat(parts, dim=1).cpu().numpy()


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
            k: [i for i in rows if stored is None or not has_value(stored[i])]
            for k, rows in _by_shape(batch, PIXELS).items()
        }
        return [rows for rows in todo.values() if rows]

    def __call__(self, batch: Batch) -> Batch:
        stored = batch.get(CLIP_IMG)
        out = super().__call__(batch)
        if stored is not None:
            out[CLIP_IMG] = object_column(
                s if has_value(s) else c for s, c in zip(stored, out[CLIP_IMG], strict=True)
            )
        return out

    def _run(self, pixels: Any) -> tuple[Any, ...]:
        return (self.model(pixels),)


class EncodeText(_ModelStep):
    """CLIP-bigG text: ``hidden_states[-1]`` (77×1280) and pooled ``text_embeds`` (1×1280) per caption.

    The empty caption ``""`` (caption-less samples) gets the embedding of ``""`` encoded alone, once per
    actor: the same values as the dataset's stored ``empty_caption.safetensors`` (``encode_captions``).
    """

    name = "clip_text"
    requires = (CAPTION,)
    produces = (CLIP_TEXT, CLIP_TEXT_POOLED)
    output_columns = (CLIP_TEXT, CLIP_TEXT_POOLED)
    _empty: tuple[np.ndarray, ...] | None = None

    def _groups(self, batch: Batch) -> list[list[int]]:
        rows = [int(i) for i in healthy(batch) if self._text(batch[CAPTION][i])]
        return [rows] if rows else []

    @staticmethod
    def _text(caption: Any) -> str:
        return caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)

    def _inputs(self, batch: Batch, rows: list[int]) -> Any:
        return [self._text(batch[CAPTION][i]) for i in rows]

    def __call__(self, batch: Batch) -> Batch:
        out = super().__call__(batch)
        empty = [int(i) for i in healthy(batch) if not self._text(batch[CAPTION][i])]
        if empty:
            if self._empty is None:
                with self.torch.no_grad(), self._autocast():
                    self._empty = tuple(r.float().cpu().numpy()[0] for r in self._run([""]))
            for column, value in zip(self.output_columns, self._empty, strict=True):
                for i in empty:
                    out[column][i] = value
        return out

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
