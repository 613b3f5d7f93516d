"""What the app's Cache tab shows of a ``cascade encode`` output, a page of rows at a time, without Ray.

``CacheView.open`` reads the manifest only: the buckets, and per bucket the Parquet files (one per input shard)
with their row counts. ``rows(file, page)`` reads the scalar columns of one file (key, caption, source shard,
crop box: small), and the effnet latents of that page's rows only (``pyarrow.dataset`` ``take`` reads the row
groups that hold them). ``original_crops`` cuts each row's crop box out of its source image, found by key in its
source shard (``pipelines.core.lookup``), so the decode and the pixels it came from sit side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow.dataset as pads
from PIL import Image

from pipelines.core.commits import read_manifest
from pipelines.core.images import PILLOW_MAX_PIXELS, ImageError, decode_rgb
from pipelines.core.latents_reader import committed_records, table_to_batch
from pipelines.core.lookup import find_samples
from schemas import columns as c

SHOWN_COLUMNS = (c.KEY, c.CAPTION, c.SOURCE_SHARD, c.BUCKET, c.ORIG_WIDTH, c.ORIG_HEIGHT, c.CROP_LEFT, c.CROP_TOP,
                 c.CROP_RIGHT, c.CROP_BOTTOM)  # fmt: skip


@dataclass
class CacheView:
    """An encode output's Parquet files by bucket (``{bucket: [(path relative to root, rows), ...]}``)."""

    root: str
    buckets: dict[str, list[tuple[str, int]]]
    random_weights: bool
    storage_options: dict[str, Any]

    @classmethod
    def open(cls, root: str, storage_options: dict[str, Any] | None = None) -> CacheView:
        options = storage_options or {}
        records = committed_records(root, options)
        if not records:
            raise FileNotFoundError(f"latents_dir={root!r} holds no committed cascade encode output")
        buckets: dict[str, list[tuple[str, int]]] = {}
        for record in records.values():
            for entry in record.get("files", ()):
                if isinstance(entry, dict) and entry["path"].startswith("parquet/"):
                    bucket = entry.get("bucket") or entry["path"].split("/")[1]
                    buckets.setdefault(bucket, []).append((entry["path"], int(entry.get("rows", 0))))
        manifest = read_manifest(root, options) or {}
        return cls(root.rstrip("/"), {b: sorted(f) for b, f in sorted(buckets.items())},
                   bool(manifest.get("random_weights")), options)  # fmt: skip

    def rows(self, file: str, page: int = 0, per_page: int = 8) -> tuple[list[dict[str, Any]], np.ndarray]:
        """One page of a file's rows (the ``SHOWN_COLUMNS``) and their effnet latents as float32 (N, 16, h, w)."""
        fs, path = fsspec.core.url_to_fs(f"{self.root}/{file}", **self.storage_options)
        dataset = pads.dataset(path, format="parquet", filesystem=fs)
        shown = [name for name in SHOWN_COLUMNS if name in dataset.schema.names]
        table = dataset.to_table(columns=shown)
        indices = list(range(page * per_page, min(table.num_rows, (page + 1) * per_page)))
        if not indices:
            return [], np.zeros((0, 16, 1, 1), dtype=np.float32)
        latents = dataset.take(indices, columns=[c.KEY, c.EFFNET])
        latents = latents.replace_schema_metadata(dataset.schema.metadata)
        effnet = table_to_batch(latents, float32=True)[c.EFFNET]
        return table.take(indices).to_pylist(), effnet

    def original_crops(self, rows: list[dict[str, Any]], size_px: int = 256) -> dict[str, Image.Image]:
        """key → the crop box of the row's source image (what the latent encodes), long side ``size_px``."""
        found = find_samples(((r.get(c.SOURCE_SHARD) or "", r[c.KEY]) for r in rows),
                             self.storage_options.get("endpoint_url"))  # fmt: skip
        crops = {}
        for row in rows:
            sample = found.get(row[c.KEY])
            if sample is None:
                continue
            try:
                image = Image.fromarray(decode_rgb(sample["image"], max_pixels=PILLOW_MAX_PIXELS))
            except ImageError:
                continue
            box = tuple(int(row[k]) for k in (c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM))
            crop = image.crop(box)
            crop.thumbnail((size_px, size_px))
            crops[row[c.KEY]] = crop
        return crops
