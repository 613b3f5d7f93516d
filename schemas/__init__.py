"""Versioned Arrow schemas for every record kind, file metadata, validation and tensor columns (pyarrow only).

Write: ``table = attach_metadata(table, schema, FileMetadata(...))`` then ``pyarrow.parquet.write_table``.
Read: ``meta = validate_table(pq.read_table(path), "latents@1", source=path)``.
"""

from schemas.core import (
    ENCODER_FLAVORS_KEY,
    METADATA_KEYS,
    PREPROCESSING_HASH_KEY,
    SCHEMA_KEY,
    TENSOR_SHAPES_KEY,
    WEIGHTS_SHA256_KEY,
    FileMetadata,
    RecordSchema,
    SchemaMismatchError,
    attach_metadata,
    get_schema,
    parse_schema_id,
    preprocessing_hash,
    register,
    registered_ids,
    validate_table,
)
from schemas.records import (
    DEFAULT_EMBED_DIM,
    REJECTS,
    SAMPLES,
    SCORES,
    export_schema,
    huggingface_features,
    latents_schema,
    scores_schema,
)
from schemas.specs import FIELD_DTYPE_KEY, TENSOR_DTYPES, TensorSpec, canonical_dtype, tensor_field
from schemas.tensors import (
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
    nested_list_array,
    nested_list_to_numpy,
    tensor_array,
    tensor_to_numpy,
)

__all__ = [
    "DEFAULT_EMBED_DIM",
    "ENCODER_FLAVORS_KEY",
    "FIELD_DTYPE_KEY",
    "METADATA_KEYS",
    "PREPROCESSING_HASH_KEY",
    "REJECTS",
    "SAMPLES",
    "SCHEMA_KEY",
    "SCORES",
    "TENSOR_DTYPES",
    "TENSOR_SHAPES_KEY",
    "WEIGHTS_SHA256_KEY",
    "FileMetadata",
    "RecordSchema",
    "SchemaMismatchError",
    "TensorSpec",
    "attach_metadata",
    "bfloat16_bits_to_float32",
    "canonical_dtype",
    "export_schema",
    "float32_to_bfloat16_bits",
    "get_schema",
    "huggingface_features",
    "latents_schema",
    "nested_list_array",
    "nested_list_to_numpy",
    "parse_schema_id",
    "preprocessing_hash",
    "register",
    "registered_ids",
    "scores_schema",
    "tensor_array",
    "tensor_field",
    "tensor_to_numpy",
    "validate_table",
]
