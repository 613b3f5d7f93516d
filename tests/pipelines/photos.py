"""Real photos for pipeline tests: scikit-image's sample images with human captions (tests/data)."""

from __future__ import annotations

import io
import json
from functools import cache, lru_cache

import numpy as np
from PIL import Image
from skimage import data as skdata

from tests.conftest import TEST_DATA

PHOTOS = ("chelsea", "astronaut", "rocket", "coffee", "camera")


@lru_cache(maxsize=1)
def captions() -> dict[str, str]:
    rows = [json.loads(line) for line in (TEST_DATA / "skimage_captions.jsonl").read_text().splitlines()]
    return {r["skimage_name"]: r["caption"] for r in rows}


@cache
def jpeg(name: str, quality: int = 90) -> bytes:
    """A scikit-image photo as JPEG bytes (grey images become RGB)."""
    array = np.asarray(getattr(skdata, name)())
    image = Image.fromarray(array).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo_tar(names: tuple[str, ...] = PHOTOS) -> bytes:
    """The photos as a WebDataset tar (``name.jpg`` + ``name.txt``)."""
    from pipelines.core.shards import members_tar_bytes

    return members_tar_bytes((n, {"jpg": jpeg(n), "txt": captions()[n].encode()}) for n in names)


def photo_shards(root, n_shards: int) -> set[str]:
    """``n_shards`` WebDataset shards ``NNNNN.tar`` of the photos, keys ``s<shard>_<name>`` unique across them;
    returns the keys."""
    from pipelines.core.shards import members_tar_bytes

    root.mkdir(parents=True, exist_ok=True)
    keys: set[str] = set()
    for s in range(n_shards):
        members = [(f"s{s}_{n}", {"jpg": jpeg(n), "txt": captions()[n].encode()}) for n in PHOTOS]
        (root / f"{s:05d}.tar").write_bytes(members_tar_bytes(members))
        keys |= {key for key, _ in members}
    return keys
