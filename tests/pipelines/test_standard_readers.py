"""Standard readers take our files as they are: plain ``webdataset``, ``pyarrow`` (per bucket and whole), Ray
Data, Hugging Face ``datasets`` (the export). No project code reads; values are checked against the project's
reader (``read_latents``). The cache is written by the writer's own functions (layout 2: one folder per
bucket), with the metadata of tiny encoders on seeded random weights: 9 samples in 3 buckets.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipelines.core.latents_io import to_latent_table, write_latent_files
from pipelines.core.latents_reader import read_latents
from pipelines.encode.models import EncoderConfig
from pipelines.encode.writer import fingerprint_metadata
from schemas import columns as c
from tests.pipelines.test_latents_io import latent_rows

BUCKETS = {"4x3": (16, 3, 4), "3x3": (16, 3, 3), "5x2": (16, 2, 5)}  # WxH -> effnet (16, H, W)
ROWS = {"4x3": 4, "3x3": 3, "5x2": 2}
SHAPES = {c.CLIP_TEXT: (77, 32), c.CLIP_TEXT_POOLED: (32,), c.CLIP_IMG: (32,)}
TENSORS = (c.EFFNET, c.CLIP_TEXT, c.CLIP_TEXT_POOLED, c.CLIP_IMG)


@pytest.fixture(scope="module")
def metadata():
    encoders = {
        "effnet": EncoderConfig(flavor="effnet/tiny"),
        "clip_text": EncoderConfig(flavor="clip_text/tiny"),
        "clip_image": EncoderConfig(flavor="clip_vision/tiny"),
    }
    return fingerprint_metadata(encoders, {"image_size_px": 128})


@pytest.fixture(scope="module")
def caches(metadata, tmp_path_factory) -> dict[str, Path]:
    """fp16 (Parquet + npy tars) and bf16 (npy tars; safetensors tars under ``st``) caches of 9 samples."""
    out = {}
    for dtype in ("float16", "bfloat16"):
        root = out[dtype] = tmp_path_factory.mktemp(f"cache-{dtype}")
        for seed, (bucket, effnet) in enumerate(BUCKETS.items()):
            rows = latent_rows(SHAPES | {c.EFFNET: effnet}, ROWS[bucket], seed=seed, bucket=bucket)
            table = to_latent_table(rows, dtype, metadata)
            write_latent_files(table, str(root), f"0000{seed}")
            write_latent_files(table, str(root / "st"), f"0000{seed}", ("webdataset",), "safetensors")
    return out


def by_key(root: Path) -> dict[str, dict]:
    """The project's reader: key -> row (float32 tensors)."""
    out = {}
    for batch in read_latents(str(root), "parquet", float32=True):
        out |= {str(k): {n: v[i] for n, v in batch.items()} for i, k in enumerate(batch[c.KEY])}
    return out


def test_the_writer_marks_random_weights(metadata, caches) -> None:
    assert metadata.random_weights is True
    for path in (caches["float16"] / "parquet").glob("*/*.parquet"):
        assert pq.read_schema(path).metadata[b"cascade.random_weights"] == b"true"
    with_weights = {"effnet": EncoderConfig(flavor="effnet/tiny", weights=__file__)}  # any file: not random
    assert fingerprint_metadata(with_weights, {}).random_weights is False


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_plain_webdataset_yields_each_sample_once_with_its_values(caches, dtype) -> None:
    import torch
    import webdataset as wds
    from safetensors.torch import load

    want = by_key(caches[dtype])
    for root in (caches[dtype], caches[dtype] / "st"):
        urls = sorted(str(p) for p in (root / "webdataset").glob("*/*.tar"))
        samples = list(wds.WebDataset(urls, shardshuffle=False).decode())
        assert len(samples) == sum(ROWS.values()) == len(want)  # no metadata pseudo-sample
        for sample in samples:
            meta = sample["json"]  # the scalar columns and the file's cascade.* metadata
            row = want[meta[c.KEY]]
            assert meta[c.CAPTION] == row[c.CAPTION] and meta[c.BUCKET] == row[c.BUCKET]
            assert meta["cascade.random_weights"] is True and meta["cascade.dtype"] == dtype
            assert (
                meta["cascade.schema"] == "latents@1" and meta["cascade.num_samples"] == ROWS[meta[c.BUCKET]]
            )
            if "safetensors" in sample:  # real BF16 / F16 tensors
                tensors = {n: t.float().numpy() for n, t in load(sample["safetensors"]).items()}
            elif dtype == "bfloat16":  # npy holds bfloat16 as uint16 bits: the one-line view
                tensors = {n: torch.from_numpy(sample[f"{n}.npy"]).view(torch.bfloat16).float().numpy()
                           for n in TENSORS}  # fmt: skip
            else:
                tensors = {n: sample[f"{n}.npy"].astype(np.float32) for n in TENSORS}
            for name in TENSORS:
                assert tensors[name].shape == row[name].shape and np.array_equal(tensors[name], row[name]), (
                    name
                )


def test_pyarrow_reads_one_bucket_by_path_and_the_whole_cache(caches) -> None:
    root = caches["float16"] / "parquet"
    want = by_key(caches["float16"])
    for bucket, n in ROWS.items():
        table = pq.read_table(root / bucket)  # one bucket: one fixed shape per tensor column
        assert table.num_rows == n and table.schema.metadata[b"cascade.random_weights"] == b"true"
        for name in TENSORS:
            values = table.column(name).combine_chunks().to_numpy_ndarray()
            rows = np.stack([want[k][name] for k in table.column(c.KEY).to_pylist()])
            assert np.array_equal(values.astype(np.float32), rows), (bucket, name)
    dataset = ds.dataset(root, format="parquet")  # the whole cache
    scalars = dataset.to_table(columns=[c.KEY, c.BUCKET, c.CLIP_TEXT_POOLED])  # same types in every bucket
    assert sorted(scalars.column(c.KEY).to_pylist()) == sorted(want)
    pooled = scalars.column(c.CLIP_TEXT_POOLED).combine_chunks().to_numpy_ndarray()
    keys = scalars.column(c.KEY).to_pylist()
    assert np.array_equal(pooled.astype(np.float32), np.stack([want[k][c.CLIP_TEXT_POOLED] for k in keys]))
    assert pq.read_table(root, columns=[c.KEY]).num_rows == 9
    one = dataset.to_table(filter=ds.field(c.BUCKET) == "3x3")  # a bucket by filter, effnet included
    assert one.num_rows == 3 and one.column(c.EFFNET).type.shape == [16, 3, 3]
    with pytest.raises(pa.ArrowTypeError):  # effnet's shape differs per bucket: no one table holds them all
        dataset.to_table()


def test_ray_data_reads_a_bucket_and_the_whole_cache(ray_local, caches) -> None:
    import ray.data

    root = caches["float16"] / "parquet"
    want = by_key(caches["float16"])
    rows = ray.data.read_parquet(str(root / "4x3")).take_all()
    assert len(rows) == 4
    for row in rows:
        for name in TENSORS:
            assert np.array_equal(np.asarray(row[name], np.float32), want[row[c.KEY]][name]), name
    everything = ray.data.read_parquet(str(root)).take_all()  # row by row, each bucket its own shape
    assert sorted(r[c.KEY] for r in everything) == sorted(want)
    assert {r[c.EFFNET].shape for r in everything} == set(BUCKETS.values())


def test_hf_datasets_reads_the_export(ray_local, caches, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    from pipelines.export.pipeline import ExportConfig, run_export

    out = tmp_path / "export"
    run_export(ExportConfig(latents=str(caches["float16"]), output_dir=str(out), rows_per_file=3))
    want = by_key(caches["float16"])
    for bucket, n in ROWS.items():
        d = datasets.load_dataset(
            "parquet",
            data_files=str(out / bucket / "*.parquet"),
            split="train",
            cache_dir=str(tmp_path / "hf"),
        )
        assert d.num_rows == n
        arrays = d.with_format("numpy")[:]  # nested fixed-length lists: (N, *shape) arrays
        for name in TENSORS:
            rows = np.stack([want[k][name] for k in d[c.KEY][:]])
            assert arrays[name].shape == rows.shape and np.array_equal(arrays[name].astype(np.float32), rows)
    schema = pq.read_schema(next(out.glob("3x3/*.parquet")))
    assert schema.metadata[b"cascade.random_weights"] == b"true"
    model = json.loads(schema.metadata[b"cascade.model"])
    assert model["random_weights"] is True and "random weights" in model["warning"]
    meaning = model["tensors"][c.CLIP_IMG]["meaning"]  # derived from the flavor and the stored width
    assert "clip_vision/tiny" in meaning and "(32,)" in meaning and "768" not in meaning
    with pytest.raises(
        ValueError, match="does not have a datasets dtype equivalent"
    ):  # the cache: use the export
        datasets.load_dataset("parquet", data_files=str(caches["float16"] / "parquet" / "3x3" / "*.parquet"),
                              split="train", cache_dir=str(tmp_path / "hf-cache"))  # fmt: skip
