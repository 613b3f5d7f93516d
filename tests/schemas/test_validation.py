"""attach_metadata / validate_table: every refusal names what is wrong (ids, columns, types)."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import (
    REJECTS,
    SCORES,
    SCORES_IDS,
    SCORES_V1,
    FileMetadata,
    RecordSchema,
    SchemaMismatchError,
    TensorSpec,
    attach_metadata,
    latents_schema,
    validate_table,
)
from tests.schemas.factories import REAL_SHAPES, TINY_SHAPES, file_metadata, latents_table, sha


def rejects_table(**overrides: pa.Array) -> pa.Table:
    columns = {
        "key": pa.array(["a", "b"]),
        "source": pa.array(["shard-0", "shard-0"]),
        "step": pa.array(["decode", "score"]),
        "reason": pa.array(["decode_error", "nan_score"]),
        "detail": pa.array(["OSError: truncated", ""]),
    }
    return pa.table({**columns, **overrides})


def scores_file(tmp_path) -> tuple[pa.Table, str]:
    """A scores@1 file (from before image_sha256 and phash) on disk and its path."""
    n = 2
    table = pa.table(
        {
            "key": ["a", "b"],
            "source": ["s", "s"],
            "width": pa.array([640, 512], pa.int32()),
            "height": pa.array([480, 512], pa.int32()),
            "aspect_ratio": pa.array([640 / 480, 1.0], pa.float32()),
            "caption_length": pa.array([12, 40], pa.int32()),
            "aesthetic_score": pa.array([5.5, 4.25], pa.float32()),
            "clip_similarity": pa.array([0.31, 0.12], pa.float32()),
            "clip_image_embeds": pa.FixedSizeListArray.from_arrays(
                pa.array([0.5] * 768 * n, pa.float32()), 768
            ),
            "watermark_probability": pa.array([0.1, None], pa.float32()),
            "nsfw_probability": pa.array([None, 0.01], pa.float32()),
        }
    )
    path = str(tmp_path / "scores-00000.parquet")
    pq.write_table(attach_metadata(table, SCORES_V1, file_metadata()), path)
    return pq.read_table(path), path


def test_version_mismatch_names_both_ids_and_the_file(tmp_path) -> None:
    table, path = scores_file(tmp_path)
    with pytest.raises(SchemaMismatchError, match=rf"^{path}: file has scores@1, expected scores@2$"):
        validate_table(table, SCORES, source=path)
    with pytest.raises(ValueError, match=r"^file has scores@1, expected scores@2$"):
        validate_table(table, "scores@2")
    with pytest.raises(SchemaMismatchError, match=r"file has scores@1, expected latents@1"):
        validate_table(table, "latents@1")
    assert validate_table(table, "scores@1", source=path).schema_id == "scores@1"
    assert validate_table(table, SCORES_IDS, source=path).schema_id == "scores@1"  # readers take both
    with pytest.raises(SchemaMismatchError, match=r"file has scores@1, expected dedup@1 or latents@1$"):
        validate_table(table, ("dedup@1", "latents@1"))


def test_missing_metadata_names_the_expected_id(tmp_path) -> None:
    path = tmp_path / "plain.parquet"
    pq.write_table(rejects_table(), path)
    with pytest.raises(
        SchemaMismatchError, match=r"plain.parquet: no cascade.schema metadata, expected rejects@1"
    ):
        validate_table(pq.read_table(path), "rejects@1", source=str(path))


def test_missing_extra_and_mistyped_columns_are_named() -> None:
    schema = RecordSchema("rejects", 1, rejects_table().schema)  # the registered one has non-null fields
    good = attach_metadata(rejects_table(), REJECTS)
    with pytest.raises(SchemaMismatchError, match=r"missing column\(s\) \['detail'\] for rejects@1"):
        validate_table(good.drop_columns(["detail"]), "rejects@1")
    with pytest.raises(SchemaMismatchError, match=r"unexpected column\(s\) \['extra'\] for rejects@1"):
        validate_table(good.append_column("extra", pa.array([1, 2])), "rejects@1")
    wrong = good.set_column(2, "step", pa.array([1, 2], pa.int64()))
    with pytest.raises(SchemaMismatchError, match=r"column 'step' has type int64, rejects@1 expects string"):
        validate_table(wrong, "rejects@1")
    with pytest.raises(
        SchemaMismatchError, match=r"column 'reason' has 1 null\(s\); rejects@1 forbids nulls"
    ):
        attach_metadata(rejects_table(reason=pa.array(["x", None])), REJECTS)
    with pytest.raises(SchemaMismatchError, match=r"column 'key' has type int64"):
        attach_metadata(rejects_table(key=pa.array([1, 2])), schema)
    assert validate_table(good.select(["key", "step"]), "rejects@1", columns=["key", "step"]).schema_id
    with pytest.raises(SchemaMismatchError, match=r"unknown column\(s\) \['nope'\]"):
        validate_table(good, "rejects@1", columns=["nope"])


def test_equivalent_string_types_are_accepted_and_normalised() -> None:
    big = rejects_table(
        detail=pa.array(["x", "y"], pa.large_string()), key=pa.array(["a", "b"], pa.string_view())
    )
    table = attach_metadata(big, REJECTS)
    assert table.schema.field("detail").type == pa.string()
    assert table.schema.field("key").type == pa.string()
    assert not table.schema.field("key").nullable
    validate_table(big.replace_schema_metadata(table.schema.metadata), "rejects@1")


def test_template_shapes_are_checked(tmp_path) -> None:
    table, _ = latents_table(TINY_SHAPES, "float16", n=2)
    tiny = latents_schema(TINY_SHAPES, "float16")
    path = tmp_path / "tiny.parquet"
    pq.write_table(attach_metadata(table, tiny, file_metadata()), path)
    read = pq.read_table(path)
    assert validate_table(read, "latents@1").tensor_shapes["effnet"] == TensorSpec((16, 8, 12), "float16")
    real = latents_schema({**REAL_SHAPES, "stage_a": (4, 192, 192)}, "float16")
    with pytest.raises(
        SchemaMismatchError, match=r"column 'effnet' has type extension<arrow.fixed_shape_tensor"
    ):
        validate_table(read, real, source=str(path))
    bf16 = latents_schema(TINY_SHAPES, "bfloat16")
    with pytest.raises(SchemaMismatchError, match=r"column 'effnet' has type .*halffloat.*uint16"):
        validate_table(read, bf16)
    # Metadata that disagrees with the columns (edited by hand) is refused too.
    meta = FileMetadata.from_arrow(read.schema.metadata)
    shapes = {**meta.tensor_shapes, "clip_img": TensorSpec((768,), "float16")}
    edited = dataclasses.replace(meta, tensor_shapes=shapes).to_arrow()
    with pytest.raises(
        SchemaMismatchError, match=r"says column 'clip_img' is float16\[768\], latents@1 expects"
    ):
        validate_table(read.replace_schema_metadata(edited), tiny)


def test_attach_metadata_refuses_inconsistent_metadata() -> None:
    table, _ = latents_table(TINY_SHAPES, "float16", n=1)
    tiny = latents_schema(TINY_SHAPES, "float16")
    with pytest.raises(ValueError, match=r"schema_id='scores@1' but the schema is latents@1"):
        attach_metadata(table, tiny, FileMetadata(schema_id="scores@1"))
    wrong = FileMetadata(tensor_shapes={"effnet": TensorSpec((16, 24, 24), "float16")})
    with pytest.raises(ValueError, match=r"tensor_shapes \{'effnet': 'float16\[16, 24, 24\]'\} disagree"):
        attach_metadata(table, tiny, wrong)
    other = FileMetadata(weights_sha256={"effnet": sha("w")})
    out = attach_metadata(table.replace_schema_metadata({"keep": "me"}), tiny, other)
    assert out.schema.metadata[b"keep"] == b"me"
    assert FileMetadata.from_arrow(out.schema.metadata).tensor_shapes == tiny.tensor_specs


def test_template_without_usable_shapes_is_refused(tmp_path) -> None:
    table, _ = latents_table(TINY_SHAPES, "float16", n=1)
    written = attach_metadata(table, latents_schema(TINY_SHAPES, "float16"))
    meta = dataclasses.replace(FileMetadata.from_arrow(written.schema.metadata), tensor_shapes={})
    stripped = written.replace_schema_metadata(meta.to_arrow())
    with pytest.raises(SchemaMismatchError, match=r"^f.parquet: latents@1 is a template"):
        validate_table(stripped, "latents@1", source="f.parquet")
