"""Every schema survives Parquet: values bit for bit, validate_table passes, metadata intact."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import (
    REJECTS,
    SAMPLES,
    FileMetadata,
    RecordSchema,
    TensorSpec,
    attach_metadata,
    bfloat16_bits_to_float32,
    export_schema,
    latents_schema,
    nested_list_array,
    nested_list_to_numpy,
    scores_schema,
    tensor_to_numpy,
    validate_table,
)
from tests.schemas.factories import (
    REAL_SHAPES,
    REAL_SHAPES_WITH_STAGE_A,
    TINY_SHAPES,
    file_metadata,
    latent_scalars,
    latents_table,
    random_tensors,
)


def write_and_read(table: pa.Table, schema: RecordSchema, path) -> tuple[pa.Table, pa.Table, FileMetadata]:
    """attach -> write -> read -> validate (by id and by schema); returns (written, read, metadata)."""
    written = attach_metadata(table, schema, file_metadata())
    pq.write_table(written, path)
    read = pq.read_table(path)
    meta = validate_table(read, schema.id, source=str(path))
    assert validate_table(read, schema) == meta
    assert read.schema == written.schema  # types, nullability, field and schema metadata
    assert read.equals(written)
    expected = file_metadata()
    assert meta.encoder_flavors == expected.encoder_flavors
    assert meta.weights_sha256 == expected.weights_sha256
    assert meta.preprocessing_hash == expected.preprocessing_hash
    assert meta.tensor_shapes == schema.tensor_specs
    return written, read, meta


def test_samples_round_trip(tmp_path) -> None:
    images = [bytes(range(256)) * 3, b"\x89PNG\r\n\x1a\n" + bytes(1000), b""]
    table = pa.table(
        {
            "key": ["000000000", "000000001", "000000002"],
            "source": ["laion/00000.tar"] * 3,
            "caption": ["a cat", "ein Hund — ünïcode 🐕", ""],
            "image": pa.array(images, pa.binary()),
            "image_format": ["jpeg", "png", "webp"],
            "width": pa.array([640, 1, 4096], pa.int32()),
            "height": pa.array([480, 1, 2160], pa.int32()),
            "meta_json": ['{"url": "http://x/1.jpg"}', "{}", '{"nsfw": 0.1}'],
        }
    )
    _, read, meta = write_and_read(table, SAMPLES, tmp_path / "samples.parquet")
    assert read.column("image").to_pylist() == images
    assert meta.tensor_shapes == {}


def test_rejects_round_trip(tmp_path) -> None:
    table = pa.table(
        {
            "detail": ["PIL.UnidentifiedImageError: cannot identify", "x" * 2000],
            "key": ["k1", "k2"],
            "reason": ["decode_error", "too_small"],
            "source": ["shard-3", "shard-3"],
            "step": ["decode", "filter"],
        }
    )
    _, read, _ = write_and_read(table, REJECTS, tmp_path / "rejects.parquet")
    assert read.column_names == ["key", "source", "step", "reason", "detail"]  # schema order
    assert read.column("detail").to_pylist()[1] == "x" * 2000


@pytest.mark.parametrize("embed_dim", [768, 32])
def test_scores_round_trip(tmp_path, embed_dim: int) -> None:
    n = 4
    embeds = random_tensors({"e": (embed_dim,)}, n)["e"]
    schema = scores_schema(embed_dim)
    table = pa.table(
        {
            "key": [f"k{i}" for i in range(n)],
            "source": ["shard-1"] * n,
            "image_sha256": ["ab" * 32, "cd" * 32, "ab" * 32, "ef" * 32],
            "phash": pa.array([0, 1, 2**64 - 1, 0x8000000000000000], pa.uint64()),
            "width": pa.array([640, 512, 300, 2000], pa.int32()),
            "height": pa.array([480, 512, 900, 1000], pa.int32()),
            "aspect_ratio": pa.array([640 / 480, 1.0, 1 / 3, 2.0], pa.float32()),
            "caption_length": pa.array([5, 0, 77, 300], pa.int32()),
            "aesthetic_score": pa.array([5.5, 4.0, 6.8, 3.2], pa.float32()),
            "clip_similarity": pa.array([0.31, -0.02, 0.28, 0.19], pa.float32()),
            "clip_image_embeds": nested_list_array(embeds, "float32"),
            "watermark_probability": pa.array([0.1, None, 0.9, None], pa.float32()),
            "nsfw_probability": pa.array([None, 0.01, None, 0.5], pa.float32()),
        }
    )
    _, read, meta = write_and_read(table, schema, tmp_path / "scores.parquet")
    assert meta.tensor_shapes == {"clip_image_embeds": TensorSpec((embed_dim,), "float32")}
    assert np.array_equal(
        nested_list_to_numpy(read.column("clip_image_embeds")).view(np.uint32), embeds.view(np.uint32)
    )
    assert read.column("watermark_probability").null_count == 2
    assert read.column("phash").to_pylist() == [0, 1, 2**64 - 1, 2**63]  # all 64 bits survive


@pytest.mark.parametrize(
    ("shapes", "dtype"),
    [
        (REAL_SHAPES, "float16"),
        (REAL_SHAPES_WITH_STAGE_A, "float16"),
        (TINY_SHAPES, "float16"),
        (TINY_SHAPES, "bfloat16"),
        (TINY_SHAPES, "float32"),
        (REAL_SHAPES, "bfloat16"),
    ],
    ids=["real-fp16", "real-stage-a-fp16", "tiny-fp16", "tiny-bf16", "tiny-fp32", "real-bf16"],
)
def test_latents_round_trip(tmp_path, shapes: dict, dtype: str) -> None:
    table, arrays = latents_table(shapes, dtype, n=3)
    schema = latents_schema(shapes, dtype)
    _, read, _ = write_and_read(table, schema, tmp_path / "latents.parquet")
    tensor_shapes = json.loads(read.schema.metadata[b"cascade.tensor_shapes"])
    assert tensor_shapes["effnet"] == {"shape": list(shapes["effnet"]), "dtype": dtype}
    assert ("stage_a" in read.column_names) == ("stage_a" in shapes)
    storage = {"float16": np.uint16, "bfloat16": np.uint16, "float32": np.uint32}[dtype]
    for name, array in arrays.items():
        got = tensor_to_numpy(read.column(name))
        assert got.shape == (3, *shapes[name])
        assert np.array_equal(got.view(storage), array.to_numpy_ndarray().view(storage)), name
        assert read.schema.field(name).metadata == {b"cascade.dtype": dtype.encode()}
    if dtype == "bfloat16":  # bit patterns decode to the bf16-rounded values
        source = random_tensors(shapes, 3)["effnet"]
        decoded = bfloat16_bits_to_float32(tensor_to_numpy(read.column("effnet")))
        assert np.allclose(decoded, source, rtol=2**-8, atol=0)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("shapes", [REAL_SHAPES_WITH_STAGE_A, TINY_SHAPES], ids=["real", "tiny"])
def test_export_round_trip(tmp_path, shapes: dict, dtype: str) -> None:
    tensors = random_tensors(shapes, 2)
    columns = {name: nested_list_array(values, dtype) for name, values in tensors.items()}
    schema = export_schema(shapes, dtype)
    _, read, meta = write_and_read(
        pa.table({**latent_scalars(2), **columns}), schema, tmp_path / "export.parquet"
    )
    assert b"huggingface" in read.schema.metadata
    assert meta.tensor_shapes["clip_text"] == TensorSpec(shapes["clip_text"], dtype)
    for name, values in tensors.items():
        bits = np.uint16 if dtype == "float16" else np.uint32
        got = nested_list_to_numpy(read.column(name))
        assert np.array_equal(got.view(bits), values.astype(dtype).view(bits)), name
    with pytest.raises(ValueError, match="bfloat16' cannot be exported portably"):
        export_schema(shapes, "bf16")
