"""Tensor column descriptions: logical dtypes, their Arrow storage, and ``TensorSpec``. pyarrow only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

FIELD_DTYPE_KEY = "cascade.dtype"  # field metadata of tensor columns: the logical dtype ("bfloat16", ...)

# Logical tensor dtypes and their Arrow storage. bfloat16 has no Arrow type: its bit patterns go in uint16.
TENSOR_DTYPES: dict[str, pa.DataType] = {
    "float16": pa.float16(),
    "bfloat16": pa.uint16(),
    "float32": pa.float32(),
}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32"}


def canonical_dtype(name: str) -> str:
    """Map a dtype name or alias (``fp16``, ``bf16``, ``fp32``) to its canonical name."""
    dtype = _DTYPE_ALIASES.get(name, name)
    if dtype not in TENSOR_DTYPES:
        raise ValueError(
            f"dtype={name!r} is not a tensor dtype; allowed: {sorted(TENSOR_DTYPES)} or fp16/bf16/fp32"
        )
    return dtype


@dataclass(frozen=True)
class TensorSpec:
    """Shape (per row, without the batch dimension) and logical dtype of one tensor column."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not self.shape or any(d < 1 for d in self.shape):
            raise ValueError(f"shape={self.shape} must have at least one dimension, all >= 1")

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


def tensor_field(name: str, spec: TensorSpec, *, nested_lists: bool = False) -> pa.Field:
    """A non-null tensor field: Arrow fixed-shape tensor, or nested fixed-size lists (``nested_lists``).

    The logical dtype goes into the field metadata (``cascade.dtype``), so bfloat16 columns stored as
    uint16 stay recognisable.
    """
    storage = TENSOR_DTYPES[canonical_dtype(spec.dtype)]
    if nested_lists:
        typ = storage
        for dim in reversed(spec.shape):
            typ = pa.list_(typ, dim)
    else:
        typ = pa.fixed_shape_tensor(storage, spec.shape)
    return pa.field(name, typ, nullable=False, metadata={FIELD_DTYPE_KEY: canonical_dtype(spec.dtype)})


def tensor_spec_of_field(f: pa.Field) -> TensorSpec | None:
    """The ``TensorSpec`` of a fixed-shape tensor or (nested) fixed-size-list field, else None."""
    typ = f.type
    if isinstance(typ, pa.FixedShapeTensorType):
        shape, leaf = tuple(typ.shape), typ.value_type
    elif pa.types.is_fixed_size_list(typ):
        dims = []
        while pa.types.is_fixed_size_list(typ):
            dims.append(typ.list_size)
            typ = typ.value_type
        shape, leaf = tuple(dims), typ
    else:
        return None
    dtype = (f.metadata or {}).get(FIELD_DTYPE_KEY.encode())
    return TensorSpec(shape, dtype.decode() if dtype else str(leaf).replace("halffloat", "float16"))
