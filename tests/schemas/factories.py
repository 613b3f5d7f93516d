"""Realistic record batches and file metadata for the schema tests (numpy + pyarrow only)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from schemas import FileMetadata, preprocessing_hash, tensor_array
from schemas import columns as c

# Per-row tensor shapes: released flavors at 768 px, and tiny flavors (narrower CLIP widths).
REAL_SHAPES = {
    c.EFFNET: (16, 24, 24),
    c.CLIP_TEXT: (77, 1280),
    c.CLIP_TEXT_POOLED: (1, 1280),
    c.CLIP_IMG: (768,),
}
REAL_SHAPES_WITH_STAGE_A = {**REAL_SHAPES, c.STAGE_A: (4, 192, 192)}
TINY_SHAPES = {
    c.EFFNET: (16, 8, 12),
    c.STAGE_A: (4, 16, 24),
    c.CLIP_TEXT: (77, 32),
    c.CLIP_TEXT_POOLED: (1, 32),
    c.CLIP_IMG: (32,),
}


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def file_metadata() -> FileMetadata:
    """Metadata as the encode job would write it."""
    return FileMetadata(
        encoder_flavors={"effnet": "effnet", "clip_text": "clip_bigg_text", "clip_image": "clip_l_vision"},
        weights_sha256={"effnet": sha("effnet"), "clip_text": sha("bigG"), "clip_image": sha("clip-l")},
        preprocessing_hash=preprocessing_hash({"image_size_px": 768, "crop": "center", "resize": "bicubic"}),
    )


def random_tensors(shapes: dict[str, tuple[int, ...]], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 arrays (n, *shape) with a wide range of values, including exact zeros and negatives."""
    rng = np.random.default_rng(seed)
    return {name: (rng.standard_normal((n, *shape)) * 3).astype(np.float32) for name, shape in shapes.items()}


def latent_scalars(n: int) -> dict[str, pa.Array]:
    """The scalar columns of latents@1 / export@1 for ``n`` samples of bucket 24x24."""
    return {
        c.KEY: pa.array([f"{i:09d}" for i in range(n)]),
        c.CAPTION: pa.array([f"a photo of thing {i} — with ünïcode" for i in range(n)]),
        c.SOURCE_SHARD: pa.array(["s3://bucket/shards/00042.tar"] * n),
        c.IMAGE_SHA256: pa.array([sha(f"image {i}") for i in range(n)]),
        c.BUCKET: pa.array(["24x24"] * n),
        c.ORIG_WIDTH: pa.array([1024 + i for i in range(n)], pa.int32()),
        c.ORIG_HEIGHT: pa.array([768] * n, pa.int32()),
        c.CROP_LEFT: pa.array([128 + i // 2 for i in range(n)], pa.int32()),
        c.CROP_TOP: pa.array([0] * n, pa.int32()),
        c.CROP_RIGHT: pa.array([896 + i // 2 for i in range(n)], pa.int32()),
        c.CROP_BOTTOM: pa.array([768] * n, pa.int32()),
    }


def latents_table(shapes: dict[str, tuple[int, ...]], dtype: str, n: int = 3) -> tuple[pa.Table, dict]:
    """A latents@1 table (no metadata yet) and the storage arrays of its tensor columns."""
    tensors = random_tensors(shapes, n)
    arrays = {name: tensor_array(values, dtype) for name, values in tensors.items()}
    return pa.table({**latent_scalars(n), **arrays}), arrays
