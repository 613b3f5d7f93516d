"""A planted-duplicate set from real photos: each original with copies under the transforms web copies go
through, and the measures of how well a dedup output finds them (precision and recall per transform, per kind).

Originals: scikit-image's photos and the larger real web images of ``tests/data/fondant_cc_web_sample.parquet``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from functools import cache

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageEnhance, ImageFont
from skimage import data as skdata

from tests.conftest import TEST_DATA

SKIMAGE = ("astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
           "brick", "grass", "gravel", "moon", "coins")  # fmt: skip
WEB_ROWS = (31, 32, 37, 38, 39)  # fondant rows at least 300 px on the short side (34-36 are blank white)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _resize(factor: float) -> Callable[[Image.Image], bytes]:
    return lambda im: _jpeg(im.resize((max(8, round(im.width * factor)), max(8, round(im.height * factor))),
                                      Image.Resampling.LANCZOS))  # fmt: skip


def _crop(im: Image.Image) -> bytes:
    dx, dy = round(im.width * 0.05), round(im.height * 0.05)
    return _jpeg(im.crop((dx, dy, im.width - dx, im.height - dy)))


def _jitter(im: Image.Image) -> bytes:
    im = ImageEnhance.Brightness(im.convert("RGB")).enhance(1.08)
    return _jpeg(ImageEnhance.Color(ImageEnhance.Contrast(im).enhance(0.92)).enhance(1.1))


def _overlay(im: Image.Image) -> bytes:
    im = im.convert("RGB")
    draw = ImageDraw.Draw(im)
    size = max(10, im.height // 12)
    draw.text((im.width // 20, im.height - 2 * size), "© stock-photos.example", fill=(255, 255, 255),
              font=ImageFont.load_default(size=size), stroke_width=max(1, size // 10), stroke_fill=(0, 0, 0))  # fmt: skip
    return _jpeg(im)


TRANSFORMS: dict[str, Callable[[Image.Image], bytes]] = {
    "resize_half": _resize(0.5),
    "resize_quarter": _resize(0.25),
    "jpeg_q30": lambda im: _jpeg(im, quality=30),
    "center_crop_90": _crop,
    "hflip": lambda im: _jpeg(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
    "colour_jitter": _jitter,
    "text_overlay": _overlay,
}


@cache
def originals() -> dict[str, Image.Image]:
    images = {name: Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB") for name in SKIMAGE}
    web = pq.read_table(TEST_DATA / "fondant_cc_web_sample.parquet", columns=["data"])["data"].to_pylist()
    for row in WEB_ROWS:
        images[f"web{row}"] = Image.open(io.BytesIO(web[row])).convert("RGB")
    return images


@cache
def planted() -> dict[str, tuple[bytes, str, str]]:
    """key → (JPEG bytes, original name, transform): each original, a byte-identical copy, and one copy per
    transform. Keys are ``<original>`` and ``<original>__<transform>`` (keys keep to [A-Za-z0-9_-])."""
    out = {}
    for name, image in originals().items():
        source = _jpeg(image)
        out[name] = (source, name, "original")
        out[f"{name}__exact"] = (source, name, "exact")
        for transform, make in TRANSFORMS.items():
            out[f"{name}__{transform}"] = (make(image), name, transform)
    return out


def measure(rows: list[dict]) -> dict:
    """Precision and recall of a dedup output (dedup@1 rows) on the planted set.

    Each copy pairs with its original: the pair is found when both end at the same kept key (``duplicate_of``,
    or the row itself when kept). Recall per transform counts found pairs; precision per kind counts the rows
    removed with that kind whose kept key comes from the same original.
    """
    truth = {key: original for key, (_, original, _) in planted().items()}
    by_key = {r["key"]: r for r in rows}
    kept = {k: (r["duplicate_of"] or k) for k, r in by_key.items()}
    recall: dict[str, dict] = {}
    for key, (_, original, transform) in planted().items():
        if transform == "original":
            continue
        entry = recall.setdefault(transform, {"pairs": 0, "found": 0, "by_kind": {}})
        entry["pairs"] += 1
        if kept[key] == kept[original]:
            entry["found"] += 1
            kind = by_key[key]["dedup_kind"] or by_key[original]["dedup_kind"]
            entry["by_kind"][kind] = entry["by_kind"].get(kind, 0) + 1
    precision: dict[str, dict] = {}
    for key, row in by_key.items():
        if row["dedup_kind"]:
            entry = precision.setdefault(row["dedup_kind"], {"removed": 0, "true": 0})
            entry["removed"] += 1
            entry["true"] += int(truth[row["duplicate_of"]] == truth[key])
    for entry in recall.values():
        entry["recall"] = entry["found"] / entry["pairs"]
    for entry in precision.values():
        entry["precision"] = entry["true"] / entry["removed"]
    return {"recall": recall, "precision": precision}
