"""RecordSchema ids, the registry, FileMetadata (de)serialisation and the preprocessing hash."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pyarrow as pa
import pytest

from schemas import (
    ENCODER_FLAVORS_KEY,
    METADATA_KEYS,
    SAMPLES,
    SCORES,
    SCORES_V1,
    TENSOR_SHAPES_KEY,
    FileMetadata,
    RecordSchema,
    TensorSpec,
    canonical_dtype,
    get_schema,
    latents_schema,
    parse_schema_id,
    preprocessing_hash,
    registered_ids,
    scores_schema,
)
from tests.conftest import REPO_ROOT
from tests.schemas.factories import REAL_SHAPES, TINY_SHAPES, file_metadata, sha


def test_schema_ids_and_registry() -> None:
    assert SAMPLES.id == "samples@1"
    assert registered_ids() == (
        "dedup@1", "export@1", "latents@1", "rejects@1", "samples@1", "scores@1", "scores@2"
    )
    assert get_schema("samples@1") is SAMPLES
    assert get_schema("scores@2") == SCORES
    assert get_schema("scores@1") == SCORES_V1 and "phash" not in SCORES_V1.arrow.names
    assert parse_schema_id("latents@12") == ("latents", 12)
    with pytest.raises(ValueError, match=r"unknown schema samples@9; registered: dedup@1, export@1, latents@1"):
        get_schema("samples@9")
    for bad in ("samples", "samples@0", "Samples@1", "samples@v1"):
        with pytest.raises(ValueError, match="name@version"):
            parse_schema_id(bad)
    with pytest.raises(ValueError, match="name@version"):
        RecordSchema("bad name", 1, pa.schema([]))


def test_templates_resolve_from_file_metadata() -> None:
    tiny = latents_schema(TINY_SHAPES, "bf16")
    meta = FileMetadata(schema_id="latents@1", tensor_shapes=tiny.tensor_specs)
    assert get_schema("latents@1", meta) == tiny
    with pytest.raises(ValueError, match=r"latents@1 is a template.*latents_schema\(\)"):
        get_schema("latents@1")
    tiny_scores = scores_schema(32)
    meta = FileMetadata(schema_id="scores@2", tensor_shapes=tiny_scores.tensor_specs)
    assert get_schema("scores@2", meta) == tiny_scores
    assert get_schema("scores@1", meta) == scores_schema(32, version=1)
    assert tiny_scores.tensor_specs == {"clip_image_embeds": TensorSpec((32,), "float32")}


def test_latents_template_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match=r"unknown \['clip_vision'\] / missing \['clip_img'\]"):
        latents_schema({**{k: v for k, v in REAL_SHAPES.items() if k != "clip_img"}, "clip_vision": (768,)})
    with pytest.raises(ValueError, match=r"shapes\['effnet'\]=\(16, 24\) must have rank \(3,\)"):
        latents_schema({**REAL_SHAPES, "effnet": (16, 24)})
    with pytest.raises(ValueError, match="dtype='int8' is not a tensor dtype"):
        latents_schema(REAL_SHAPES, "int8")
    assert [canonical_dtype(d) for d in ("fp16", "bf16", "fp32", "float16")] == [
        "float16",
        "bfloat16",
        "float32",
        "float16",
    ]


def test_file_metadata_round_trips_through_arrow_metadata() -> None:
    meta = file_metadata()
    meta = FileMetadata(
        schema_id="latents@1",
        encoder_flavors=meta.encoder_flavors,
        weights_sha256=meta.weights_sha256,
        preprocessing_hash=meta.preprocessing_hash,
        tensor_shapes={"effnet": TensorSpec((16, 24, 24), "bfloat16")},
    )
    raw = meta.to_arrow()
    assert sorted(raw) == sorted(k.encode() for k in METADATA_KEYS)
    assert json.loads(raw[TENSOR_SHAPES_KEY.encode()]) == {
        "effnet": {"shape": [16, 24, 24], "dtype": "bfloat16"}
    }
    assert json.loads(raw[ENCODER_FLAVORS_KEY.encode()])["clip_text"] == "clip_bigg_text"
    assert FileMetadata.from_arrow(raw) == meta
    assert FileMetadata.from_arrow({k.decode(): v.decode() for k, v in raw.items()}) == meta


def test_file_metadata_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match=r"weights_sha256\['effnet'\]='abc' is not"):
        FileMetadata(weights_sha256={"effnet": "abc"})
    with pytest.raises(ValueError, match="is not a lowercase 64-hex"):
        FileMetadata(weights_sha256={"effnet": sha("x").upper()})
    with pytest.raises(ValueError, match=r"encoder_flavors\['effnet'\]='' must be"):
        FileMetadata(encoder_flavors={"effnet": ""})
    with pytest.raises(ValueError, match=r"no cascade\.schema metadata"):
        FileMetadata.from_arrow({b"other": b"x"})
    with pytest.raises(ValueError, match="malformed cascade metadata"):
        FileMetadata.from_arrow({b"cascade.schema": b"latents@1", b"cascade.tensor_shapes": b"{not json"})
    with pytest.raises(ValueError, match=r"shape=.* must have at least one dimension"):
        TensorSpec((16, 0), "float16")


def test_preprocessing_hash_is_stable_and_sensitive() -> None:
    spec = {"image_size_px": 768, "crop": "center", "resize": {"filter": "bicubic", "antialias": True}}
    reordered = {"resize": {"antialias": True, "filter": "bicubic"}, "crop": "center", "image_size_px": 768}
    expected = hashlib.sha256(
        b'{"crop":"center","image_size_px":768,"resize":{"antialias":true,"filter":"bicubic"}}'
    ).hexdigest()[:16]
    assert preprocessing_hash(spec) == preprocessing_hash(reordered) == expected
    assert preprocessing_hash({**spec, "image_size_px": 1024}) != expected
    assert preprocessing_hash({"size": (1, 2)}) == preprocessing_hash({"size": [1, 2]})
    with pytest.raises(TypeError, match="only JSON types"):
        preprocessing_hash({"size": {1, 2}})
    with pytest.raises(ValueError):
        preprocessing_hash({"scale": float("nan")})


def test_schemas_imports_neither_torch_nor_ray() -> None:
    code = "import sys, schemas; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT
    )
    assert out.stdout.strip() == "[]"
