"""export@1 files read back identically by pyarrow, polars, duckdb and (when installed) Hugging Face datasets.

float16: pyarrow, polars and datasets keep float16 (datasets' numpy format widens to float32); duckdb has no
half type and widens float16 to FLOAT (float32), which is exact, so its values are compared after widening.
duckdb also reports the nested fixed-size lists as variable lists (``FLOAT[][][]``); the values and order are
the same.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import attach_metadata, export_schema, nested_list_array, nested_list_to_numpy, validate_table
from tests.schemas.factories import REAL_SHAPES, TINY_SHAPES, file_metadata, latent_scalars, random_tensors

N = 3
CASES = [
    (REAL_SHAPES, "float16"),
    (TINY_SHAPES, "float16"),
    (TINY_SHAPES, "float32"),
    (REAL_SHAPES, "float32"),
]
IDS = ["real-fp16", "tiny-fp16", "tiny-fp32", "real-fp32"]


@pytest.fixture(params=CASES, ids=IDS)
def export_file(request, tmp_path) -> tuple[str, dict[str, np.ndarray], pa.Table]:
    """An export@1 Parquet file, the (N, *shape) arrays written to it and its scalar columns."""
    shapes, dtype = request.param
    tensors = {k: v.astype(dtype) for k, v in random_tensors(shapes, N, seed=7).items()}
    scalars = latent_scalars(N)
    table = pa.table({**scalars, **{k: nested_list_array(v, dtype) for k, v in tensors.items()}})
    path = str(tmp_path / f"export-{dtype}.parquet")
    pq.write_table(attach_metadata(table, export_schema(shapes, dtype), file_metadata()), path)
    return path, tensors, pa.table(scalars)


def assert_bits_equal(got: np.ndarray, want: np.ndarray, name: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (name, got.dtype, got.shape)
    bits = {2: np.uint16, 4: np.uint32}[want.dtype.itemsize]
    assert np.array_equal(got.view(bits), want.view(bits)), name


def lists_to_numpy(column: pa.ChunkedArray, shape: tuple[int, ...]) -> np.ndarray:
    """Flatten (variable or fixed) nested lists of a reader's output into (N, *shape)."""
    array = column.combine_chunks()
    while (
        pa.types.is_list(array.type)
        or pa.types.is_fixed_size_list(array.type)
        or pa.types.is_large_list(array.type)
    ):
        array = array.flatten()
    return array.to_numpy(zero_copy_only=False).reshape(len(column), *shape)


def test_pyarrow_reads_export(export_file) -> None:
    path, tensors, scalars = export_file
    table = pq.read_table(path)
    validate_table(table, "export@1", source=path)
    for name, values in tensors.items():
        assert_bits_equal(nested_list_to_numpy(table.column(name)), values, name)
    assert table.select(scalars.column_names).to_pydict() == scalars.to_pydict()


def test_polars_reads_export(export_file) -> None:
    pl = pytest.importorskip("polars")
    path, tensors, scalars = export_file
    df = pl.read_parquet(path)
    for name, values in tensors.items():
        assert df.schema[name] == pl.Array(
            pl.Float16 if values.dtype == np.float16 else pl.Float32, values.shape[1:]
        )
        assert_bits_equal(df[name].to_numpy(), values, name)
    assert df["key"].to_list() == scalars.column("key").to_pylist()
    assert df["crop_right"].to_list() == scalars.column("crop_right").to_pylist()


def test_duckdb_reads_export(export_file) -> None:
    duckdb = pytest.importorskip("duckdb")
    path, tensors, scalars = export_file
    table = duckdb.sql(f"select * from '{path}'").to_arrow_table()
    for name, values in tensors.items():
        got = lists_to_numpy(table.column(name), values.shape[1:])
        assert_bits_equal(got, values.astype(np.float32), name)  # float16 widened exactly
    assert table.column("key").to_pylist() == scalars.column("key").to_pylist()
    assert table.column("orig_width").to_pylist() == scalars.column("orig_width").to_pylist()
    row = duckdb.sql(f"select effnet[1][2][3] as v from '{path}' order by key").fetchall()[0]
    assert row[0] == float(tensors["effnet"][0, 0, 1, 2])  # 1-based indexing into the nested lists


def test_datasets_reads_export(export_file, tmp_path) -> None:
    datasets = pytest.importorskip("datasets")
    path, tensors, scalars = export_file
    ds = datasets.Dataset.from_parquet(path, cache_dir=str(tmp_path / "hf-cache"))
    for name, values in tensors.items():
        feature = ds.features[name]
        for dim in values.shape[1:]:  # Sequence/List(length=dim) nested per dimension
            assert feature.length == dim
            feature = feature.feature
        assert feature.dtype == str(values.dtype)
        stored = ds.data.column(name)  # the Arrow data datasets serves, float16 kept
        assert_bits_equal(lists_to_numpy(stored, values.shape[1:]), values, name)
        as_numpy = np.asarray(ds.with_format("numpy")[:][name])
        assert_bits_equal(as_numpy.astype(values.dtype), values, name)  # numpy format widens float16 exactly
    assert ds["key"][:] == scalars.column("key").to_pylist()
