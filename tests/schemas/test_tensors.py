"""numpy <-> Arrow tensor columns: zero-copy, slicing, chunking, bfloat16 bit patterns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from schemas import (
    bfloat16_bits_to_float32,
    float32_to_bfloat16_bits,
    nested_list_array,
    nested_list_to_numpy,
    tensor_array,
    tensor_to_numpy,
)


def test_bfloat16_bits_match_known_encodings() -> None:
    values = np.array(
        [
            1.0,
            -2.0,
            0.0,
            -0.0,
            np.inf,
            -np.inf,
            3.140625,
            1 + 2**-8,
            1 + 3 * 2**-8,
            1 + 2**-8 + 2**-20,
            np.finfo(np.float32).max,
        ],
        dtype=np.float32,
    )
    # ties round to even: 1+2^-8 -> 1.0 (0x3F80), 1+3*2^-8 -> 1+2^-6 (0x3F82); float32 max overflows to inf.
    expected = [0x3F80, 0xC000, 0x0000, 0x8000, 0x7F80, 0xFF80, 0x4049, 0x3F80, 0x3F82, 0x3F81, 0x7F80]
    bits = float32_to_bfloat16_bits(values)
    assert bits.dtype == np.uint16
    assert bits.tolist() == expected
    nan_bits = float32_to_bfloat16_bits(np.array([np.nan], np.float32))
    assert np.isnan(bfloat16_bits_to_float32(nan_bits)).all()
    all_bits = np.arange(2**16, dtype=np.uint16)
    finite = np.isfinite(bfloat16_bits_to_float32(all_bits))
    assert np.array_equal(
        float32_to_bfloat16_bits(bfloat16_bits_to_float32(all_bits))[finite], all_bits[finite]
    )


def test_bfloat16_column_round_trips_bit_patterns() -> None:
    bits = np.random.default_rng(0).integers(0, 2**16, size=(3, 4, 5), dtype=np.uint16)
    column = tensor_array(bits, "bf16")
    assert column.type.value_type == pa.uint16()
    assert np.array_equal(tensor_to_numpy(column), bits)
    signed = tensor_array(bits.view(np.int16), "bfloat16")  # torch has int16 views too
    assert np.array_equal(tensor_to_numpy(signed), bits)
    floats = tensor_array(np.array([[1.0, 3.140625]], np.float32), "bfloat16")
    assert tensor_to_numpy(floats).tolist() == [[0x3F80, 0x4049]]
    with pytest.raises(TypeError, match="bfloat16 needs uint16 bit patterns or floats"):
        tensor_array(np.zeros((1, 2), np.int32), "bfloat16")
    with pytest.raises(TypeError, match="float16 tensors need float input"):
        tensor_array(np.zeros((1, 2), np.int32), "float16")


def test_tensor_array_is_zero_copy_and_honours_slices_and_chunks() -> None:
    values = np.arange(5 * 2 * 3, dtype=np.float16).reshape(5, 2, 3)
    column = tensor_array(values, "float16")
    assert column.type.shape == [2, 3]
    out = tensor_to_numpy(column)
    assert np.shares_memory(out, values)  # built and read back without a copy
    assert np.array_equal(tensor_to_numpy(column[1:4]), values[1:4])
    chunked = pa.chunked_array([column[:2], column[2:]])
    assert np.array_equal(tensor_to_numpy(chunked), values)
    assert tensor_to_numpy(tensor_array(np.zeros((0, 2, 3), np.float16), "float16")).shape == (0, 2, 3)
    with pytest.raises(ValueError, match=r"expected an \(N, \*shape\) array"):
        tensor_array(np.zeros(3, np.float16), "float16")
    with pytest.raises(TypeError, match="expected a fixed_shape_tensor column"):
        tensor_to_numpy(pa.array([1.0]))


def test_nested_list_layout() -> None:
    values = np.random.default_rng(1).standard_normal((4, 3, 2, 5)).astype(np.float32)
    column = nested_list_array(values, "float32")
    assert column.type == pa.list_(pa.list_(pa.list_(pa.float32(), 5), 2), 3)
    assert np.shares_memory(nested_list_to_numpy(column), values)
    assert np.array_equal(nested_list_to_numpy(column[1:3]), values[1:3])
    assert np.array_equal(nested_list_to_numpy(pa.chunked_array([column[:1], column[1:]])), values)
    half = nested_list_array(values, "float16")
    assert np.array_equal(nested_list_to_numpy(half), values.astype(np.float16))
    with pytest.raises(TypeError, match="expected a fixed_size_list column"):
        nested_list_to_numpy(pa.array([1.0]))
    with_null = pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0, None, 4.0], pa.float32()), 2)
    with pytest.raises(ValueError, match="1 null value"):
        nested_list_to_numpy(with_null)


def test_bfloat16_rounding_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(2).standard_normal(100_000).astype(np.float32) * 1e3
    values[:4] = [np.nan, np.inf, -np.inf, 0.0]
    expected = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    ours = float32_to_bfloat16_bits(values)
    assert np.array_equal(ours[1:], expected[1:])
    assert np.isnan(bfloat16_bits_to_float32(ours[:1])).all()
