"""The training crops of cached samples, recomputed from their original images (for ControlNet inputs).

The cache records each sample's source shard and bucket; the crop that effnet saw is ``crop_for_encoding``
of the decoded image at the bucket's pixel size, with the cache's interpolation and antialias settings. A
window reads each source shard it needs once. ``images`` relocates the shards: a shard recorded as
``.../00012.tar`` is read from ``{images.path}/00012.tar`` (with its storage options).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np

from pipelines.core.images import PILLOW_MAX_PIXELS, decode_rgb, to_float_chw
from pipelines.core.preprocess import PreprocessConfig, crop_for_encoding
from pipelines.core.sources import SourceConfig, read_shard
from schemas.columns import IMAGE, KEY


@dataclass(frozen=True)
class CropSpec:
    """Where the source shards are and how the cache resized them."""

    images: SourceConfig | None = None
    interpolation: str = "bilinear"
    antialias: bool = True

    def shard_uri(self, recorded: str) -> str:
        if self.images is None:
            return recorded
        return f"{self.images.path.rstrip('/')}/{posixpath.basename(recorded)}"

    def source(self, uri: str) -> SourceConfig:
        endpoint = self.images.endpoint_url if self.images is not None else None
        return SourceConfig(kind="webdataset", path=uri, endpoint_url=endpoint)


def crop_spec(cache_path: str, images: SourceConfig | None, storage_options: dict[str, Any]) -> CropSpec:
    """The cache's resize settings (from its manifest) with the shard location."""
    with fsspec.open(f"{cache_path.rstrip('/')}/manifest.json", "rb", **storage_options) as f:
        effnet = json.load(f)["preprocessing"]["effnet"]
    return CropSpec(images, effnet["interpolation"], bool(effnet["antialias"]))


def training_crops(samples: Sequence[tuple[str, str, tuple[int, int]]], spec: CropSpec) -> list[np.ndarray]:
    """(3, H, W) uint8 crops of ``(source shard, key, (H, W) bucket pixels)`` samples; each shard read once."""
    wanted: dict[str, set[str]] = {}
    for shard, key, _ in samples:
        wanted.setdefault(spec.shard_uri(shard), set()).add(key)
    found: dict[tuple[str, str], bytes] = {}
    for uri, keys in wanted.items():
        for batch in read_shard(spec.source(uri), {"shard_index": 0, "uris": [uri]}):
            for key, data in zip(batch[KEY], batch[IMAGE], strict=True):
                if key in keys and data is not None:
                    found[(uri, str(key))] = data
    config = PreprocessConfig(interpolation=spec.interpolation, antialias=spec.antialias)
    out = []
    for shard, key, size_hw in samples:
        data = found.get((spec.shard_uri(shard), key))
        if data is None:
            raise FileNotFoundError(f"sample {key!r} is not in its source shard {spec.shard_uri(shard)!r}")
        image = to_float_chw(decode_rgb(data, max_pixels=PILLOW_MAX_PIXELS))
        crop = crop_for_encoding(image, config, target=size_hw).pixels
        out.append((crop * 255).round().clamp(0, 255).byte().numpy())
    return out
