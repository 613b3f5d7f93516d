"""Synthetic scores outputs for dedup checks: clustered 768-d embeddings with planted near-copies.

Rows belong to topics (cosine to the topic centre ~0.7, so topics overlap the way CLIP embeddings do); a
fraction of rows get a near-copy (cosine ~0.985: within SemDeDup's default epsilon 0.05) and as many get a
decoy (cosine ~0.9: outside it). Written as a ``cascade score`` output (scores@2, per-shard layout, manifest)
so that ``cascade dedup`` reads it as it would a real one. Used by ``benchmarks/dedup.py`` and the tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import FileMetadata, attach_metadata, nested_list_array, scores_schema

COPY_COSINE, DECOY_COSINE = 0.985, 0.90


def _near(x: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors at exactly ``cosine`` to each unit row of ``x``."""
    noise = rng.standard_normal(x.shape).astype(np.float32)
    noise -= (noise * x).sum(axis=1, keepdims=True) * x
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    return (cosine * x + np.sqrt(1 - cosine**2) * noise).astype(np.float32)


def embeddings(n: int, dim: int, seed: int, planted_fraction: float = 0.1) -> tuple[np.ndarray, list]:
    """``n`` unit embeddings and the planted near-copy pairs ``(i, j)`` (row indices)."""
    rng = np.random.default_rng(seed)
    n_topics = max(1, n // 500)
    topics = rng.standard_normal((n_topics, dim)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    x = _near(topics[rng.integers(0, n_topics, n)], 0.7, rng)
    n_pairs = int(n * planted_fraction / 2)
    pick = rng.permutation(n)[: 4 * n_pairs]
    src, copy, decoy_src, decoy = (
        pick[:n_pairs],
        pick[n_pairs : 2 * n_pairs],
        pick[2 * n_pairs : 3 * n_pairs],
        pick[3 * n_pairs :],
    )
    x[copy] = _near(x[src], COPY_COSINE, rng)
    x[decoy] = _near(x[decoy_src], DECOY_COSINE, rng)
    return x, list(zip(src.tolist(), copy.tolist(), strict=True))


def write_scores(
    root: Path, n: int, n_shards: int, *, dim: int = 768, seed: int = 0, version: int = 2
) -> list:
    """A scores output of ``n`` rows in ``n_shards`` shards at ``root``; returns the planted pairs as keys.
    ``version=1`` writes scores@1 (no image_sha256, no phash)."""
    x, pairs = embeddings(n, dim, seed)
    rng = np.random.default_rng(seed + 1)
    keys = np.asarray([f"k{i:08d}" for i in range(n)])
    aesthetic = rng.uniform(3, 7, n).astype(np.float32)
    phash = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(
        0, 2, n
    ).astype(np.uint64)
    schema = scores_schema(dim, version)
    meta = FileMetadata(
        schema_id=schema.id, encoder_flavors={"clip_score": "synthetic"}, tensor_shapes=schema.tensor_specs
    )
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    shards = {}
    for s, rows in enumerate(np.array_split(np.arange(n), n_shards)):
        shard, m = f"{s:05d}", len(rows)
        table = pa.table({
            "key": keys[rows], "source": [f"{root}/shards/{shard}.tar"] * m,
            "image_sha256": [f"{i:064x}" for i in rows], "phash": pa.array(phash[rows], pa.uint64()),
            "width": pa.array([512] * m, pa.int32()), "height": pa.array([512] * m, pa.int32()),
            "aspect_ratio": pa.array([1.0] * m, pa.float32()), "caption_length": pa.array([20] * m, pa.int32()),
            "aesthetic_score": aesthetic[rows], "clip_similarity": pa.array([0.3] * m, pa.float32()),
            "clip_image_embeds": nested_list_array(x[rows], "float32"),
            "watermark_probability": pa.array([None] * m, pa.float32()),
            "nsfw_probability": pa.array([None] * m, pa.float32()),
        })  # fmt: skip
        table = table.select(schema.arrow.names)
        pq.write_table(attach_metadata(table, schema, meta), root / "parquet" / f"{shard}.parquet")
        shards[shard] = {
            "shard_id": shard,
            "files": [{"path": f"parquet/{shard}.parquet", "rows": m}],
            "n_written": m,
        }
    manifest = {
        "layout": "per-shard",
        "schema": schema.id,
        "fingerprint": {"synthetic": seed},
        "shards": shards,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return [(str(keys[i]), str(keys[j])) for i, j in pairs]
