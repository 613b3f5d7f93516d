"""numpy <-> Arrow tensor columns, through pyarrow's own numpy interop (no torch).

Two layouts: Arrow's canonical fixed-shape tensor (latents@1) and nested fixed-size lists (scores@1's
embeddings, export@1). Arrays are ``(N, *shape)``. bfloat16 travels as its uint16 bit patterns (numpy has
no bfloat16): from torch use ``t.view(torch.uint16).numpy()`` and back ``torch.from_numpy(a).view(torch.bfloat16)``.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from schemas.specs import canonical_dtype

_NUMPY_STORAGE = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}


def float32_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of float values, rounding to nearest even like torch; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16
    nan = np.isnan(values)
    return np.where(nan, (bits >> 16) | 0x0040, rounded).astype(np.uint16)


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """float32 values of bfloat16 bit patterns (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` as the C-contiguous numpy storage of ``dtype`` (copy only when needed).

    For bfloat16, uint16/int16 input is taken as bit patterns and float input is rounded to bfloat16.
    """
    dtype = canonical_dtype(dtype)
    values = np.asarray(values)
    if dtype == "bfloat16":
        if values.dtype in (np.uint16, np.int16):
            values = values.view(np.uint16)
        elif np.issubdtype(values.dtype, np.floating):
            values = float32_to_bfloat16_bits(values.astype(np.float32, copy=False))
        else:
            raise TypeError(f"bfloat16 needs uint16 bit patterns or floats, got {values.dtype}")
    elif not np.issubdtype(values.dtype, np.floating):
        raise TypeError(f"{dtype} tensors need float input, got {values.dtype}")
    return np.ascontiguousarray(values, dtype=_NUMPY_STORAGE[dtype])


def _flat_storage(values: np.ndarray, dtype: str) -> tuple[pa.Array, tuple[int, ...]]:
    values = to_storage(values, dtype)
    if values.ndim < 2:
        raise ValueError(f"expected an (N, *shape) array, got shape {values.shape}")
    return pa.array(values.reshape(-1)), values.shape[1:]


def tensor_array(values: np.ndarray, dtype: str) -> pa.ExtensionArray:
    """A fixed-shape tensor array (``arrow.fixed_shape_tensor``) of ``values`` (N, *shape); zero-copy when
    ``values`` is already C-contiguous storage of ``dtype``."""
    flat, shape = _flat_storage(values, dtype)
    storage = pa.FixedSizeListArray.from_arrays(flat, math.prod(shape))
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(flat.type, shape), storage)


def tensor_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, *shape) storage array of a fixed-shape tensor column (uint16 bits for bfloat16).

    Zero-copy (read-only) for a single chunk without nulls; several chunks are concatenated.
    """
    array = _single_chunk(column)
    if not isinstance(array.type, pa.FixedShapeTensorType):
        raise TypeError(f"expected a fixed_shape_tensor column, got {array.type}")
    if array.null_count:
        raise ValueError(f"tensor column has {array.null_count} null row(s)")
    shape = tuple(array.type.shape)
    if len(array) == 0:
        return np.empty((0, *shape), dtype=array.type.value_type.to_pandas_dtype())
    return array.to_numpy_ndarray()


def nested_list_array(values: np.ndarray, dtype: str) -> pa.FixedSizeListArray:
    """Nested fixed-size lists (``fixed_size_list<fixed_size_list<float16>[w]>[h]``...) of ``values`` (N, *shape)."""
    flat, shape = _flat_storage(values, dtype)
    array = flat
    for dim in reversed(shape):
        array = pa.FixedSizeListArray.from_arrays(array, dim)
    return array


def nested_list_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(N, *shape) array of a nested fixed-size-list column; zero-copy for a single chunk without nulls."""
    array = _single_chunk(column)
    shape = [len(array)]
    while pa.types.is_fixed_size_list(array.type):
        if array.null_count:
            raise ValueError(f"nested list column has {array.null_count} null(s) at depth {len(shape)}")
        shape.append(array.type.list_size)
        array = array.flatten()  # honours slice offsets
    if len(shape) == 1:
        raise TypeError(f"expected a fixed_size_list column, got {array.type}")
    if array.null_count:
        raise ValueError(f"nested list column has {array.null_count} null value(s)")
    return array.to_numpy(zero_copy_only=False).reshape(shape)


def _single_chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column
