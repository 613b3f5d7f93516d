"""Find a few samples by key in their source shards, and make thumbnails of them (no Ray).

Pages that show images (the dedup report, the app's Explore and Cache tabs) know each sample's ``source``: the
URI of the image–text shard it came from (a WebDataset tar). A tar has no index, so a shard is streamed in small
batches and the read stops as soon as every wanted key of it was seen: a page of 12 images costs at most one
partial read of each shard that holds one of them, never a scan of the dataset.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterable
from typing import Any

from PIL import Image

from pipelines.core.images import PILLOW_MAX_PIXELS, ImageError, decode_rgb
from pipelines.core.sources import SourceConfig, caption_text, read_shard
from schemas.columns import CAPTION, IMAGE, KEY

LOOKUP_BATCH_ROWS = 32


def find_samples(
    wanted: Iterable[tuple[str, str]], endpoint_url: str | None = None
) -> dict[str, dict[str, Any]]:
    """``{key: {"image": bytes, "caption": str}}`` for the ``(source, key)`` pairs found; a shard that moved or
    cannot be read leaves its keys out (the page says "image not found")."""
    by_source: dict[str, set[str]] = {}
    for source, key in wanted:
        if source:
            by_source.setdefault(source, set()).add(key)
    found: dict[str, dict[str, Any]] = {}
    for source, keys in sorted(by_source.items()):
        config = SourceConfig(kind="webdataset", path=source.rsplit("/", 1)[0], endpoint_url=endpoint_url,
                              batch_rows=LOOKUP_BATCH_ROWS)  # fmt: skip
        missing = set(keys)
        try:
            for batch in read_shard(config, {"shard_index": 0, "uris": [source]}):
                for key, image, caption in zip(batch[KEY], batch[IMAGE], batch[CAPTION], strict=True):
                    if key in missing and image is not None:
                        found[str(key)] = {"image": bytes(image), "caption": caption_text(caption)}
                        missing.discard(key)
                if not missing:
                    break  # the rest of the shard is never read
        except Exception:  # moved, gone, no credentials, corrupt: every reader error means "not found" here
            continue
    return found


def thumbnail(data: Any, size_px: int) -> Image.Image | None:
    """An RGB thumbnail (long side ``size_px``) of encoded image bytes; None when they do not decode."""
    try:
        image = Image.fromarray(decode_rgb(bytes(data), max_pixels=PILLOW_MAX_PIXELS))
    except (ImageError, TypeError):
        return None
    image.thumbnail((size_px, size_px))
    return image


def jpeg_data_uri(image: Image.Image, quality: int = 85) -> str:
    """An inline ``data:image/jpeg`` URI, for self-contained HTML pages."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()
