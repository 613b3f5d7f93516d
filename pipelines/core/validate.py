"""ValidateSamples: the first step after ingest; it turns every unusable sample into a reject, never a crash.

Per healthy row, in order: the key is present, the caption decodes (UTF-8) and is neither empty nor too
long, ``meta_json`` is a JSON object, the image is in an allowed format (``formats``, the format policy of
``pipelines.core.images``) with a sane header (no bomb; not too small; no extreme aspect), the image fully
decodes once (catches truncation), and the key was not already accepted earlier in the same batch (the first
accepted occurrence wins). Duplicates *across* batches are the pipeline's job: it sees every key (the shard
readers already reject a repeated key, keeping the first). Any unexpected exception becomes the reject
"unexpected error" with the exception text.

With ``allow_empty_caption`` a sample without a caption (no ``.txt``: clip-retrieval style shards, a
caption-less Parquet row or folder image) or with a blank one gets the empty caption ``""``; encode gives it
the dataset's stored empty-caption embedding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.core.images import (
    DEFAULT_FORMATS,
    PILLOW_MAX_PIXELS,
    ImageError,
    check_formats,
    check_geometry,
    decode_rgb,
    probe_image,
)
from pipelines.core.step import (
    Batch,
    Step,
    batch_size,
    healthy,
    object_column,
    reject,
    with_reject_columns,
)
from schemas.columns import (
    CAPTION,
    HEIGHT,
    IMAGE,
    IMAGE_FORMAT,
    KEY,
    META_JSON,
    REJECT_COLUMNS,
    REJECT_REASON,
    SOURCE,
    WIDTH,
)


@dataclass(frozen=True, kw_only=True)
class ValidateConfig:
    """Rules that make a sample usable at all (quality filtering comes later, from persisted scores).

    Attributes:
        max_pixels: refuse images whose header claims more pixels ("decompression bomb"); at most
            ``PIL.Image.MAX_IMAGE_PIXELS``, above which Pillow refuses them anyway.
        min_side_px: refuse images whose shorter side is smaller ("too small").
        max_aspect_ratio: refuse images whose long/short side ratio is larger ("extreme aspect ratio").
        max_caption_bytes: refuse captions longer than this in UTF-8 ("caption too long").
        allow_empty_caption: accept a missing, empty or whitespace-only caption as the empty caption ``""``
            instead of rejecting it ("missing caption", "empty caption").
        formats: Pillow format ids accepted (any of ``pipelines.core.images.SUPPORTED_FORMATS``; default
            ``DEFAULT_FORMATS``). Bytes Pillow reads as another supported format are rejected as
            "format X not allowed (validate.formats)"; bytes no plugin recognises are "not an image".
        full_decode: decode every image once to catch truncation; a pipeline that decodes right after
            (encode) turns it off and reports truncation from its own decode.
    """

    max_pixels: int = PILLOW_MAX_PIXELS
    min_side_px: int = 8
    max_aspect_ratio: float = 20.0
    max_caption_bytes: int = 10_000
    allow_empty_caption: bool = False
    formats: tuple[str, ...] = DEFAULT_FORMATS
    full_decode: bool = True

    def __post_init__(self) -> None:
        pillow_limit = Image.MAX_IMAGE_PIXELS
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels!r} must be an int >= 1")
        if pillow_limit is not None and self.max_pixels > pillow_limit:
            raise ValueError(
                f"max_pixels={self.max_pixels} must be <= PIL.Image.MAX_IMAGE_PIXELS={pillow_limit}: Pillow "
                "refuses larger images as decompression bombs; raise that limit first"
            )
        if not isinstance(self.min_side_px, int) or self.min_side_px < 1:
            raise ValueError(f"min_side_px={self.min_side_px!r} must be an int >= 1")
        if not self.max_aspect_ratio >= 1.0:
            raise ValueError(f"max_aspect_ratio={self.max_aspect_ratio!r} must be >= 1.0")
        if not isinstance(self.max_caption_bytes, int) or self.max_caption_bytes < 1:
            raise ValueError(f"max_caption_bytes={self.max_caption_bytes!r} must be an int >= 1")
        if not isinstance(self.allow_empty_caption, bool):
            raise ValueError(f"allow_empty_caption={self.allow_empty_caption!r} must be a bool")
        object.__setattr__(self, "formats", check_formats(self.formats, "formats"))


class _Reject(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def _text(value: Any, what: str) -> str | None:
    """bytes/str -> str (UTF-8, BOM dropped); None stays None."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview | np.bytes_):
        try:
            return bytes(value).decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise _Reject(f"{what} not utf-8", str(e)) from e
    raise _Reject(f"{what} not text", f"got {type(value).__name__}")


def _as_bytes(value: Any) -> bytes:
    if value is None:
        raise _Reject("missing image")
    if isinstance(value, bytes | bytearray | memoryview | np.bytes_):
        return bytes(value)
    raise _Reject("not an image", f"image column holds {type(value).__name__}, not bytes")


class ValidateSamples(Step):
    """Reject samples that cannot be used; report format and upright size of the others.

    Returns every input column (``caption`` and ``meta_json`` normalised to ``str``; ``""`` where they could
    not be decoded), plus ``image_format``/``width``/``height`` (``""``/0/0 on rejected rows) and the reject
    columns, with the same number of rows.
    """

    name = "validate"
    requires = (KEY, SOURCE, CAPTION, IMAGE, META_JSON)
    produces = (IMAGE_FORMAT, WIDTH, HEIGHT)
    stateful = False

    def __init__(self, config: ValidateConfig) -> None:
        if not isinstance(config, ValidateConfig):
            raise TypeError(f"config must be a ValidateConfig, got {type(config).__name__}")
        super().__init__(config)

    def __call__(self, batch: Batch) -> Batch:
        missing = [c for c in self.requires if c not in batch]
        if missing:
            raise ValueError(f"{self.name}: batch lacks columns {missing}; it has {sorted(batch)}")
        out = dict(batch)
        for column in REJECT_COLUMNS:  # writable copies: Ray may hand out read-only arrays
            if column in out:
                out[column] = object_column(out[column])
        with_reject_columns(out)
        n = batch_size(out)
        captions = [c if isinstance(c, str) else "" for c in out[CAPTION]]
        metas = [m if isinstance(m, str) else "" for m in out[META_JSON]]
        formats, widths, heights = [""] * n, np.zeros(n, np.int64), np.zeros(n, np.int64)
        accepted_keys: set[str] = set()
        for row in healthy(out):
            try:
                captions[row], metas[row] = self._texts(out, row)
                formats[row], widths[row], heights[row] = self._image(out[IMAGE][row])
                key = out[KEY][row]
                if key in accepted_keys:
                    raise _Reject("duplicate key", f"{key!r} already accepted earlier in this batch")
                accepted_keys.add(key)
            except (_Reject, ImageError) as e:
                reject(out, row, self.name, e.reason, e.detail)
            except Exception as e:  # a row never crashes the job
                reject(out, row, self.name, "unexpected error", f"{type(e).__name__}: {e}")
            if out[REJECT_REASON][row]:
                widths[row] = heights[row] = 0
                formats[row] = ""
        out[CAPTION], out[META_JSON] = object_column(captions), object_column(metas)
        out[IMAGE_FORMAT], out[WIDTH], out[HEIGHT] = object_column(formats), widths, heights
        return out

    def _texts(self, batch: Batch, row: int) -> tuple[str, str]:
        key = batch[KEY][row]
        if key is None or not isinstance(key, str) or not key:
            raise _Reject("missing key", f"key={key!r}")
        caption = _text(batch[CAPTION][row], "caption")
        if caption is None and not self.config.allow_empty_caption:
            raise _Reject(
                "missing caption", 'no caption (set validate.allow_empty_caption to accept it as "")'
            )
        if caption is None or not caption.strip():
            if not self.config.allow_empty_caption:
                raise _Reject("empty caption", repr(caption[:100]))
            caption = ""  # the empty caption: encode gives it the stored empty-caption embedding
        try:
            size = len(caption.encode("utf-8"))
        except UnicodeEncodeError as e:  # lone surrogates: Arrow could not store the string
            raise _Reject("caption not utf-8", str(e)) from e
        if size > self.config.max_caption_bytes:
            raise _Reject("caption too long", f"{size} bytes > {self.config.max_caption_bytes}")
        meta = _text(batch[META_JSON][row], "meta_json")
        try:
            parsed = json.loads(meta) if meta is not None else None
        except json.JSONDecodeError as e:
            raise _Reject("bad meta json", str(e)) from e
        if not isinstance(parsed, dict):
            raise _Reject("bad meta json", f"expected a JSON object, got {type(parsed).__name__}")
        return caption, meta

    def _image(self, value: Any) -> tuple[str, int, int]:
        data, cfg = _as_bytes(value), self.config
        info = probe_image(data, max_pixels=cfg.max_pixels, formats=cfg.formats)
        check_geometry(
            info.width, info.height, min_side_px=cfg.min_side_px, max_aspect_ratio=cfg.max_aspect_ratio
        )
        if not cfg.full_decode:
            return info.format, info.width, info.height
        rgb = decode_rgb(data, max_pixels=cfg.max_pixels, formats=cfg.formats)
        height, width = rgb.shape[:2]  # authoritative: a PNG's eXIf may only show up after decoding
        return info.format, width, height


def drop_repeated_keys(batch: Batch, seen: set[str], step: str = "ingest") -> Batch:
    """Reject rows whose key was already seen in this shard (the first occurrence wins)."""
    for i in healthy(batch):
        key = str(batch[KEY][i])
        if key in seen:
            reject(
                batch, i, step, "duplicate key", f"key {key!r} appears more than once in {batch[SOURCE][i]}"
            )
        else:
            seen.add(key)
    return batch
