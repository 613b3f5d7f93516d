"""Cache read rate: the project's validated readers against a raw pyarrow read of the same files.

    python benchmarks/read.py --out benchmarks/results/read.json [--rows 2048] [--files 8]

Writes ``--rows`` samples at the released shapes (effnet 16×24×24, clip_text 77×1280, clip_text_pooled 1×1280,
clip_img 768, float16; random values, which compress like real latents: barely) into ``--files`` latent files
of one bucket with ``write_latent_files`` (Parquet and WebDataset), then times, best of ``--repeats``:

* raw: ``pyarrow.parquet.read_table`` of each file and its tensor columns as NumPy arrays (zero-copy);
* cache (Parquet): ``pipelines.core.latents_reader.read_latents`` (footer and schema validation, NumPy batches);
* cache (WebDataset): the same reader over the tars;
* training batches: ``pipelines.train_data.batches.window_micro_batches`` for a whole epoch (shuffle, stack).

Ratios are rows/s of each path over the raw read (goal for the cache reader: ≥ 0.5), plus bytes on disk per
sample over the raw tensor bytes (goal ≤ 1.05).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from safetensors.numpy import save

from pipelines.core.latents_io import to_latent_table, write_latent_files
from pipelines.core.latents_reader import list_latent_files, read_latents
from schemas import columns as c
from schemas.core import FileMetadata

SHAPES = {c.EFFNET: (16, 24, 24), c.CLIP_TEXT: (77, 1280), c.CLIP_TEXT_POOLED: (1, 1280), c.CLIP_IMG: (768,)}


def write_cache(root: Path, rows: int, files: int, seed: int = 0) -> int:
    """A cache of ``rows`` random samples in ``files`` files (one bucket); returns the raw tensor bytes per row."""
    rng = np.random.default_rng(seed)
    meta = FileMetadata(encoder_flavors={"effnet": "effnet"}, weights_sha256={"effnet": "0" * 64})
    per_file = rows // files
    for f in range(files):
        n = per_file
        data = {name: rng.standard_normal((n, *shape), dtype=np.float32) for name, shape in SHAPES.items()}
        data |= {c.KEY: [f"{f:05d}{i:07d}" for i in range(n)], c.CAPTION: [f"a photo number {i}" for i in range(n)],
                 c.SOURCE_SHARD: [f"{f:05d}.tar"] * n, c.IMAGE_SHA256: [f"{i:064x}" for i in range(n)],
                 c.BUCKET: ["24x24"] * n}  # fmt: skip
        for name in (c.ORIG_WIDTH, c.ORIG_HEIGHT, c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM):
            data[name] = np.zeros(n, np.int64)
        write_latent_files(to_latent_table(data, "float16", meta), str(root), f"{f:05d}_24x24")
    empty = {c.CLIP_TEXT: np.zeros(SHAPES[c.CLIP_TEXT], np.float32),
             c.CLIP_TEXT_POOLED: np.zeros(SHAPES[c.CLIP_TEXT_POOLED], np.float32)}  # fmt: skip
    (root / "empty_caption.safetensors").write_bytes(save(empty))
    return sum(int(np.prod(s)) for s in SHAPES.values()) * 2


def best_rate(fn, rows: int, repeats: int) -> float:
    """Rows per second of ``fn`` (which must touch every row), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return rows / best


def raw_read(files: list[str]) -> None:
    for path in files:
        table = pq.read_table(path)
        for name in SHAPES:
            table[name].combine_chunks().to_numpy_ndarray()


def reader(root: Path, fmt: str) -> None:
    for batch in read_latents(str(root), fmt):
        assert batch[c.EFFNET].shape[1:] == SHAPES[c.EFFNET]


def training_epoch(root: Path, batch: int) -> int:
    """Every micro-batch of one epoch through the training data path (1 rank); returns the rows it yielded."""
    from pipelines.train_data.batches import (
        ReadSpec,
        TrainDataConfig,
        open_cache,
        plan_windows,
        window_micro_batches,
    )

    cache = open_cache(TrainDataConfig(path=str(root), empty_caption=str(root / "empty_caption.safetensors")))
    steps = sum(f.num_rows for f in cache.files) // batch
    plans = plan_windows(cache.files, seed=0, global_batch=batch, max_steps=steps, window_files=64)
    spec = ReadSpec(files=cache.files, format="parquet", storage_options={}, seed=0, micro_batch=batch,
                    accum=1, world=1, rank=0)  # fmt: skip
    return sum(len(b[c.KEY].split("\n")) for plan in plans for b in window_micro_batches(plan, spec))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64, help="training batch for the training-path rate")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "read.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cascade-read-") as tmp:
        root = Path(tmp) / "latents"
        raw_bytes = write_cache(root, args.rows, args.files)
        files = list_latent_files(str(root), "parquet")
        rows = args.rows // args.files * args.files
        raw = best_rate(lambda: raw_read(files), rows, args.repeats)
        cache_parquet = best_rate(lambda: reader(root, "parquet"), rows, args.repeats)
        cache_wds = best_rate(lambda: reader(root, "webdataset"), rows, args.repeats)
        trained = training_epoch(root, args.batch)
        train_rate = best_rate(lambda: training_epoch(root, args.batch), trained, args.repeats)
        disk = sum(os.path.getsize(f) for f in files) / rows
        result = {
            "benchmark": "read", "rows": rows, "files": args.files, "shapes": {k: list(v) for k, v in SHAPES.items()},
            "dtype": "float16", "raw_pyarrow_rows_per_s": raw,
            "cache_parquet_rows_per_s": cache_parquet, "cache_webdataset_rows_per_s": cache_wds,
            "ratio_cache_parquet_over_raw": cache_parquet / raw, "ratio_cache_webdataset_over_raw": cache_wds / raw,
            "training_batches_rows_per_s": train_rate, "ratio_training_batches_over_raw": train_rate / raw,
            "training_batch": args.batch,
            "read_goal": ">= 0.5", "parquet_bytes_per_sample": disk, "raw_tensor_bytes_per_sample": raw_bytes,
            "ratio_bytes_over_raw": disk / raw_bytes, "bytes_goal": "<= 1.05", "cpu_count": os.cpu_count(),
        }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
