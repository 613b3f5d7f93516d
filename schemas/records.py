"""The record kinds: samples@1, rejects@1, scores@2 (and the older scores@1), the templates latents@1 and
export@1, and dedup@1.

Templates are parameterised by tensor shapes (per file: aspect buckets and flavors go to separate files) and
dtype. ``get_schema("latents@1", file_metadata)`` rebuilds a template from a file's ``cascade.tensor_shapes``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from schemas import columns as c
from schemas.core import FileMetadata, RecordSchema, register
from schemas.specs import TensorSpec, canonical_dtype, tensor_field

SAMPLES = RecordSchema(
    "samples",
    1,
    pa.schema(
        [
            pa.field(c.KEY, pa.string(), nullable=False),
            pa.field(c.SOURCE, pa.string(), nullable=False),
            pa.field(c.CAPTION, pa.string(), nullable=False),
            pa.field(c.IMAGE, pa.binary(), nullable=False),
            pa.field(c.IMAGE_FORMAT, pa.string(), nullable=False),
            pa.field(c.WIDTH, pa.int32(), nullable=False),
            pa.field(c.HEIGHT, pa.int32(), nullable=False),
            pa.field(c.META_JSON, pa.string(), nullable=False),
        ]
    ),
    "One image–text sample: original encoded image bytes, caption, size, JSON sidecar.",
)

REJECTS = RecordSchema(
    "rejects",
    1,
    pa.schema([pa.field(name, pa.string(), nullable=False) for name in c.REJECT_RECORD_COLUMNS]),
    "One rejected row: which step refused it, a short reason and a free-form detail.",
)

DEFAULT_EMBED_DIM = 768  # CLIP-L image embedding width (tiny flavors use 32)


SCORES_VERSION = 2  # 2 added image_sha256 and phash (what dedup needs); readers take 1 and 2
SCORES_IDS = ("scores@2", "scores@1")


def scores_schema(embed_dim: int = DEFAULT_EMBED_DIM, version: int = SCORES_VERSION) -> RecordSchema:
    """scores@2 with CLIP image embeddings of width ``embed_dim`` (768 for CLIP-L, smaller for tiny flavors).

    ``version=1`` is the layout before ``image_sha256`` (sha256 of the image bytes) and ``phash`` (64-bit
    perceptual hash of the decoded image) were added.
    """
    if embed_dim < 1:
        raise ValueError(f"embed_dim={embed_dim} must be >= 1")
    if version not in (1, 2):
        raise ValueError(f"scores version={version}; known: 1, 2")
    f32 = pa.float32()
    hashes = [pa.field(c.IMAGE_SHA256, pa.string(), nullable=False), pa.field(c.PHASH, pa.uint64(), nullable=False)]
    fields = [
        pa.field(c.KEY, pa.string(), nullable=False),
        pa.field(c.SOURCE, pa.string(), nullable=False),
        *(hashes if version >= 2 else []),
        pa.field(c.WIDTH, pa.int32(), nullable=False),
        pa.field(c.HEIGHT, pa.int32(), nullable=False),
        pa.field(c.ASPECT_RATIO, f32, nullable=False),
        pa.field(c.CAPTION_LENGTH, pa.int32(), nullable=False),
        pa.field(c.AESTHETIC_SCORE, f32, nullable=False),
        pa.field(c.CLIP_SIMILARITY, f32, nullable=False),
        tensor_field(c.CLIP_IMAGE_EMBEDS, TensorSpec((embed_dim,), "float32"), nested_lists=True),
        pa.field(c.WATERMARK_PROBABILITY, f32, nullable=True),
        pa.field(c.NSFW_PROBABILITY, f32, nullable=True),
    ]
    return RecordSchema("scores", version, pa.schema(fields), "Per-sample scores and the CLIP-L image embedding.")


SCORES = scores_schema()
SCORES_V1 = scores_schema(version=1)

DEDUP = RecordSchema(
    "dedup",
    1,
    pa.schema(
        [
            pa.field(c.KEY, pa.string(), nullable=False),
            pa.field(c.SOURCE, pa.string(), nullable=False),
            pa.field(c.DUPLICATE_OF, pa.string(), nullable=True),
            pa.field(c.DEDUP_KIND, pa.string(), nullable=True),
            pa.field(c.DEDUP_SIMILARITY, pa.float32(), nullable=True),
            pa.field(c.DEDUP_CLUSTER, pa.int32(), nullable=False),
            pa.field(c.NN_SIMILARITY, pa.float32(), nullable=False),
        ]
    ),
    "Per-key dedup verdict: the kept key it duplicates (null: kept), how, and how similar.",
)

# Latent records: scalar columns shared by latents@1 and export@1.
_LATENT_SCALARS = [
    pa.field(c.KEY, pa.string(), nullable=False),
    pa.field(c.CAPTION, pa.string(), nullable=False),
    pa.field(c.SOURCE_SHARD, pa.string(), nullable=False),
    pa.field(c.IMAGE_SHA256, pa.string(), nullable=False),
    pa.field(c.BUCKET, pa.string(), nullable=False),
    *(
        pa.field(name, pa.int32(), nullable=False)
        for name in (c.ORIG_WIDTH, c.ORIG_HEIGHT, c.CROP_LEFT, c.CROP_TOP, c.CROP_RIGHT, c.CROP_BOTTOM)
    ),
]
# Allowed ranks of each tensor column (per row). stage_a and the stage_b_effnet_{s} columns are optional.
_TENSOR_RANKS = {
    c.EFFNET: (3,),  # 16×h×w
    c.STAGE_A: (3,),  # 4×H/4×W/4
    c.CLIP_TEXT: (2,),  # 77×1280
    c.CLIP_TEXT_POOLED: (1, 2),  # stored (1280,); (1, 1280) read from files written before that was fixed
    c.CLIP_IMG: (1, 2),  # stored (768,); (1, 768) likewise. Readers give Stage C's (B, 1, C) on request
}
POOLED_COLUMNS = (c.CLIP_TEXT_POOLED, c.CLIP_IMG)  # stored (C,); Stage C takes them as (B, 1, C)
_OPTIONAL = (c.STAGE_A,)


def _tensor_specs(shapes: Mapping[str, tuple[int, ...]], dtype: str) -> dict[str, TensorSpec]:
    stage_b = sorted((s, name) for name in shapes if (s := c.stage_b_effnet_cells(name)) is not None)
    unknown = sorted(set(shapes) - set(_TENSOR_RANKS) - {name for _, name in stage_b})
    missing = [name for name in _TENSOR_RANKS if name not in shapes and name not in _OPTIONAL]
    if unknown or missing:
        raise ValueError(
            f"shapes has unknown {unknown} / missing {missing} tensor columns; allowed: {list(_TENSOR_RANKS)} "
            f"({list(_OPTIONAL)} and {c.STAGE_B_EFFNET_PREFIX}{{cells}} optional)"
        )
    specs = {}
    for name in _TENSOR_RANKS:  # fixed column order
        if name in shapes:
            spec = TensorSpec(tuple(shapes[name]), canonical_dtype(dtype))
            if len(spec.shape) not in _TENSOR_RANKS[name]:
                raise ValueError(f"shapes[{name!r}]={spec.shape} must have rank {_TENSOR_RANKS[name]}")
            specs[name] = spec
    for cells, name in stage_b:  # then the Stage B sizes, ascending
        spec = TensorSpec(tuple(shapes[name]), canonical_dtype(dtype))
        if len(spec.shape) != 3 or spec.shape[1:] != (cells, cells):
            raise ValueError(f"shapes[{name!r}]={spec.shape} must be (channels, {cells}, {cells})")
        specs[name] = spec
    return specs


def latents_schema(shapes: Mapping[str, tuple[int, ...]], dtype: str = "float16") -> RecordSchema:
    """latents@1: one row per encoded sample, tensor columns as Arrow fixed-shape tensors.

    Args:
        shapes: per-row shape of each tensor column: ``effnet`` (16,h,w), optional ``stage_a`` (4,H/4,W/4),
            ``clip_text`` (77,1280), ``clip_text_pooled`` (1280,), ``clip_img`` (768,) — tiny flavors differ;
            the writer stores the pooled embeddings as (C,) and Stage C takes them as (B, 1, C) —
            and optional ``stage_b_effnet_{s}`` (16,s,s) Stage B conditioning latents (after the others,
            ascending ``s``).
        dtype: ``float16`` (default), ``bfloat16`` (stored as uint16 bit patterns) or ``float32``.
    """
    specs = _tensor_specs(shapes, dtype)
    fields = _LATENT_SCALARS + [tensor_field(name, spec) for name, spec in specs.items()]
    return RecordSchema("latents", 1, pa.schema(fields), "Cached encoder outputs of one sample.")


def export_schema(shapes: Mapping[str, tuple[int, ...]], dtype: str = "float16") -> RecordSchema:
    """export@1: latents@1 for third-party readers (pyarrow, polars, duckdb, Hugging Face datasets).

    Tensor columns are nested fixed-size lists (``fixed_size_list<fixed_size_list<float16>[w]>[h]``...), the
    layout every reader understands; the schema metadata carries the ``huggingface`` features (see
    ``huggingface_features``). dtype is float16 or float32: bfloat16 has no portable representation.
    """
    if canonical_dtype(dtype) == "bfloat16":
        raise ValueError("dtype='bfloat16' cannot be exported portably; use 'float16' or 'float32'")
    specs = _tensor_specs(shapes, dtype)
    fields = _LATENT_SCALARS + [tensor_field(name, spec, nested_lists=True) for name, spec in specs.items()]
    arrow = pa.schema(fields)
    arrow = arrow.with_metadata({b"huggingface": json.dumps(huggingface_features(arrow)).encode()})
    return RecordSchema("export", 1, arrow, "Latent records in a layout third-party Parquet readers load.")


_HF_VALUE_TYPES = {
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
}


def huggingface_features(arrow: pa.Schema) -> dict[str, Any]:
    """The ``huggingface`` schema-metadata value (``{"info": {"features": ...}}``) for ``arrow``.

    Nested fixed-size lists are described as nested ``Sequence(length=n)`` features: they match the stored
    Arrow type exactly, so ``datasets`` keeps them (datasets >= 4 shows them as ``List(..., length=n)``).
    ``Array3D`` features would describe a different Arrow type (datasets' own extension type over variable
    lists), which ``datasets`` 5.2 silently drops for fixed-size-list storage.
    """

    def feature(typ: pa.DataType) -> dict[str, Any]:
        if pa.types.is_fixed_size_list(typ):
            return {"feature": feature(typ.value_type), "length": typ.list_size, "_type": "Sequence"}
        if typ not in _HF_VALUE_TYPES:
            raise ValueError(f"no Hugging Face feature for Arrow type {typ}")
        return {"dtype": _HF_VALUE_TYPES[typ], "_type": "Value"}

    return {"info": {"features": {f.name: feature(f.type) for f in arrow}}}


def _template(build: Any, name: str) -> Any:
    """A registry resolver that rebuilds a tensor-shape template from a file's ``tensor_shapes``."""

    def resolve(meta: FileMetadata | None) -> RecordSchema:
        if meta is None or not meta.tensor_shapes:
            raise ValueError(
                f"{name} is a template: its tensor shapes come from file metadata or {build.__name__}()"
            )
        dtypes = {spec.dtype for spec in meta.tensor_shapes.values()}
        if len(dtypes) != 1:
            raise ValueError(
                f"{name} needs one dtype for all tensor columns, file metadata has {sorted(dtypes)}"
            )
        return build({col: spec.shape for col, spec in meta.tensor_shapes.items()}, dtypes.pop())

    return resolve


def _scores_from_metadata(version: int) -> Any:
    def resolve(meta: FileMetadata | None) -> RecordSchema:
        spec = meta.tensor_shapes.get(c.CLIP_IMAGE_EMBEDS) if meta else None
        return scores_schema(spec.shape[0] if spec else DEFAULT_EMBED_DIM, version)

    return resolve


register(SAMPLES.id, SAMPLES)
register(REJECTS.id, REJECTS)
register(DEDUP.id, DEDUP)
register(SCORES.id, _scores_from_metadata(2))
register(SCORES_V1.id, _scores_from_metadata(1))
register("latents@1", _template(latents_schema, "latents@1"))
register("export@1", _template(export_schema, "export@1"))
