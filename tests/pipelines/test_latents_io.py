"""Latent shards: one writer, two formats (Parquet, WebDataset npy/safetensors), a validating reader."""

from __future__ import annotations

import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import safetensors

from pipelines.core.latents_io import (
    parquet_bytes,
    to_latent_table,
    webdataset_bytes,
    write_latent_files,
)
from pipelines.core.latents_reader import (
    LatentFileError,
    as_ray_dataset,
    list_latent_files,
    read_file_metadata,
    read_latents,
)
from schemas import (
    FileMetadata,
    SchemaMismatchError,
    TensorSpec,
    float32_to_bfloat16_bits,
    preprocessing_hash,
)
from schemas import columns as c

REAL_SHAPES = {
    c.EFFNET: (16, 24, 24),
    c.STAGE_A: (4, 256, 256),
    c.CLIP_TEXT: (77, 1280),
    c.CLIP_TEXT_POOLED: (1280,),
    c.CLIP_IMG: (768,),
}
TINY_SHAPES = {c.EFFNET: (16, 3, 4), c.CLIP_TEXT: (7, 8), c.CLIP_TEXT_POOLED: (8,), c.CLIP_IMG: (8,)}
DTYPES = ("float16", "bfloat16", "float32")
SOURCES = (("parquet", "npy"), ("webdataset", "npy"), ("webdataset", "safetensors"))
META = FileMetadata(
    encoder_flavors={"effnet": "effnet", "clip_text": "clip_bigg_text", "clip_img": "clip_l_vision"},
    weights_sha256={"effnet": "e" * 64, "clip_text": "7" * 64, "clip_img": "1" * 64},
    preprocessing_hash=preprocessing_hash({"image_size_px": 768, "crop": "center"}),
)


def latent_rows(shapes: dict, n: int, seed: int = 0, bucket: str = "24x24") -> dict:
    """Random encoder outputs (float32) and scalar columns of ``n`` samples of one bucket."""
    rng = np.random.default_rng(seed)
    rows = {name: rng.standard_normal((n, *shape), dtype=np.float32) * 3 for name, shape in shapes.items()}
    rows[c.KEY] = [f"{bucket}/{seed:03d}.{i:04d}" for i in range(n)]  # dots and slashes: not tar-safe
    rows[c.CAPTION] = [f"a photo of thing {i} — ünïcode" for i in range(n)]
    rows[c.SOURCE_SHARD] = ["00007"] * n
    rows[c.IMAGE_SHA256] = [f"{i:064x}" for i in range(n)]
    rows[c.BUCKET] = [bucket] * n
    for j, name in enumerate(
        (c.ORIG_WIDTH, c.ORIG_HEIGHT, c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM)
    ):
        rows[name] = np.arange(n, dtype=np.int64) * 10 + j
    return rows


def stored(values: np.ndarray, dtype: str) -> np.ndarray:
    """What the writer must store for float32 ``values`` (bfloat16 as bit patterns)."""
    if dtype == "bfloat16":
        return float32_to_bfloat16_bits(values)
    return values.astype(dtype)


def write_all(table, base: Path | str, name: str = "00007_24x24", options: dict | None = None) -> dict:
    """Write ``table`` as Parquet + WebDataset(npy) under base/npy and WebDataset(safetensors) under base/st."""
    write_latent_files(table, f"{base}/npy", name, storage_options=options)
    write_latent_files(table, f"{base}/st", name, ("webdataset",), "safetensors", storage_options=options)
    return {
        ("parquet", "npy"): f"{base}/npy",
        ("webdataset", "npy"): f"{base}/npy",
        ("webdataset", "safetensors"): f"{base}/st",
    }


def read_one(root: str, fmt: str, **kwargs) -> dict:
    batches = list(read_latents(root, fmt, **kwargs))
    assert len(batches) == 1
    return batches[0]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        if a[name].dtype == object:
            assert a[name].tolist() == b[name].tolist(), name
        else:
            assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_formats_hold_bit_identical_tensors(dtype: str, tmp_path: Path) -> None:
    rows = latent_rows(REAL_SHAPES, 2)
    roots = write_all(to_latent_table(rows, dtype, META), tmp_path)
    batches = {src: read_one(roots[src], src[0], expect=META) for src in SOURCES}
    reference = batches[("parquet", "npy")]
    for src in SOURCES[1:]:
        assert_bit_identical(reference, batches[src])
    assert reference[c.KEY].tolist() == rows[c.KEY]
    assert reference[c.CAPTION].tolist() == rows[c.CAPTION]
    assert reference[c.CROP_BOTTOM].tolist() == [5, 15]
    for name in REAL_SHAPES:  # exactly the source values, converted once to the storage dtype
        assert reference[name].tobytes() == stored(rows[name], dtype).tobytes(), name
    as_float = read_one(roots[("webdataset", "safetensors")], "webdataset", float32=True)
    for name in REAL_SHAPES:
        assert as_float[name].dtype == np.float32
        assert np.allclose(as_float[name], rows[name], rtol=2**-7 if dtype == "bfloat16" else 2**-10)


def test_safetensors_members_hold_real_bfloat16(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load

    rows = latent_rows(TINY_SHAPES, 2)
    data = webdataset_bytes(to_latent_table(rows, "bf16", META), "safetensors")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile(f"{rows[c.KEY][1].replace('/', '_').replace('.', '_')}.safetensors").read()
    header = json.loads(member[8 : 8 + int.from_bytes(member[:8], "little")])
    assert {header[name]["dtype"] for name in TINY_SHAPES} == {"BF16"}
    assert header["__metadata__"] == {"key": rows[c.KEY][1], "cascade.dtype": "bfloat16"}
    tensors = load(member)
    assert tensors[c.EFFNET].dtype == torch.bfloat16
    expected = torch.from_numpy(rows[c.EFFNET][1]).to(torch.bfloat16)  # torch's rounding = ours
    assert torch.equal(tensors[c.EFFNET], expected)


def test_metadata_round_trip_and_deterministic_bytes(tmp_path: Path) -> None:
    table = to_latent_table(latent_rows(TINY_SHAPES, 3), "float16", META)
    assert parquet_bytes(table) == parquet_bytes(table)
    assert webdataset_bytes(table, "npy") == webdataset_bytes(table, "npy")
    [parquet_uri, tar_uri] = write_latent_files(table, str(tmp_path), "00007")
    assert parquet_uri == f"{tmp_path}/parquet/24x24/00007.parquet" and tar_uri.endswith(
        "webdataset/24x24/00007.tar"
    )
    expected_shapes = {name: TensorSpec(shape, "float16") for name, shape in TINY_SHAPES.items()}

    footer = pq.ParquetFile(parquet_uri)
    assert footer.metadata.num_row_groups == 1
    from_parquet = FileMetadata.from_arrow(footer.schema_arrow.metadata)
    assert from_parquet.schema_id == "latents@1"
    assert dict(from_parquet.encoder_flavors) == dict(META.encoder_flavors)
    assert dict(from_parquet.weights_sha256) == dict(META.weights_sha256)
    assert from_parquet.preprocessing_hash == META.preprocessing_hash
    assert dict(from_parquet.tensor_shapes) == expected_shapes
    assert (
        read_file_metadata(tar_uri, "webdataset", expect=META)
        == from_parquet
        == read_file_metadata(parquet_uri)
    )

    with tarfile.open(tar_uri) as tar:
        members = tar.getmembers()
        samples = [json.load(tar.extractfile(m)) for m in members if m.name.endswith(".json")]
    assert {m.mtime for m in members} == {0} and len(samples) == 3  # no pseudo-sample: every member is data
    assert [m.name for m in members[:6]] == [
        "24x24_000_0000.json",
        *(f"24x24_000_0000.{name}.npy" for name in TINY_SHAPES),
        "24x24_000_0001.json",
    ]
    sample = samples[0]  # each sample's json carries the file metadata
    assert sample["cascade.schema"] == "latents@1" and sample["cascade.num_samples"] == 3
    assert sample["cascade.preprocessing_hash"] == META.preprocessing_hash
    assert sample["cascade.weights_sha256"] == dict(META.weights_sha256)
    assert sample["cascade.encoder_flavors"] == dict(META.encoder_flavors)
    assert sample["cascade.tensor_shapes"][c.CLIP_TEXT] == {"shape": [7, 8], "dtype": "float16"}
    assert sample["cascade.member_format"] == "npy" and sample["cascade.layout"] == 2
    assert sample[c.KEY] == "24x24/000.0000" and sample[c.ORIG_HEIGHT] == 1
    assert sample["cascade.dtype"] == "float16" and "cascade.random_weights" not in sample  # META: unset
    assert [s[c.KEY] for s in samples] == ["24x24/000.0000", "24x24/000.0001", "24x24/000.0002"]
    assert {json.dumps({k: v for k, v in s.items() if k.startswith("cascade.")}) for s in samples} == {
        json.dumps({k: v for k, v in sample.items() if k.startswith("cascade.")})
    }


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_reader_refuses_stale_latents_naming_both(fmt: str, tmp_path: Path) -> None:
    write_latent_files(
        to_latent_table(latent_rows(TINY_SHAPES, 2), "float16", META), str(tmp_path), "00007_a"
    )
    other_hash = preprocessing_hash({"image_size_px": 1024, "crop": "center"})
    with pytest.raises(
        SchemaMismatchError, match=rf"00007_a.*{META.preprocessing_hash}.*expected '{other_hash}'"
    ):
        list(read_latents(str(tmp_path), fmt, expect=FileMetadata(preprocessing_hash=other_hash)))
    stale = FileMetadata(weights_sha256={"effnet": "f" * 64}, encoder_flavors={"clip_img": "clip_l_vision"})
    with pytest.raises(SchemaMismatchError, match=r"weights_sha256\['effnet'\] 'e{64}', expected 'f{64}'"):
        list(read_latents(str(tmp_path), fmt, expect=stale))
    with pytest.raises(SchemaMismatchError, match=r"encoder_flavors\['stage_a'\] absent, expected 'stage_a'"):
        list(read_latents(str(tmp_path), fmt, expect=FileMetadata(encoder_flavors={"stage_a": "stage_a"})))
    wrong_shape = FileMetadata(tensor_shapes={c.EFFNET: TensorSpec((16, 24, 24), "float16")})
    with pytest.raises(SchemaMismatchError, match=r"float16\[16, 3, 4\]', expected 'float16\[16, 24, 24\]"):
        list(read_latents(str(tmp_path), fmt, expect=wrong_shape))
    assert len(read_one(str(tmp_path), fmt, expect=META)[c.KEY]) == 2  # the right expectations pass


def test_reader_refuses_other_schemas(tmp_path: Path) -> None:
    from schemas import SCORES, attach_metadata

    (tmp_path / "parquet").mkdir()
    pq.write_table(
        attach_metadata(SCORES.arrow.empty_table(), SCORES), tmp_path / "parquet" / "scores.parquet"
    )
    with pytest.raises(SchemaMismatchError, match=r"scores\.parquet: file has scores@2, expected latents@1"):
        list(read_latents(str(tmp_path), "parquet"))


def test_corrupt_and_truncated_files_are_refused_by_name(tmp_path: Path) -> None:
    table = to_latent_table(latent_rows(TINY_SHAPES, 3), "float32", META)
    parquet, tar = parquet_bytes(table), webdataset_bytes(table, "npy")
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        last_sample = t.getmember("24x24_000_0002.json").offset  # cut cleanly before the last sample
    chunk = (
        pq.ParquetFile(io.BytesIO(parquet))
        .metadata.row_group(0)
        .column(table.schema.get_field_index(c.CLIP_TEXT))
    )
    flipped = bytearray(parquet)
    flipped[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x10  # one bit inside a data page
    cases = {
        "parquet/flipped.parquet": (bytes(flipped), r"flipped\.parquet: not a readable latents Parquet"),
        "parquet/half.parquet": (
            parquet[: len(parquet) // 2],
            r"half\.parquet: not a readable latents Parquet",
        ),
        "parquet/junk.parquet": (b"PAR1" + b"\0" * 100, r"junk\.parquet: not a readable latents Parquet"),
        "webdataset/half.tar": (tar[: len(tar) // 2], r"half\.tar: .*truncated"),
        "webdataset/cut.tar": (
            tar[:last_sample],
            r"cut\.tar: its metadata promises 3 samples, found 2",
        ),
        "webdataset/junk.tar": (b"\x00junk" * 200, r"junk\.tar: "),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        with pytest.raises(LatentFileError, match=message):
            list(read_latents(str(path), name.split("/")[0]))
        path.unlink()
    (tmp_path / "parquet" / "half.parquet").write_bytes(parquet[:-100])  # refused before any Ray work
    with pytest.raises(LatentFileError, match=r"half\.parquet"):
        as_ray_dataset(str(tmp_path), "parquet")


def test_parquet_bytes_on_disk_near_raw_tensor_bytes(tmp_path: Path) -> None:
    table = to_latent_table(latent_rows(REAL_SHAPES, 2), "float16", META)
    [uri] = write_latent_files(table, str(tmp_path), "00007_24x24", formats=("parquet",))
    raw = sum(stored(latent_rows(REAL_SHAPES, 2)[name], "float16").nbytes for name in REAL_SHAPES)
    assert raw == 2 * 2 * (16 * 24 * 24 + 4 * 256 * 256 + 77 * 1280 + 1280 + 768)
    ratio = Path(uri).stat().st_size / raw
    print(f"parquet bytes / raw fp16 tensor bytes = {ratio:.4f}")
    assert ratio <= 1.05


def test_to_latent_table_refuses_bad_rows() -> None:
    rows = latent_rows(TINY_SHAPES, 2)
    with pytest.raises(ValueError, match=r"one file holds one bucket, rows has \['24x24', '32x16'\]"):
        to_latent_table(rows | {c.BUCKET: ["24x24", "32x16"]}, "float16", META)
    overflow = np.ones((2, 8), np.float32)
    overflow[1, 3] = 1e5  # > 65504: inf in fp16
    with pytest.raises(ValueError, match=r"column 'clip_img' has 1 non-finite value\(s\) in float16"):
        to_latent_table(rows | {c.CLIP_IMG: overflow}, "fp16")
    assert to_latent_table(rows | {c.CLIP_IMG: overflow}, "bf16").num_rows == 2
    with pytest.raises(ValueError, match=r"duplicate keys"):
        to_latent_table(rows | {c.KEY: ["a", "a"]})
    with pytest.raises(ValueError, match=r"\['reject_reason'\] that latents@1 does not store"):
        to_latent_table(rows | {"reject_reason": ["", ""]})
    with pytest.raises(ValueError, match=r"missing \['effnet'\]"):
        to_latent_table({k: v for k, v in rows.items() if k != c.EFFNET})


def test_projection_reads_only_the_asked_columns(tmp_path: Path) -> None:
    rows = latent_rows(TINY_SHAPES, 2)
    roots = write_all(to_latent_table(rows, "bfloat16", META), tmp_path)
    batches = [read_one(roots[src], src[0], columns=[c.CLIP_TEXT, c.BUCKET], expect=META) for src in SOURCES]
    for batch in batches:
        assert list(batch) == [c.KEY, c.BUCKET, c.CLIP_TEXT]
        assert_bit_identical(batches[0], batch)
    assert batches[0][c.CLIP_TEXT].tobytes() == stored(rows[c.CLIP_TEXT], "bfloat16").tobytes()


def _by_key(rows) -> dict:
    return {row[c.KEY]: row for row in rows}


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_as_ray_dataset_matches_the_iterator(fmt: str, ray_local, tmp_path: Path) -> None:
    for seed, (bucket, effnet) in enumerate((("24x24", (16, 3, 4)), ("32x16", (16, 2, 5)))):
        rows = latent_rows(TINY_SHAPES | {c.EFFNET: effnet}, 3, seed=seed, bucket=bucket)
        write_latent_files(to_latent_table(rows, "bfloat16", META), str(tmp_path), f"00007_{bucket}")
    expected = {}
    for batch in read_latents(str(tmp_path), fmt, expect=META, float32=True):
        expected |= {key: {k: v[i] for k, v in batch.items()} for i, key in enumerate(batch[c.KEY])}
    dataset = as_ray_dataset(str(tmp_path), fmt, expect=META, float32=True)
    got = _by_key(dataset.take_all())
    assert sorted(got) == sorted(expected) and len(got) == 6
    for key, row in got.items():
        for name in (c.EFFNET, c.CLIP_TEXT, c.CLIP_IMG):
            assert isinstance(row[name], np.ndarray) and row[name].dtype == np.float32
            assert np.array_equal(row[name], expected[key][name]), (key, name)
        assert row[c.CAPTION] == expected[key][c.CAPTION] and row[c.CROP_TOP] == expected[key][c.CROP_TOP]
    files = list_latent_files(str(tmp_path), fmt)
    one_bucket = as_ray_dataset(files[:1], fmt, columns=[c.EFFNET])
    batches = list(one_bucket.iter_batches(batch_size=None))
    assert sum(len(b[c.KEY]) for b in batches) == 3 and set(batches[0]) == {c.KEY, c.EFFNET}
    assert batches[0][c.EFFNET].dtype == np.uint16 and batches[0][c.EFFNET].shape[1:] == (16, 3, 4)


def test_as_ray_dataset_refuses_a_flipped_bit(ray_local, tmp_path: Path) -> None:
    """The footer is intact (the driver's check passes); the worker's page CRC check refuses the file."""
    table = to_latent_table(latent_rows(TINY_SHAPES, 3), "float16", META)
    data = bytearray(parquet_bytes(table))
    chunk = (
        pq.ParquetFile(io.BytesIO(data)).metadata.row_group(0).column(table.schema.get_field_index(c.EFFNET))
    )
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] ^= 0x01
    (tmp_path / "flipped.parquet").write_bytes(bytes(data))
    assert pq.read_table(tmp_path / "flipped.parquet").num_rows == 3  # plain pyarrow reads it silently
    with pytest.raises(Exception, match=r"flipped\.parquet: not a readable latents Parquet.*CRC"):
        as_ray_dataset(str(tmp_path), "parquet", expect=META).take_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_options():
    """A moto S3 server on loopback; credentials travel in the storage options (Ray workers need them)."""
    import fsspec
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {
        "endpoint_url": f"http://127.0.0.1:{port}",
        "key": "test",
        "secret": "test",
        "skip_instance_cache": True,
    }
    fsspec.filesystem("s3", **options).mkdir("latents")
    yield options
    server.stop()


def test_s3_round_trip_on_loopback(s3_options: dict, ray_local, tmp_path: Path) -> None:
    rows = latent_rows(TINY_SHAPES, 3)
    table = to_latent_table(rows, "float16", META)
    roots = write_all(table, "s3://latents/run1", options=s3_options)
    assert list_latent_files("s3://latents/run1/npy", "parquet", s3_options) == [
        "s3://latents/run1/npy/parquet/24x24/00007_24x24.parquet"
    ]
    local = write_all(table, tmp_path)
    for src in SOURCES:
        from_s3 = read_one(roots[src], src[0], expect=META, storage_options=s3_options)
        assert_bit_identical(read_one(local[src], src[0]), from_s3)
    got = _by_key(as_ray_dataset("s3://latents/run1/npy", "parquet", storage_options=s3_options).take_all())
    assert sorted(got) == sorted(rows[c.KEY])
    assert np.array_equal(got[rows[c.KEY][2]][c.EFFNET], stored(rows[c.EFFNET][2], "float16"))


def test_safetensors_bytes_are_plain_safetensors() -> None:
    table = to_latent_table(latent_rows(TINY_SHAPES, 1), "float32", META)
    with tarfile.open(fileobj=io.BytesIO(webdataset_bytes(table, "safetensors"))) as tar:
        member = tar.extractfile("24x24_000_0000.safetensors").read()
    from safetensors.numpy import load

    loaded = load(member)
    assert sorted(loaded) == sorted(TINY_SHAPES) and loaded[c.CLIP_TEXT].dtype == np.float32
    assert safetensors.deserialize(member)[0][1]["dtype"] == "F32"


def test_pooled_embeddings_are_stored_c_and_read_as_stage_c_takes_them(tmp_path: Path) -> None:
    """(N, 1, C) input is stored as (C,) per row; ``stage_c_shapes`` gives Stage C's (N, 1, C) back."""
    rows = latent_rows(TINY_SHAPES | {c.CLIP_TEXT_POOLED: (1, 8), c.CLIP_IMG: (1, 8)}, 2)
    write_latent_files(to_latent_table(rows, "float16", META), str(tmp_path), "00007")
    for fmt in ("parquet", "webdataset"):
        meta = read_file_metadata(list_latent_files(str(tmp_path), fmt)[0], fmt)
        assert meta.tensor_shapes[c.CLIP_TEXT_POOLED].shape == (8,) and meta.tensor_shapes[
            c.CLIP_IMG
        ].shape == (8,)
        plain = read_one(str(tmp_path), fmt)
        stage_c = read_one(str(tmp_path), fmt, stage_c_shapes=True)
        assert plain[c.CLIP_TEXT_POOLED].shape == (2, 8) and stage_c[c.CLIP_TEXT_POOLED].shape == (2, 1, 8)
        assert stage_c[c.CLIP_IMG].shape == (2, 1, 8) and stage_c[c.CLIP_TEXT].shape == (2, 7, 8)
        assert np.array_equal(stage_c[c.CLIP_IMG][:, 0], rows[c.CLIP_IMG][:, 0].astype(np.float16))


def _layout_1_tar(tar_bytes: bytes) -> bytes:
    """The same file as the writer made it before layout 2: metadata in a first ``__metadata__.json`` member."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        members = src.getmembers()
        first = json.load(src.extractfile(members[0]))
        header = {k: v for k, v in first.items() if k.startswith("cascade.") and k != "cascade.dtype"}
        header.pop("cascade.layout")
        for name, data in [("__metadata__.json", json.dumps(header).encode())] + [
            (m.name, src.extractfile(m).read()) for m in members
        ]:
            if name.endswith(".json") and name != "__metadata__.json":
                record = {
                    k: v for k, v in json.loads(data).items() if k == "cascade.dtype" or k not in header
                }
                data = json.dumps(record | {"cascade.metadata": "__metadata__.json"}).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_layout_1_files_still_read(tmp_path: Path) -> None:
    """Caches from before layout 2 (flat folders, tars with ``__metadata__.json`` first) read as before."""
    table = to_latent_table(latent_rows(TINY_SHAPES, 3), "bfloat16", META)
    (tmp_path / "parquet").mkdir()
    (tmp_path / "webdataset").mkdir()
    (tmp_path / "parquet" / "00007-24x24-abc.parquet").write_bytes(parquet_bytes(table))
    (tmp_path / "webdataset" / "00007-24x24-abc.tar").write_bytes(_layout_1_tar(webdataset_bytes(table)))
    assert_bit_identical(
        read_one(str(tmp_path), "parquet", expect=META), read_one(str(tmp_path), "webdataset")
    )
    tar = str(tmp_path / "webdataset" / "00007-24x24-abc.tar")
    assert read_file_metadata(tar, "webdataset") == read_file_metadata(
        str(tmp_path / "parquet" / "00007-24x24-abc.parquet")
    )


def test_an_empty_table_makes_no_tar() -> None:
    table = to_latent_table(latent_rows(TINY_SHAPES, 0), "float16", META)
    with pytest.raises(ValueError, match="at least one sample"):
        webdataset_bytes(table)
