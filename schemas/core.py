"""Versioned record schemas (``name@version``), file metadata and the schema registry. pyarrow + stdlib only.

Every file this platform writes carries five ``cascade.*`` schema-metadata keys (see ``FileMetadata``):
the schema id, the encoder flavors, the weights sha256, the preprocessing hash and the tensor shapes; latent
and export files add ``cascade.random_weights`` ("true"/"false": an encoder ran on seeded random weights),
and files with Stage B conditioning columns ``cascade.stage_b_conditioning`` (``OPTIONAL_METADATA_KEYS``).
``attach_metadata`` puts them on a table before it is written; ``validate_table`` checks a table read back.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa

from schemas.specs import TensorSpec, tensor_spec_of_field

SCHEMA_KEY = "cascade.schema"
ENCODER_FLAVORS_KEY = "cascade.encoder_flavors"  # JSON {role: flavor}, e.g. {"effnet": "effnet/tiny"}
WEIGHTS_SHA256_KEY = "cascade.weights_sha256"  # JSON {role: sha256 hex of the weights file}
PREPROCESSING_HASH_KEY = "cascade.preprocessing_hash"  # preprocessing_hash() of the preprocessing params
TENSOR_SHAPES_KEY = "cascade.tensor_shapes"  # JSON {column: {"shape": [dims], "dtype": "float16"}}
METADATA_KEYS = (
    SCHEMA_KEY,
    ENCODER_FLAVORS_KEY,
    WEIGHTS_SHA256_KEY,
    PREPROCESSING_HASH_KEY,
    TENSOR_SHAPES_KEY,
)
# JSON {"mode", "cells", "bytes_per_sample", ...}: how the stage_b_effnet_{s} columns were made (encode's
# pipelines.encode.stage_b); written only when a file has them, so older files and readers are unaffected.
STAGE_B_CONDITIONING_KEY = "cascade.stage_b_conditioning"
# JSON true/false: some encoder that made the data ran on random weights (a ``*/tiny`` flavor without a weights
# file). Every latent and export file has it; files from before the key lack it (``FileMetadata.random_weights``
# None: tell from the flavors).
RANDOM_WEIGHTS_KEY = "cascade.random_weights"
OPTIONAL_METADATA_KEYS = (STAGE_B_CONDITIONING_KEY, RANDOM_WEIGHTS_KEY)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^([a-z][a-z0-9_]*)@([1-9][0-9]*)$")


def parse_schema_id(schema_id: str) -> tuple[str, int]:
    """Split ``"name@version"`` into ``(name, version)``."""
    match = _ID.match(schema_id)
    if match is None:
        raise ValueError(f"schema id {schema_id!r} is not of the form 'name@version' (e.g. 'samples@1')")
    return match.group(1), int(match.group(2))


@dataclass(frozen=True)
class RecordSchema:
    """One versioned record kind: an Arrow schema with a name, a version and a one-line doc."""

    name: str
    version: int
    arrow: pa.Schema
    doc: str = ""

    def __post_init__(self) -> None:
        parse_schema_id(f"{self.name}@{self.version}")

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tensor_specs(self) -> dict[str, TensorSpec]:
        """Shape and dtype of every tensor column, derived from the Arrow types."""
        specs = {}
        for f in self.arrow:
            spec = tensor_spec_of_field(f)
            if spec is not None:
                specs[f.name] = spec
        return specs


@dataclass(frozen=True, kw_only=True)
class FileMetadata:
    """The ``cascade.*`` metadata of one file.

    Attributes:
        schema_id: ``name@version`` of the records in the file.
        encoder_flavors: model role -> flavor name (``{"effnet": "effnet", "clip_text": "clip_bigg_text"}``).
        weights_sha256: model role -> sha256 hex digest of the weights that produced the file.
        preprocessing_hash: ``preprocessing_hash()`` of the preprocessing parameters ("" where none apply).
        tensor_shapes: tensor column -> ``TensorSpec``; ``attach_metadata`` fills it from the schema.
        stage_b_conditioning: how the ``stage_b_effnet_{s}`` columns were made (JSON object; empty: none).
        random_weights: whether an encoder that made the data ran on random weights (None: not recorded).
    """

    schema_id: str = ""
    encoder_flavors: Mapping[str, str] = field(default_factory=dict)
    weights_sha256: Mapping[str, str] = field(default_factory=dict)
    preprocessing_hash: str = ""
    tensor_shapes: Mapping[str, TensorSpec] = field(default_factory=dict)
    stage_b_conditioning: Mapping[str, Any] = field(default_factory=dict)
    random_weights: bool | None = None

    def __post_init__(self) -> None:
        if self.schema_id:
            parse_schema_id(self.schema_id)
        for role, sha in self.weights_sha256.items():
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise ValueError(f"weights_sha256[{role!r}]={sha!r} is not a lowercase 64-hex sha256 digest")
        for role, flavor in self.encoder_flavors.items():
            if not isinstance(flavor, str) or not flavor:
                raise ValueError(f"encoder_flavors[{role!r}]={flavor!r} must be a non-empty flavor name")
        for column, spec in self.tensor_shapes.items():
            if not isinstance(spec, TensorSpec):
                raise TypeError(f"tensor_shapes[{column!r}] is {type(spec).__name__}, expected TensorSpec")
        if not isinstance(self.stage_b_conditioning, Mapping):
            raise TypeError(f"stage_b_conditioning={self.stage_b_conditioning!r} must be a JSON object")
        if self.random_weights is not None and not isinstance(self.random_weights, bool):
            raise TypeError(f"random_weights={self.random_weights!r} must be true, false or None")

    @property
    def made_by_random_weights(self) -> bool:
        """``random_weights``, or for files from before that key, whether any encoder is a ``*/tiny`` flavor (the
        only ones that ran without weights)."""
        if self.random_weights is not None:
            return self.random_weights
        return any(flavor.endswith("/tiny") for flavor in self.encoder_flavors.values())

    def to_arrow(self) -> dict[bytes, bytes]:
        """The five ``cascade.*`` keys (plus the optional ones that are set) as Arrow schema metadata (JSON
        values, sorted keys)."""
        shapes = {c: s.to_json() for c, s in self.tensor_shapes.items()}
        values = {
            SCHEMA_KEY: self.schema_id,
            ENCODER_FLAVORS_KEY: _dumps(dict(self.encoder_flavors)),
            WEIGHTS_SHA256_KEY: _dumps(dict(self.weights_sha256)),
            PREPROCESSING_HASH_KEY: self.preprocessing_hash,
            TENSOR_SHAPES_KEY: _dumps(shapes),
        }
        if self.stage_b_conditioning:
            values[STAGE_B_CONDITIONING_KEY] = _dumps(dict(self.stage_b_conditioning))
        if self.random_weights is not None:
            values[RANDOM_WEIGHTS_KEY] = _dumps(self.random_weights)
        return {k.encode(): v.encode() for k, v in values.items()}

    @classmethod
    def from_arrow(cls, metadata: Mapping[bytes, bytes] | Mapping[str, str] | None) -> FileMetadata:
        """Parse Arrow schema metadata; ValueError when ``cascade.schema`` is absent or a value is malformed."""
        meta = {_text(k): _text(v) for k, v in (metadata or {}).items()}
        if SCHEMA_KEY not in meta:
            raise ValueError(f"no {SCHEMA_KEY} metadata")
        try:
            shapes = json.loads(meta.get(TENSOR_SHAPES_KEY, "{}"))
            return cls(
                schema_id=meta[SCHEMA_KEY],
                encoder_flavors=json.loads(meta.get(ENCODER_FLAVORS_KEY, "{}")),
                weights_sha256=json.loads(meta.get(WEIGHTS_SHA256_KEY, "{}")),
                preprocessing_hash=meta.get(PREPROCESSING_HASH_KEY, ""),
                tensor_shapes={c: TensorSpec(tuple(s["shape"]), s["dtype"]) for c, s in shapes.items()},
                stage_b_conditioning=json.loads(meta.get(STAGE_B_CONDITIONING_KEY, "{}")),
                random_weights=json.loads(meta.get(RANDOM_WEIGHTS_KEY, "null")),
            )
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"malformed cascade metadata: {err!r}") from err


def preprocessing_hash(spec: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit hash of preprocessing parameters (sha256 of canonical JSON).

    Key order does not matter; tuples hash like lists; ``1`` and ``1.0`` hash differently. Values must be
    JSON types (TypeError otherwise) and finite.
    """
    try:
        text = json.dumps(spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except TypeError as err:
        raise TypeError(f"preprocessing spec must contain only JSON types: {err}") from err
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SchemaMismatchError(ValueError):
    """A table does not match the schema a reader expects (wrong id, columns, types or metadata)."""


def attach_metadata(
    table: pa.Table, schema: RecordSchema, file_metadata: FileMetadata | None = None
) -> pa.Table:
    """Check ``table`` against ``schema`` and return it in schema order with the ``cascade.*`` metadata.

    Equivalent string/binary types (large, view) are cast to the schema's. ``tensor_shapes`` is derived from
    the schema; a given one must agree. Other existing schema metadata keys are kept.
    """
    meta = file_metadata or FileMetadata()
    if meta.schema_id and meta.schema_id != schema.id:
        raise ValueError(f"file_metadata.schema_id={meta.schema_id!r} but the schema is {schema.id}")
    specs = schema.tensor_specs
    if meta.tensor_shapes and dict(meta.tensor_shapes) != specs:
        given = {c: str(s) for c, s in meta.tensor_shapes.items()}
        wanted = {c: str(s) for c, s in specs.items()}
        raise ValueError(f"tensor_shapes {given} disagree with {schema.id}: {wanted}")
    meta = replace(meta, schema_id=schema.id, tensor_shapes=specs)
    _check_columns(table, schema, "", None)
    merged = {**(table.schema.metadata or {}), **(schema.arrow.metadata or {}), **meta.to_arrow()}
    return table.select(schema.arrow.names).cast(schema.arrow.with_metadata(merged))


def validate_table(
    table: pa.Table,
    expected: RecordSchema | str | tuple[str, ...],
    *,
    source: str | None = None,
    columns: Sequence[str] | None = None,
) -> FileMetadata:
    """Refuse a table that is not ``expected``; return its ``FileMetadata``.

    Args:
        table: a table as read from a file (its schema metadata included).
        expected: the schema, or a registered id (templates are then built from the file's tensor shapes), or
            a tuple of accepted ids (e.g. ``SCORES_IDS``: a reader that takes an older version too).
        source: the file name, quoted in error messages.
        columns: check only these columns (for projected reads); default: exactly the schema's columns.

    Raises:
        SchemaMismatchError: naming both schema ids, or the offending column.
    """
    where = f"{source}: " if source else ""
    accepted = expected if isinstance(expected, tuple) else (expected if isinstance(expected, str) else expected.id,)
    for schema_id in accepted:
        parse_schema_id(schema_id)
    expected_id = " or ".join(accepted)
    try:
        meta = FileMetadata.from_arrow(table.schema.metadata)
    except ValueError as err:
        raise SchemaMismatchError(f"{where}{err}, expected {expected_id}") from None
    if meta.schema_id not in accepted:
        raise SchemaMismatchError(f"{where}file has {meta.schema_id}, expected {expected_id}")
    if isinstance(expected, tuple):
        expected = meta.schema_id
    try:
        schema = get_schema(expected, meta) if isinstance(expected, str) else expected
    except ValueError as err:  # a template that the file's tensor_shapes cannot build
        raise SchemaMismatchError(f"{where}{err}") from None
    _check_columns(table, schema, where, columns)
    specs = schema.tensor_specs
    for name in columns if columns is not None else schema.arrow.names:
        found = meta.tensor_shapes.get(name)
        if name in specs and found != specs[name]:
            raise SchemaMismatchError(
                f"{where}{TENSOR_SHAPES_KEY} says column {name!r} is {found}, {schema.id} expects {specs[name]}"
            )
    return meta


_EQUIVALENT_TYPES = (
    {pa.string(), pa.large_string(), pa.string_view()},
    {pa.binary(), pa.large_binary(), pa.binary_view()},
)


def _check_columns(table: pa.Table, schema: RecordSchema, where: str, columns: Sequence[str] | None) -> None:
    names = list(columns) if columns is not None else schema.arrow.names
    found_names = table.schema.names
    problems = [
        ("unknown", [c for c in names if c not in schema.arrow.names]),
        ("duplicate", sorted({c for c in found_names if found_names.count(c) > 1})),
        ("missing", [c for c in names if c not in found_names]),
        (
            "unexpected",
            [] if columns is not None else [c for c in found_names if c not in schema.arrow.names],
        ),
    ]
    for what, bad in problems:
        if bad:
            raise SchemaMismatchError(f"{where}{what} column(s) {bad} for {schema.id}")
    for name in names:
        found, want = table.schema.field(name).type, schema.arrow.field(name)
        if found != want.type and not any(found in g and want.type in g for g in _EQUIVALENT_TYPES):
            raise SchemaMismatchError(
                f"{where}column {name!r} has type {found}, {schema.id} expects {want.type}"
            )
        nulls = table.column(name).null_count
        if nulls and not want.nullable:
            raise SchemaMismatchError(
                f"{where}column {name!r} has {nulls} null(s); {schema.id} forbids nulls"
            )


# --- registry: schema id -> resolver(file metadata or None) -> RecordSchema --------------------------------
Resolver = Callable[[FileMetadata | None], RecordSchema]
_REGISTRY: dict[str, Resolver] = {}


def register(schema_id: str, resolver: RecordSchema | Resolver) -> None:
    """Register a fixed schema, or a template's resolver that builds it from a file's ``tensor_shapes``."""
    parse_schema_id(schema_id)
    if isinstance(resolver, RecordSchema):
        fixed = resolver
        if fixed.id != schema_id:
            raise ValueError(f"cannot register {fixed.id} under {schema_id}")
        resolver = lambda _meta: fixed  # noqa: E731
    if schema_id in _REGISTRY:
        raise ValueError(f"{schema_id} is already registered")
    _REGISTRY[schema_id] = resolver


def get_schema(schema_id: str, metadata: FileMetadata | None = None) -> RecordSchema:
    """The registered schema ``schema_id``; templates (latents@1, export@1, scores@1) read ``metadata``."""
    import schemas.records  # noqa: F401  (registers the built-in schemas)

    parse_schema_id(schema_id)
    if schema_id not in _REGISTRY:
        raise ValueError(f"unknown schema {schema_id}; registered: {', '.join(registered_ids())}")
    return _REGISTRY[schema_id](metadata)


def registered_ids() -> tuple[str, ...]:
    import schemas.records  # noqa: F401

    return tuple(sorted(_REGISTRY))


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
