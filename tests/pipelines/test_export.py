"""``cascade export`` on a real cache (real photos, tiny encoders): every reader gets the cache's exact arrays.

The cache has 7 samples in 4 buckets (11x5: 1, 8x7: 1, 8x8: 2, 9x6: 3 rows), one file per bucket.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import duckdb
import fsspec
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipelines.core.latents_io import parquet_bytes, to_latent_table
from pipelines.core.latents_reader import (
    list_latent_files,
    read_file_metadata,
    read_latent_table,
    read_latents,
    table_to_batch,
)
from pipelines.export.pipeline import MANIFEST, MODEL_KEY, ExportConfig, file_schema, run_export
from schemas import columns as c
from schemas import validate_table
from tests.jobs.train_cache import build_cache
from tests.s3 import moto_endpoint
from tests.schemas.test_export_readers import assert_bits_equal, lists_to_numpy

TENSORS = (c.EFFNET, c.CLIP_TEXT, c.CLIP_TEXT_POOLED, c.CLIP_IMG)
BUCKET_ROWS = {"11x5": 1, "8x7": 1, "8x8": 2, "9x6": 3}
SCALARS = (c.KEY, c.CAPTION, c.SOURCE_SHARD, c.IMAGE_SHA256, c.BUCKET, c.ORIG_WIDTH, c.CROP_RIGHT)


@pytest.fixture(scope="module")
def cache(ray_local, tmp_path_factory) -> Path:
    return build_cache(tmp_path_factory.mktemp("export-cache"), mode="buckets", image_size_px=256)[1]


@pytest.fixture(scope="module")
def exports(cache, tmp_path_factory) -> dict[str, Path]:
    """fp16 and fp32 exports of every column and bucket, 2 rows per file."""
    out = {}
    for dtype in ("float16", "float32"):
        out[dtype] = tmp_path_factory.mktemp(f"export-{dtype}")
        run_export(ExportConfig(latents=str(cache), output_dir=str(out[dtype]), dtype=dtype, rows_per_file=2))
    return out


def expected(root: Path | list[str], dtype: str) -> dict[str, dict[str, np.ndarray]]:
    """Per bucket: the cache's rows (files in name order, then by key) as ``read_latents`` gives them."""
    out: dict[str, dict[str, list]] = {}
    for batch in read_latents(root if isinstance(root, list) else str(root), float32=True):
        order = np.argsort(batch[c.KEY].astype(str), kind="stable")
        rows = out.setdefault(str(batch[c.BUCKET][0]), {})
        for name, values in batch.items():
            rows.setdefault(name, []).append(values[order])
    return {
        b: {
            n: np.concatenate(v).astype(dtype) if n in TENSORS else np.concatenate(v) for n, v in rows.items()
        }
        for b, rows in out.items()
    }


def bucket_file(cache: Path, bucket: str) -> str:
    """The cache's (only) Parquet file of ``bucket``."""
    (uri,) = [u for u in list_latent_files(str(cache)) if f"/parquet/{bucket}/" in u]
    return uri


def digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_pyarrow_reads_exact_arrays(exports, cache, dtype) -> None:
    want = expected(cache, dtype)
    for bucket, rows in want.items():
        table = pq.read_table(exports[dtype] / bucket)  # all parts of the bucket
        validate_table(table, "export@1", source=bucket)
        for name in TENSORS:
            assert_bits_equal(lists_to_numpy(table.column(name), rows[name].shape[1:]), rows[name], name)
        for name in SCALARS:
            assert table.column(name).to_pylist() == rows[name].tolist(), name


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_polars_reads_exact_arrays(exports, cache, dtype) -> None:
    for bucket, rows in expected(cache, dtype).items():
        df = pl.read_parquet(str(exports[dtype] / bucket / "*.parquet"))
        for name in TENSORS:
            assert df.schema[name] == pl.Array(
                pl.Float16 if dtype == "float16" else pl.Float32, rows[name].shape[1:]
            )
            assert_bits_equal(df[name].to_numpy(), rows[name], name)
        assert df[c.KEY].to_list() == rows[c.KEY].tolist()
        assert df[c.CAPTION].to_list() == rows[c.CAPTION].tolist()
    meta = pl.read_parquet_metadata(str(exports[dtype] / "8x8" / "part-00000-00000.parquet"))
    assert json.loads(meta[MODEL_KEY])["tensors"][c.EFFNET]["shape"] == [16, 8, 8]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_duckdb_reads_exact_arrays(exports, cache, dtype) -> None:
    root = exports[dtype]
    for bucket, rows in expected(cache, dtype).items():
        table = duckdb.sql(
            f"select * from read_parquet('{root}/{bucket}/*.parquet') order by key"
        ).to_arrow_table()
        for name in TENSORS:  # duckdb has no half type: float16 comes back widened to FLOAT, exactly
            got = lists_to_numpy(table.column(name), rows[name].shape[1:])
            assert_bits_equal(got, rows[name].astype(np.float32), name)
        assert table.column(c.KEY).to_pylist() == rows[c.KEY].tolist()
    counts = duckdb.sql(
        f"select bucket, count(*) from read_parquet('{root}/*/*.parquet') group by bucket"
    ).fetchall()
    assert dict(counts) == BUCKET_ROWS  # all buckets in one query: shapes differ, duckdb reads variable lists
    (model,) = duckdb.sql(
        f"select value from parquet_kv_metadata('{root}/9x6/part-00000-00001.parquet') where key = '{MODEL_KEY}'"
    ).fetchall()[0]
    assert json.loads(model)["dtype"] == dtype


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_hf_datasets_reads_exact_arrays(exports, cache, dtype, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    for bucket, rows in expected(cache, dtype).items():
        ds = datasets.load_dataset(
            "parquet",
            data_files=str(exports[dtype] / bucket / "*.parquet"),
            split="train",
            cache_dir=str(tmp_path / "hf"),
        )
        assert ds["key"][:] == rows[c.KEY].tolist()
        for name in TENSORS:
            feature = ds.features[name]
            for dim in rows[name].shape[1:]:
                assert feature.length == dim
                feature = feature.feature
            assert feature.dtype == dtype
            assert_bits_equal(lists_to_numpy(ds.data.column(name), rows[name].shape[1:]), rows[name], name)
            as_numpy = np.asarray(ds.with_format("numpy")[:][name])  # the numpy format widens float16 exactly
            assert_bits_equal(as_numpy.astype(dtype), rows[name], name)


def test_one_bucket_per_file_split_by_rows_and_manifest(exports, cache) -> None:
    root = exports["float16"]
    manifest = json.loads((root / MANIFEST).read_text())
    assert manifest["files"] == [
        "11x5/part-00000-00000.parquet",
        "8x7/part-00000-00000.parquet",
        "8x8/part-00000-00000.parquet",
        "9x6/part-00000-00000.parquet",
        "9x6/part-00000-00001.parquet",
    ]
    assert {b: v["n_rows"] for b, v in manifest["buckets"].items()} == BUCKET_ROWS
    assert manifest["n_rows"] == 7 and manifest["config"]["rows_per_file"] == 2
    for name in manifest["files"]:
        table = pq.read_table(root / name)
        assert table.num_rows <= 2 and set(table.column(c.BUCKET).to_pylist()) == {name.split("/")[0]}
    model = json.loads(pq.read_schema(root / "9x6/part-00000-00000.parquet").metadata[MODEL_KEY.encode()])
    cache_manifest = json.loads((cache / "manifest.json").read_text())
    assert model["encoder_flavors"] == cache_manifest["encoder_flavors"]
    assert model["weights_sha256"] == cache_manifest["weights_sha256"]
    assert model["tensors"][c.EFFNET]["shape"] == [16, 6, 9] and model["tensors"][c.EFFNET]["scale"] == 1.0
    assert "before final_layer_norm" in model["tensors"][c.CLIP_TEXT]["meaning"]
    assert model["empty_caption"]["file"] == "empty_caption.safetensors"
    # the cache's encoders are */tiny flavors on random weights: the encode wrote it, the export says so
    assert read_file_metadata(bucket_file(cache, "9x6")).random_weights is True
    assert (
        pq.read_schema(root / "9x6/part-00000-00000.parquet").metadata[b"cascade.random_weights"] == b"true"
    )
    assert model["random_weights"] is True and "random weights" in model["warning"]
    width = model["tensors"][c.CLIP_TEXT_POOLED]["shape"][-1]
    assert f"({width},)" in model["tensors"][c.CLIP_TEXT_POOLED]["meaning"] and width != 1280
    assert "clip_text/tiny" in model["tensors"][c.CLIP_TEXT]["meaning"]
    assert (root / "empty_caption.safetensors").read_bytes() == (
        cache / "empty_caption.safetensors"
    ).read_bytes()


def test_column_subset_and_bucket_subset(cache, tmp_path) -> None:
    config = ExportConfig(
        latents=str(cache),
        output_dir=str(tmp_path / "out"),
        columns=(c.CLIP_TEXT_POOLED, c.EFFNET),
        buckets=("9x6", "8x8"),
        rows_per_file=1,
    )
    summary = run_export(config)
    assert summary.rows_per_bucket == {"8x8": 2, "9x6": 3} and len(summary.files) == 5
    want = expected(cache, "float16")
    for bucket in ("8x8", "9x6"):
        table = pq.read_table(tmp_path / "out" / bucket)
        assert (
            table.column_names[-2:] == [c.EFFNET, c.CLIP_TEXT_POOLED]
            and c.CLIP_TEXT not in table.column_names
        )
        assert table.column_names[:11] == list(pq.read_schema(list_latent_files(str(cache))[0]).names[:11])
        meta = validate_table(table, file_schema(read_file_metadata(bucket_file(cache, bucket)), config))
        assert set(meta.tensor_shapes) == {c.EFFNET, c.CLIP_TEXT_POOLED}
        rows = want[bucket]
        df = pl.read_parquet(str(tmp_path / "out" / bucket / "*.parquet"))
        assert_bits_equal(df[c.EFFNET].to_numpy(), rows[c.EFFNET], bucket)
        hf = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
        assert set(hf) == set(table.column_names)
        model = json.loads(table.schema.metadata[MODEL_KEY.encode()])
        assert set(model["tensors"]) == {c.EFFNET, c.CLIP_TEXT_POOLED}


def test_rerun_is_idempotent_and_removes_stale_parts(exports, cache, tmp_path) -> None:
    out = tmp_path / "out"
    config = ExportConfig(latents=str(cache), output_dir=str(out), rows_per_file=2)
    run_export(config)
    assert digests(out) == digests(exports["float16"])  # another folder, the same bytes
    first = digests(out)
    crashed = out / "_staging" / "00000" / "9x6" / "part-00000-00001.parquet.tmp-writing"
    crashed.parent.mkdir(parents=True)
    crashed.write_bytes(b"a write cut short")  # what a killed export leaves: staged, never committed
    assert run_export(config).n_rows == 7
    assert digests(out) == first
    run_export(replace(config, rows_per_file=10))  # fewer parts: the old part-00000-00001 must go
    assert sorted(p.name for p in (out / "9x6").iterdir()) == ["part-00000-00000.parquet"]
    keys = duckdb.sql(f"select key, bucket from read_parquet('{out}/*/*.parquet')").fetchall()
    assert len(keys) == len(set(keys)) == 7
    run_export(config)
    assert digests(out) == first


def test_webdataset_cache_exports_the_same_bytes(exports, cache, tmp_path) -> None:
    out = tmp_path / "out"
    run_export(ExportConfig(latents=str(cache), output_dir=str(out), format="webdataset", rows_per_file=2))
    got, want = digests(out), digests(exports["float16"])
    for name in (MANIFEST, "_commits/_fingerprint.json"):
        assert got.pop(name) != want.pop(name)  # they name the source format
    assert got == want


def test_several_files_per_bucket_and_other_cache_dtypes(cache, tmp_path) -> None:
    """A bucket spread over files (name order, then key) from float32 and bfloat16 caches, no manifest."""
    table = read_latent_table(bucket_file(cache, "9x6"))
    meta = replace(validate_table(table, "latents@1"), schema_id="", tensor_shapes={})
    batch = table_to_batch(table.sort_by(c.KEY), float32=True)
    for dtype in ("float32", "bfloat16"):
        folder = tmp_path / dtype / "parquet"
        folder.mkdir(parents=True)
        for name, rows in (("a", [2]), ("b", [0, 1])):  # file a holds the last key
            part = to_latent_table({k: v[rows] for k, v in batch.items()}, dtype, meta)
            (folder / f"{name}.parquet").write_bytes(parquet_bytes(part))
        files = [str(folder / "a.parquet"), str(folder / "b.parquet")]
        out = tmp_path / f"{dtype}-out"
        summary = run_export(ExportConfig(latents=str(folder.parent), output_dir=str(out), dtype="float32"))
        assert summary.rows_per_bucket == {"9x6": 3}
        got = pq.read_table(out / "9x6")  # part-a-00000 (the last key), then part-b-00000
        want = expected(files, "float32")["9x6"]  # float32 holds float32 and bfloat16 caches exactly
        assert got.column(c.KEY).to_pylist() == want[c.KEY].tolist() == [batch[c.KEY][i] for i in (2, 0, 1)]
        assert_bits_equal(lists_to_numpy(got.column(c.EFFNET), (16, 6, 9)), want[c.EFFNET], dtype)
        assert json.loads(got.schema.metadata[MODEL_KEY.encode()])["empty_caption"] is None
    big = {k: v.copy() for k, v in batch.items()}
    big[c.EFFNET][0, 0, 0, 0] = 1e6
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "x.parquet").write_bytes(parquet_bytes(to_latent_table(big, "float32", meta)))
    with pytest.raises(ValueError, match=r"dtype='float16'.*'effnet'"):
        run_export(ExportConfig(latents=str(tmp_path / "big"), output_dir=str(tmp_path / "big-out")))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"columns": ("effnet", "vae")}, r"columns=.*'vae'"),
        ({"columns": "effnet"}, r"columns='effnet'"),
        ({"dtype": "bfloat16"}, r"dtype='bfloat16'.*float32"),
        ({"dtype": "float64"}, r"dtype='float64'"),
        ({"rows_per_file": 0}, r"rows_per_file=0"),
        ({"buckets": ("24 x 24",)}, r"buckets="),
        ({"format": "tfrecord"}, r"format='tfrecord'"),
        ({"output_dir": ""}, r"output_dir=''"),
    ],
)
def test_bad_config_names_the_field(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ExportConfig(**{"latents": "/cache", "output_dir": "/out", **kwargs})


def test_what_the_cache_lacks_is_refused_before_writing(cache, tmp_path) -> None:
    out = tmp_path / "out"
    cases = [
        ({"latents": str(tmp_path / "nothing")}, r"latents=.*nothing"),
        ({"columns": (c.STAGE_A,)}, r"columns=\['stage_a'\].*no \['stage_a'\]"),
        ({"buckets": ("99x99",)}, r"buckets=\('99x99',\).*99x99"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            run_export(ExportConfig(**{"latents": str(cache), "output_dir": str(out), **kwargs}))
    assert not out.exists()


def test_s3_cache_to_s3_export(exports, cache) -> None:
    with moto_endpoint() as endpoint:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint)
        fs.mkdir("export-test-bucket")
        fs.put(str(cache) + "/", "export-test-bucket/latents/", recursive=True)
        config = ExportConfig(
            latents="s3://export-test-bucket/latents",
            output_dir="s3://export-test-bucket/export",
            rows_per_file=2,
            endpoint_url=endpoint,
            output_endpoint_url=endpoint,
        )
        summary = run_export(config)
        assert summary.files[0] == "s3://export-test-bucket/export/11x5/part-00000-00000.parquet"
        local = digests(exports["float16"])
        for name, digest in local.items():
            data = fs.cat_file(f"export-test-bucket/export/{name}")
            same = name not in (MANIFEST, "_commits/_fingerprint.json")  # these name the cache's location
            assert (hashlib.sha256(data).hexdigest() == digest) == same, name
        table = pq.read_table("export-test-bucket/export/9x6", filesystem=fs)
        assert table.num_rows == 3
        assert sorted(fs.find("export-test-bucket/export")) == sorted(
            f"export-test-bucket/export/{n}" for n in local
        )
        fs.invalidate_cache()
        run_export(config)  # rerun on S3: same objects
        assert sorted(fs.find("export-test-bucket/export")) == sorted(
            f"export-test-bucket/export/{n}" for n in local
        )


def test_cascade_export_command_gives_the_same_files(exports, cache, tmp_path, capsys) -> None:
    from jobs.cli import main

    code = main(["export", "--set", f"latents={cache}", "--set", f"output_dir={tmp_path / 'cli'}",
                 "--set", "rows_per_file=2"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert '"n_rows": 7' in capsys.readouterr().out
    assert digests(tmp_path / "cli") == digests(exports["float16"])
