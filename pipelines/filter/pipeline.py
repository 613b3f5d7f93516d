"""Filter stored scores with declarative rules (field, op, value): no re-scoring, no eval of strings.

Rules may also name the columns of a ``cascade dedup`` output (``dedup_dir``): ``duplicate_of``, ``dedup_kind``,
``dedup_similarity``, ``dedup_cluster``, ``nn_similarity``, joined by key with the same shard's scores.

One Ray task per scores shard reads that shard's ``<shard>.parquet`` (only the rule columns), applies the
rules with pyarrow compute and commits ``parquet/<shard>.parquet`` of kept keys (key, source) in ``output_dir``, with
the shard's counts in its commit record. The driver adds the counts up into ``filter_report.json`` (per
rule: rows that failed it, rows it dropped first; rules apply in order) and writes ``manifest.json`` last.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.by_shard import LAYOUT, open_per_shard, shard_file, shard_path
from pipelines.core.commits import CommitStore, Endpoints, JobOutput
from pipelines.core.completion import SHARD_ID, collect_records
from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.step import Batch, Resources, Step, object_column
from pipelines.core.storage import table_bytes
from schemas import DEDUP, SCORES_IDS, validate_table
from schemas.columns import DEDUP_KIND, KEY, SOURCE

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
class FilterConfig(Endpoints):
    """A filter job over stored scores.

    Attributes:
        scores_dir: a ``cascade score`` output (an older single-folder scores output is partitioned by shard
            once, into ``output_dir/_inputs/scores``).
        dedup_dir: a ``cascade dedup`` output of the same scores, whose columns rules may name (e.g.
            ``{field: duplicate_of, op: is null}``); the report then counts the rows dropped per dedup kind.
        output_dir: where ``parquet/<shard>.parquet`` (kept keys), ``filter_report.json`` and ``manifest.json`` go.
        rules: applied in order; a row is kept when every rule keeps it.
        endpoint_url: S3 endpoint of ``scores_dir``; output_endpoint_url: of ``output_dir``.
        on_stale: an output made with other rules or scores: ``redo`` (default: filtering is cheap) or
            ``refuse``.
        resources: one task per shard.
    """

    scores_dir: str
    output_dir: str
    rules: tuple[Rule, ...]
    dedup_dir: str | None = None
    endpoint_url: str | None = None
    output_endpoint_url: str | None = None
    on_stale: str = "redo"
    resources: Resources = dataclasses.field(default_factory=lambda: Resources(num_cpus=0.5, batch_size=1,
                                                                                 concurrency=8))  # fmt: skip

    def __post_init__(self) -> None:
        if not self.rules:
            raise ValueError("rules must list at least one rule")
        if not all(isinstance(r, Rule) for r in self.rules):
            raise ValueError("rules must be Rule(field, op, value) entries")
        needs_dedup = sorted({r.field for r in self.rules} & (set(DEDUP.arrow.names) - {KEY, SOURCE}))
        if needs_dedup and self.dedup_dir is None:
            raise ValueError(
                f"rules on {needs_dedup} need dedup_dir (a cascade dedup output of these scores)"
            )


@dataclass(frozen=True)
class FilterSummary:
    n_shards: int
    n_input: int
    n_kept: int
    failed: dict[str, int]
    dropped_first: dict[str, int]


@dataclass(frozen=True, kw_only=True)
class ShardFilterConfig:
    """What each filter task needs: where the scores are, the rules, and the output store."""

    scores_root: str
    storage_options: dict[str, Any]
    rules: tuple[Rule, ...]
    store: CommitStore
    dedup_root: str | None = None


def apply_rules(table: pa.Table, rules: Sequence[Rule]) -> tuple[pa.Table, dict[str, int]]:
    """The kept rows (key, source) and the counts: n_input, n_kept, ``failed:<rule>``, ``dropped:<rule>``."""
    alive = pa.chunked_array([pa.array([True] * table.num_rows, pa.bool_())])
    counts = {"n_input": table.num_rows}
    for rule in rules:
        keep = rule.keep(table[rule.field])
        counts[f"failed:{rule.label}"] = table.num_rows - (pc.sum(keep).as_py() or 0)
        counts[f"dropped:{rule.label}"] = pc.sum(pc.and_(alive, pc.invert(keep))).as_py() or 0
        alive = pc.and_(alive, keep)
    kept = table.select([KEY, SOURCE]).filter(alive)
    if DEDUP_KIND in table.column_names:  # what each dedup kind accounts for among the dropped rows
        kinds = table[DEDUP_KIND].filter(pc.invert(alive)).drop_null()
        counts |= {f"dropped_kind:{r['values']}": r["counts"] for r in pc.value_counts(kinds).to_pylist()}
    return kept, counts | {"n_kept": kept.num_rows}


class FilterShards(Step):
    """One task per shard: read its scores (rule columns only), keep rows, commit its kept keys."""

    name = "filter"
    requires = (SHARD_ID,)
    produces = (SHARD_ID, "record")

    def __call__(self, batch: Batch) -> Batch:
        cfg: ShardFilterConfig = self.config
        fields = [r.field for r in cfg.rules]
        columns = list(dict.fromkeys([KEY, SOURCE, *(f for f in fields if f not in DEDUP.arrow.names)]))
        dedup = list(dict.fromkeys([KEY, *(f for f in fields if f in DEDUP.arrow.names), DEDUP_KIND]))
        records = []
        for shard in batch[SHARD_ID]:
            table = _read_shard(cfg.scores_root, str(shard), columns, SCORES_IDS, cfg.storage_options)
            if cfg.dedup_root is not None:
                verdicts = _read_shard(cfg.dedup_root, str(shard), dedup, DEDUP.id, cfg.storage_options)
                table = table.join(verdicts, KEY, join_type="left outer").sort_by(KEY)
            kept, counts = apply_rules(table, cfg.rules)
            cfg.store.stage(str(shard), shard_file(str(shard)), table_bytes(kept))
            files = [{"path": shard_file(str(shard)), "rows": kept.num_rows}]
            records.append(cfg.store.commit(str(shard), {"shard_id": str(shard), "files": files, **counts}))
        return {SHARD_ID: object_column(str(s) for s in batch[SHARD_ID]),
                "record": object_column(json.dumps(r) for r in records)}  # fmt: skip


def _read_shard(root: str, shard: str, columns: list[str], schema: Any, options: dict[str, Any]) -> pa.Table:
    path = shard_path(root, shard)
    fs, local = fsspec.core.url_to_fs(path, **options)
    with fs.open(local, "rb") as f:
        file = pq.ParquetFile(f)
        validate_table(file.schema_arrow.empty_table(), schema, source=path)
        return file.read(columns=columns)


def check_rules(schema: pa.Schema, rules: Sequence[Rule]) -> None:
    """Refuse rules on unknown fields, or whose value does not compare with the field's type, before Ray."""
    unknown = sorted({r.field for r in rules} - set(schema.names))
    if unknown:
        raise ValueError(f"rules refer to unknown score fields {unknown}; available: {schema.names}")
    empty = schema.empty_table()
    for rule in rules:
        try:
            rule.keep(empty[rule.field])
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"rule {rule.label!r}: {rule.field} is {schema.field(rule.field).type}: {exc}"
            ) from None


def _dedup_input(config: FilterConfig, shards: list[str]) -> tuple[str, dict[str, Any]]:
    """The dedup output's root and manifest; it must cover exactly the scores' shards."""
    from pipelines.core.commits import read_manifest

    manifest = read_manifest(config.dedup_dir, config.input_options)
    if manifest is None or manifest.get("schema") != DEDUP.id:
        raise FileNotFoundError(
            f"dedup_dir={config.dedup_dir!r} holds no finished cascade dedup output (manifest.json)"
        )
    if sorted(manifest["shards"]) != shards:
        raise ValueError(f"dedup_dir={config.dedup_dir!r} was made from other scores than scores_dir={config.scores_dir!r} "
                         "(its shards differ); rerun cascade dedup on these scores")  # fmt: skip
    return config.dedup_dir.rstrip("/"), manifest


def run_filter(config: FilterConfig) -> FilterSummary:
    """Apply the rules to every scored shard on the current Ray cluster; write kept keys and the report."""

    store = config.store
    scores_root, scores = open_per_shard(config.scores_dir, config.input_options, field="scores_dir",
                                         convert_to=CommitStore(f"{store.root}/_inputs/scores", store.options),
                                         schema_id=SCORES_IDS)  # fmt: skip
    shards = sorted(scores["shards"])
    if not shards:
        raise FileNotFoundError(f"scores_dir={config.scores_dir!r}: the scores hold no shards")
    first = shard_path(scores_root, shards[0])
    fs, local = fsspec.core.url_to_fs(first, **config.input_options)
    schema = validate_table(pq.read_schema(fs.open(local, "rb")).empty_table(), SCORES_IDS, source=first)
    available = pq.read_schema(fs.open(local, "rb"))
    dedup_root, dedup = None, None
    if config.dedup_dir is not None:
        dedup_root, dedup = _dedup_input(config, shards)
        available = pa.unify_schemas([available, DEDUP.arrow.remove(DEDUP.arrow.get_field_index(SOURCE))])
    check_rules(available, config.rules)
    fingerprint = {"rules": [dataclasses.asdict(r) for r in config.rules], "scores": scores.get("fingerprint"),
                   "scores_schema": schema.schema_id, "dedup": dedup and dedup.get("fingerprint")}  # fmt: skip
    output = JobOutput(store, fingerprint, config.on_stale)
    todo = output.start(shards)
    new = {}
    if todo:
        task = ShardFilterConfig(scores_root=scores_root, storage_options=config.input_options, rules=config.rules,
                                 store=store, dedup_root=dedup_root)  # fmt: skip
        plan = Plan((SHARD_ID,), [PlannedStep(FilterShards, task, config.resources)])
        new = collect_records(plan, [{SHARD_ID: s} for s in todo], "filter", rejects=None)
    manifest = output.finish(new, shards, schema="kept_keys", layout=LAYOUT, scores_dir=config.scores_dir)
    totals = manifest["totals"]
    labels = [r.label for r in config.rules]
    summary = FilterSummary(len(shards), totals.get("n_input", 0), totals.get("n_kept", 0),
                            {label: totals.get(f"failed:{label}", 0) for label in labels},
                            {label: totals.get(f"dropped:{label}", 0) for label in labels})  # fmt: skip
    report = {"rules": [r.__dict__ for r in config.rules], **summary.__dict__}
    if config.dedup_dir is not None:
        report["dropped_by_dedup_kind"] = {
            k.split(":", 1)[1]: v for k, v in totals.items() if k.startswith("dropped_kind:")
        }
    store.write_json("filter_report.json", report)
    return summary
