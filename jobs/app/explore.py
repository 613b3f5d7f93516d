"""The Explore tab: a scores (+ dedup) output's histograms, sliders that are filter rules with live counts, the
samples either side of the threshold, and the rules written as a ``cascade filter`` config.

The counts come from ``ScoresView.counts``, which is ``cascade filter``'s own rule code over every row.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from jobs.app.common import AppState, banner, figure_html, message_html
from pipelines.core.html import bars_svg
from pipelines.core.lookup import find_samples, jpeg_data_uri, thumbnail
from pipelines.explore.scores import ScoresView
from pipelines.filter.pipeline import Rule
from schemas import columns as c

PER_PAGE = 12
THUMB_PX = 160


@dataclasses.dataclass(frozen=True)
class Slider:
    """A slider that is one filter rule: ``field op value``; at ``neutral`` it is off."""

    field: str
    op: str
    label: str
    step: float

    def bounds(self, view: ScoresView) -> tuple[float, float, float]:
        """(low, high, step): the data's range on a grid of at least 100 steps (``step`` at most)."""
        values = view.table[self.field].to_numpy(zero_copy_only=False).astype(np.float64)
        values = values[np.isfinite(values)]
        if values.size == 0:
            return 0.0, 1.0, self.step
        lo, hi = float(values.min()), float(values.max())
        step = self.step
        while step > 1e-6 and (hi - lo) / step < 100:  # e.g. random-weight scores span 0.150–0.157
            step /= 10
        lo = math.floor(round(lo / step, 6)) * step  # round first: 1.5 / 0.01 is 150.00000000000003
        hi = math.ceil(round(hi / step, 6)) * step
        digits = max(0, -math.floor(math.log10(step)) + 1)
        return round(lo, digits), round(max(hi, lo + step), digits), step

    def neutral(self, view: ScoresView) -> float:
        lo, hi, _ = self.bounds(view)
        return lo if self.op == ">=" else hi

    def rule(self, value: float, view: ScoresView) -> Rule | None:
        if value is None or math.isclose(float(value), self.neutral(view)):
            return None
        integer = pa.types.is_integer(view.table.schema.field(self.field).type)
        return Rule(field=self.field, op=self.op, value=int(value) if integer else float(value))


SLIDERS = (
    Slider(c.AESTHETIC_SCORE, ">=", "aesthetic score ≥", 0.01),
    Slider(c.CLIP_SIMILARITY, ">=", "CLIP similarity ≥", 0.001),
    Slider(c.WIDTH, ">=", "width ≥ (px)", 1),
    Slider(c.HEIGHT, ">=", "height ≥ (px)", 1),
    Slider(c.ASPECT_RATIO, "<=", "aspect ratio (w/h) ≤", 0.01),
)
HISTOGRAMS = ((c.AESTHETIC_SCORE, "aesthetic score"), (c.CLIP_SIMILARITY, "CLIP image–text similarity"),
              (c.WIDTH, "width (px)"), (c.HEIGHT, "height (px)"), (c.ASPECT_RATIO, "aspect ratio (w/h)"))  # fmt: skip


def rules_of(view: ScoresView, values: list[float], drop_duplicates: bool) -> list[Rule]:
    """The rules the sliders (and the duplicates box) stand for; sliders at their neutral end are off."""
    rules = [r for s, v in zip(SLIDERS, values, strict=True) if (r := s.rule(v, view)) is not None]
    if drop_duplicates and c.DUPLICATE_OF in view.table.column_names:
        rules.append(Rule(field=c.DUPLICATE_OF, op="is null"))
    return rules


def summary_html(view: ScoresView) -> str:
    dedup = f" · dedup: <code>{escape(view.dedup_dir)}</code>" if view.dedup_dir else ""
    warn = banner("The scores come from models with seeded random weights: they test the plumbing only.") \
        if view.random_weights else ""  # fmt: skip
    return (f'{warn}<p id="scores-summary"><b>{view.table.num_rows:,}</b> rows in {view.n_shards:,} shards · '
            f"<code>{escape(view.scores_dir)}</code>{dedup}</p>")  # fmt: skip


def charts_html(view: ScoresView, rules: list[Rule]) -> str:
    """A histogram per column; a rule on that column draws its threshold."""
    parts = []
    for column, label in HISTOGRAMS:
        counts, edges = view.histogram(column)
        rule = next((r for r in rules if r.field == column), None)
        marker = None
        if rule is not None and edges[-1] > edges[0]:
            marker = (float(rule.value) - edges[0]) / (edges[-1] - edges[0])
        parts.append(bars_svg([int(x) for x in counts], f"{edges[0]:.3g}", f"{edges[-1]:.3g}", label,
                              width=300, height=150, marker=marker))  # fmt: skip
    return f'<div class="charts">{"".join(parts)}</div>'


def counts_html(view: ScoresView, rules: list[Rule]) -> str:
    """Kept and dropped in all, and per rule: rows failing it, rows it drops first (the filter report's numbers)."""
    counts = view.counts(rules)
    kept, total = counts["n_kept"], counts["n_input"]
    rows = "".join(
        f"<tr><td><code>{escape(r.label)}</code></td><td>{counts[f'failed:{r.label}']:,}</td>"
        f"<td>{counts[f'dropped:{r.label}']:,}</td></tr>"
        for r in rules
    )
    table = (f"<table><tr><th>rule</th><th>fails</th><th>drops first</th></tr>{rows}</table>" if rules
             else "<p>No rule yet: move a slider.</p>")  # fmt: skip
    return (
        f'<p class="counts">kept <b id="kept-count" data-kept="{kept}">{kept:,}</b> · dropped '
        f'<b id="dropped-count" data-dropped="{total - kept}">{total - kept:,}</b> of {total:,}</p>{table}'
    )


class Thumbnails:
    """key → (thumbnail data URI or None, caption), the last ``size`` samples shown: the first view of a sample
    streams its shard up to it; moving a slider back and forth shows it again from memory."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.cache: OrderedDict[str, tuple[str | None, str]] = OrderedDict()

    def of(self, rows: list[dict[str, Any]], endpoint_url: str | None) -> dict[str, tuple[str | None, str]]:
        wanted = [(r[c.SOURCE], r[c.KEY]) for r in rows if r[c.KEY] not in self.cache]
        found = find_samples(wanted, endpoint_url) if wanted else {}
        for _, key in wanted:
            sample = found.get(key)
            image = thumbnail(sample["image"], THUMB_PX) if sample else None
            self.cache[key] = (jpeg_data_uri(image) if image else None, (sample or {}).get("caption", ""))
        for row in rows:
            self.cache.move_to_end(row[c.KEY])
        while len(self.cache) > self.size:
            self.cache.popitem(last=False)
        return {r[c.KEY]: self.cache[r[c.KEY]] for r in rows}


THUMBNAILS = Thumbnails()


def grid_html(view: ScoresView, rules: list[Rule], *, kept: bool, page: int) -> str:
    """A page of kept (or dropped) samples, nearest the threshold first, with captions and scores."""
    rows = view.page(rules, kept=kept, page=page, per_page=PER_PAGE)
    side = "kept" if kept else "dropped"
    if not rows:
        return f"<p>No {side} samples on this page.</p>"
    shown = THUMBNAILS.of(rows, view.storage_options.get("endpoint_url"))
    figures = []
    for row in rows:
        uri, caption = shown[row[c.KEY]]
        scores = " · ".join(
            f"{_short(f)} {row[f]:.3g}" for f in (c.AESTHETIC_SCORE, c.CLIP_SIMILARITY) if f in row
        )
        size = f"{row.get(c.WIDTH)}×{row.get(c.HEIGHT)}"
        dup = f" · {row[c.DEDUP_KIND]} copy" if row.get(c.DEDUP_KIND) else ""
        figures.append(figure_html(uri, row[c.KEY],
                                   f"{escape(caption[:140])}<br><small>{scores} · {size}{dup}</small>"))  # fmt: skip
    return f'<div class="grid {side}">{"".join(figures)}</div>'


def _short(field: str) -> str:
    return {c.AESTHETIC_SCORE: "aesthetic", c.CLIP_SIMILARITY: "clip"}.get(field, field)


def write_yaml(view: ScoresView, rules: list[Rule], output_dir: str, path: str) -> str:
    """Write the rules as a ``cascade filter`` config at ``path``; returns its text."""
    if not rules:
        raise ValueError("no rule to write: move a slider first")
    text = view.filter_yaml(rules, output_dir)
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    Path(path).expanduser().write_text(text)
    return text


def build(state: AppState) -> tuple[Any, list[Any], list[Any]]:
    """The tab's components and events (inside a ``gr.Tab``)."""
    import gradio as gr

    views: dict[tuple[str, str], ScoresView] = {}

    def view_of(scores_dir: str, dedup_dir: str) -> ScoresView:
        key = (scores_dir.strip(), dedup_dir.strip())
        if key not in views:
            views.clear()  # one scores set in memory at a time
            views[key] = ScoresView.open(key[0], key[1] or None, state.storage_options)
        return views[key]

    with gr.Row():
        scores_box = gr.Textbox(
            label="scores_dir (a cascade score output)",
            value=state.scores_dir or "",
            scale=3,
            elem_id="explore-scores-dir",
        )
        dedup_box = gr.Textbox(
            label="dedup_dir (optional)", value=state.dedup_dir or "", scale=3, elem_id="explore-dedup-dir"
        )
        open_button = gr.Button("Open", scale=1)
    summary = gr.HTML(elem_id="explore-summary")
    charts = gr.HTML(elem_id="explore-charts")
    with gr.Row():
        with gr.Column(scale=2):
            sliders = [
                gr.Slider(label=s.label, elem_id=f"slider-{s.field}", interactive=True) for s in SLIDERS
            ]
            duplicates = gr.Checkbox(label="drop duplicates (duplicate_of is null)", value=False,
                                     elem_id="drop-duplicates")  # fmt: skip
            page = gr.Number(label="page", value=0, minimum=0, precision=0, elem_id="explore-page")
        with gr.Column(scale=3):
            counts = gr.HTML(elem_id="explore-counts")
    gr.Markdown("### Kept, nearest the threshold")
    kept_grid = gr.HTML(elem_id="grid-kept")
    gr.Markdown("### Dropped, nearest the threshold")
    dropped_grid = gr.HTML(elem_id="grid-dropped")
    with gr.Row():
        out_box = gr.Textbox(
            label="filter output_dir",
            value=state.default_filter_output(),
            scale=3,
            elem_id="explore-yaml-output",
        )
        yaml_path = gr.Textbox(
            label="write the config to",
            value=state.default_filter_yaml(),
            scale=3,
            elem_id="explore-yaml-path",
        )
        yaml_button = gr.Button("Write filter YAML", scale=1, elem_id="write-yaml")
    yaml_text = gr.Code(label="filter YAML", language="yaml", elem_id="filter-yaml")

    def opened(scores_dir: str, dedup_dir: str) -> list[Any]:
        try:
            view = view_of(scores_dir, dedup_dir)
        except (OSError, ValueError) as err:
            return [message_html(str(err)), "", *[gr.update() for _ in SLIDERS], "", "", ""]
        updates = []
        for s in SLIDERS:
            lo, hi, step = s.bounds(view)
            updates.append(gr.update(minimum=lo, maximum=hi, step=step, value=s.neutral(view)))
        return [summary_html(view), charts_html(view, []), *updates, counts_html(view, []),
                grid_html(view, [], kept=True, page=0), grid_html(view, [], kept=False, page=0)]  # fmt: skip

    def changed(scores_dir: str, dedup_dir: str, *values: Any) -> list[str]:
        *numbers, drop, page_number = values
        try:
            view = view_of(scores_dir, dedup_dir)
            rules = rules_of(view, numbers, bool(drop))
        except (OSError, ValueError) as err:
            return [message_html(str(err)), "", "", ""]
        p = max(0, int(page_number or 0))
        return [charts_html(view, rules), counts_html(view, rules), grid_html(view, rules, kept=True, page=p),
                grid_html(view, rules, kept=False, page=p)]  # fmt: skip

    def written(scores_dir: str, dedup_dir: str, output_dir: str, path: str, *values: Any) -> str:
        *numbers, drop = values
        try:
            view = view_of(scores_dir, dedup_dir)
            return write_yaml(view, rules_of(view, numbers, bool(drop)), output_dir, path)
        except (OSError, ValueError) as err:
            return f"# {err}"

    opened_outputs = [summary, charts, *sliders, counts, kept_grid, dropped_grid]
    open_button.click(opened, [scores_box, dedup_box], opened_outputs)
    inputs = [scores_box, dedup_box, *sliders, duplicates, page]
    for component in (*sliders, duplicates, page):
        component.change(
            changed,
            inputs,
            [charts, counts, kept_grid, dropped_grid],
            show_progress="hidden",
            trigger_mode="always_last",
        )  # a dragged slider computes its last value, not every one
    yaml_button.click(written, [scores_box, dedup_box, out_box, yaml_path, *sliders, duplicates], yaml_text)
    return opened, [scores_box, dedup_box], opened_outputs
