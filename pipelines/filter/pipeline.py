"""Filter stored scores with declarative rules (field, op, value): no re-scoring, no eval of strings.

Rules are applied with pyarrow compute over a streaming scan of the scores Parquet. Outputs:
``kept_keys.parquet`` (key, source) and ``filter_report.json`` with, per rule, how many rows failed it and
how many it dropped first (rules apply in order).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipelines.core.sink import list_parquet
from pipelines.core.storage import write_bytes
from schemas import validate_table
from schemas.columns import KEY, SOURCE

_COMPARE = {"<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal, "==": pc.equal,
            "!=": pc.not_equal}  # fmt: skip
OPS = (*_COMPARE, "in", "not in", "is null", "not null")


@dataclass(frozen=True, kw_only=True)
class Rule:
    """Keep a row when ``field op value`` holds, e.g. ``Rule(field="aesthetic_score", op=">=", value=5.0)``.

    Attributes:
        field: a scores column.
        op: one of ``<, <=, >, >=, ==, !=, in, not in, is null, not null``.
        value: a number or string (a list for ``in``/``not in``; unused for the null tests).
        keep_missing: keep rows whose field is null or NaN (e.g. no watermark score in the metadata).
        name: label in the report (default: the rule written out).
    """

    field: str
    op: str
    value: Any = None
    keep_missing: bool = False
    name: str | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op={self.op!r}; allowed: {', '.join(OPS)}")
        if self.op in ("in", "not in") and not isinstance(self.value, list | tuple):
            raise ValueError(f"rule on {self.field!r}: op {self.op!r} needs a list value, got {self.value!r}")
        if self.op in _COMPARE and not isinstance(self.value, int | float | str | bool):
            raise ValueError(
                f"rule on {self.field!r}: op {self.op!r} needs a number or string, got {self.value!r}"
            )

    @property
    def label(self) -> str:
        return self.name or " ".join(str(p) for p in (self.field, self.op, self.value) if p is not None)

    def keep(self, column: pa.ChunkedArray) -> pa.ChunkedArray:
        """Boolean mask of the rows this rule keeps (never null)."""
        if self.op == "is null":
            return pc.is_null(column, nan_is_null=True)
        if self.op == "not null":
            return pc.invert(pc.is_null(column, nan_is_null=True))
        if self.op in ("in", "not in"):
            mask = pc.is_in(column, value_set=pa.array(list(self.value)))
            mask = pc.invert(mask) if self.op == "not in" else mask
        else:
            mask = _COMPARE[self.op](column, pa.scalar(self.value))
        missing = pc.is_null(column, nan_is_null=True)
        return pc.if_else(missing, self.keep_missing, pc.fill_null(mask, False))


@dataclass(frozen=True, kw_only=True)
class FilterConfig:
    """A filter job over stored scores."""

    scores_dir: str
    output_dir: str
    rules: tuple[Rule, ...]
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("rules must list at least one rule")
        if not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError("rules must be Rule(field, op, value) entries")


@dataclass(frozen=True)
class FilterSummary:
    n_input: int
    n_kept: int
    failed: dict[str, int]
    dropped_first: dict[str, int]


def _dataset(config: FilterConfig) -> pads.Dataset:
    options = {"endpoint_url": config.endpoint_url} if config.endpoint_url else {}
    try:
        files, fs = list_parquet(config.scores_dir, options)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"scores_dir: {exc}") from None
    for path in files:  # refuse anything that is not scores@1 before reading a single row
        with fs.open(path, "rb") as f:
            validate_table(pq.read_schema(f).empty_table(), "scores@1", source=path)
    return pads.dataset(files, format="parquet", filesystem=fs)


def run_filter(config: FilterConfig) -> FilterSummary:
    """Apply the rules to every scored row; write the kept keys and the per-rule report."""
    dataset = _dataset(config)
    unknown = sorted({r.field for r in config.rules} - set(dataset.schema.names))
    if unknown:
        raise ValueError(f"rules refer to unknown score fields {unknown}; available: {dataset.schema.names}")
    labels = [r.label for r in config.rules]
    failed, dropped = dict.fromkeys(labels, 0), dict.fromkeys(labels, 0)
    kept, n_input = [], 0
    columns = list(dict.fromkeys([KEY, SOURCE, *(r.field for r in config.rules)]))
    for record_batch in dataset.to_batches(columns=columns):
        table = pa.Table.from_batches([record_batch])
        n_input += table.num_rows
        alive = pa.chunked_array([pa.array([True] * table.num_rows)])
        for rule in config.rules:
            keep = rule.keep(table[rule.field])
            failed[rule.label] += table.num_rows - pc.sum(keep).as_py() if table.num_rows else 0
            dropped[rule.label] += pc.sum(pc.and_(alive, pc.invert(keep))).as_py() or 0
            alive = pc.and_(alive, keep)
        kept.append(table.select([KEY, SOURCE]).filter(alive))
    kept_table = pa.concat_tables(kept) if kept else pa.table({KEY: [], SOURCE: []})
    summary = FilterSummary(n_input, kept_table.num_rows, failed, dropped)
    options = {"endpoint_url": config.endpoint_url} if config.endpoint_url else {}
    sink = pa.BufferOutputStream()
    pq.write_table(kept_table, sink)
    base = config.output_dir.rstrip("/")
    write_bytes(f"{base}/kept_keys.parquet", sink.getvalue().to_pybytes(), options)
    report = {"rules": [r.__dict__ for r in config.rules], **summary.__dict__}
    write_bytes(f"{base}/filter_report.json", json.dumps(report, indent=2, default=str).encode(), options)
    return summary
