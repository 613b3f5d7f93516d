"""A tiny real ``scores@1`` table for filter jobs, in the single-folder layout from before per-shard\noutputs (filter partitions it by shard once)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import attach_metadata, nested_list_array, scores_schema

WIDTHS = {"tiny": 320, "wide": 640, "huge": 1024}


def write_scores(path: Path) -> None:
    """A real scores@1 file (tiny CLIP width 4) with three keys of different widths."""
    n, widths = len(WIDTHS), list(WIDTHS.values())
    f32, i32 = pa.float32(), pa.int32()
    table = pa.table(
        {
            "key": list(WIDTHS),
            "source": ["s0"] * n,
            "width": pa.array(widths, i32),
            "height": pa.array([300] * n, i32),
            "aspect_ratio": pa.array([w / 300 for w in widths], f32),
            "caption_length": pa.array([10] * n, i32),
            "aesthetic_score": pa.array([5.0] * n, f32),
            "clip_similarity": pa.array([0.3] * n, f32),
            "clip_image_embeds": nested_list_array(np.ones((n, 4), np.float32), "float32"),
            "watermark_probability": pa.array([None] * n, f32),
            "nsfw_probability": pa.array([None] * n, f32),
        }
    )
    path.parent.mkdir(parents=True)
    pq.write_table(attach_metadata(table, scores_schema(4, version=1)), path)  # older files still filter
