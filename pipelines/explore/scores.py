"""What the app's Explore tab shows of a ``cascade score`` output (and its ``cascade dedup`` output), without Ray.

``ScoresView.open`` reads only the columns rules can name (scores, and the dedup verdicts joined by key), never
the CLIP embeddings: about 40 bytes a row, 40 MB at 10⁶ rows, read from every shard's file in parallel. After
that, everything a slider asks is computed in memory:

* ``counts(rules)`` runs ``cascade filter``'s own ``apply_rules`` over the whole table, so the page's kept count
  is the number ``cascade filter`` writes for the same rules;
* ``histogram(column)`` for the charts;
* ``page(rules, kept=...)`` the rows on either side of the first rule's threshold, closest first, a page at a
  time; their images and captions come from their source shards (``pipelines.core.lookup``: a partial read of
  the shards that hold them, nothing else);
* ``filter_yaml(rules)`` the rules as a ``cascade filter`` config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import yaml

from pipelines.core.by_shard import LAYOUT, shard_path
from pipelines.core.commits import read_manifest
from pipelines.filter.pipeline import Rule, apply_rules, check_rules
from schemas import DEDUP, SCORES_IDS
from schemas import columns as c

#: score columns a rule (and so a slider) can name; the embeddings are never read
SCORE_FIELDS = (c.AESTHETIC_SCORE, c.CLIP_SIMILARITY, c.WIDTH, c.HEIGHT, c.ASPECT_RATIO, c.CAPTION_LENGTH,
                c.WATERMARK_PROBABILITY, c.NSFW_PROBABILITY)  # fmt: skip
DEDUP_FIELDS = (c.DUPLICATE_OF, c.DEDUP_KIND, c.DEDUP_SIMILARITY, c.NN_SIMILARITY)


@dataclass
class ScoresView:
    """The rule columns of every scored row (``table``), with where they came from."""

    scores_dir: str
    dedup_dir: str | None
    table: pa.Table
    n_shards: int
    random_weights: bool
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, scores_dir: str, dedup_dir: str | None = None, storage_options: dict[str, Any] | None = None
             ) -> ScoresView:  # fmt: skip
        """Read the rule columns of a finished scores output (FileNotFoundError / ValueError name the folder)."""
        options = storage_options or {}
        manifest = _manifest(scores_dir, options, "scores_dir", SCORES_IDS)
        shards = sorted(manifest["shards"])
        table = _read(scores_dir, shards, options, [c.KEY, c.SOURCE, *SCORE_FIELDS])
        if dedup_dir:
            dedup = _manifest(dedup_dir, options, "dedup_dir", (DEDUP.id,))
            if sorted(dedup["shards"]) != shards:
                raise ValueError(
                    f"dedup_dir={dedup_dir!r} was made from other scores than scores_dir={scores_dir!r}"
                )
            verdicts = _read(dedup_dir, shards, options, [c.KEY, *DEDUP_FIELDS])
            table = table.join(verdicts, c.KEY, join_type="left outer")
        table = table.sort_by(c.KEY)  # the same rows in the same order, however the files were read
        return cls(
            scores_dir, dedup_dir or None, table, len(shards), bool(manifest.get("random_weights")), options
        )

    @property
    def fields(self) -> list[str]:
        return [name for name in self.table.column_names if name not in (c.KEY, c.SOURCE)]

    def check(self, rules: list[Rule]) -> None:
        """ValueError naming the rule when a rule cannot apply to these columns (as ``cascade filter`` would)."""
        check_rules(self.table.schema, rules)

    def counts(self, rules: list[Rule]) -> dict[str, int]:
        """``cascade filter``'s counts for ``rules``: n_input, n_kept, ``failed:<rule>``, ``dropped:<rule>``."""
        if not rules:
            return {"n_input": self.table.num_rows, "n_kept": self.table.num_rows}
        columns = list(dict.fromkeys([c.KEY, c.SOURCE, *(r.field for r in rules)]))
        return apply_rules(self.table.select(columns), rules)[1]

    def histogram(self, column: str, bins: int = 40) -> tuple[np.ndarray, np.ndarray]:
        """Counts and bin edges of a numeric column (nulls and NaNs left out)."""
        values = self.table[column].to_numpy(zero_copy_only=False).astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return np.zeros(bins, dtype=np.int64), np.linspace(0, 1, bins + 1)
        return np.histogram(values, bins=bins)

    def page(
        self, rules: list[Rule], *, kept: bool, page: int = 0, per_page: int = 12
    ) -> list[dict[str, Any]]:
        """One page of kept (or dropped) rows, closest to the first numeric rule's threshold first (by key
        without one): the samples either side of the line a slider draws."""
        keep = _mask(self.table, rules)
        rows = self.table.filter(keep if kept else pc.invert(keep))
        focus = next(
            (r for r in rules if isinstance(r.value, int | float) and not isinstance(r.value, bool)), None
        )
        if focus is not None and rows.num_rows:
            distance = pc.abs(pc.subtract(pc.cast(rows[focus.field], pa.float64()), float(focus.value)))
            rows = rows.append_column("_distance", pc.fill_null(distance, math.inf))
            rows = rows.sort_by([("_distance", "ascending"), (c.KEY, "ascending")]).drop_columns(
                ["_distance"]
            )
        return rows.slice(page * per_page, per_page).to_pylist()

    def filter_yaml(self, rules: list[Rule], output_dir: str) -> str:
        """A ``cascade filter`` config for these scores and ``rules``."""
        config: dict[str, Any] = {"scores_dir": self.scores_dir, "output_dir": output_dir}
        if self.dedup_dir:
            config["dedup_dir"] = self.dedup_dir
        config["rules"] = [
            {k: v for k, v in dataclasses.asdict(r).items() if v not in (None, False)} for r in rules
        ]
        return yaml.safe_dump(config, sort_keys=False)


def _mask(table: pa.Table, rules: list[Rule]) -> pa.ChunkedArray:
    keep = pa.chunked_array([pa.array(np.ones(table.num_rows, dtype=bool))])
    for rule in rules:
        keep = pc.and_(keep, rule.keep(table[rule.field]))
    return keep


def _manifest(root: str, options: dict[str, Any], field: str, schema_ids: tuple[str, ...]) -> dict[str, Any]:
    manifest = read_manifest(root, options)
    if manifest is None:
        raise FileNotFoundError(f"{field}={root!r} holds no finished output (no manifest.json)")
    if manifest.get("schema") not in schema_ids or manifest.get("layout") != LAYOUT:
        raise ValueError(f"{field}={root!r} is a {manifest.get('schema')} output in the {manifest.get('layout')!r} "
                         f"layout; the app reads a {' or '.join(schema_ids)} output in the per-shard layout")  # fmt: skip
    return manifest


def _read(root: str, shards: list[str], options: dict[str, Any], columns: list[str]) -> pa.Table:
    """``columns`` (those the files have) of every shard's file, read in parallel by pyarrow."""
    fs, _ = fsspec.core.url_to_fs(root, **options)
    paths = [fsspec.core.url_to_fs(shard_path(root, s), **options)[1] for s in shards]
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    present = [name for name in columns if name in dataset.schema.names]
    return dataset.to_table(columns=present)
