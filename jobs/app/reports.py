"""The Reports tab: the ``cascade report`` outputs under the app's folders, each opened in the page as it is
(its HTML and the images beside it, served from the allowed report folders only)."""

from __future__ import annotations

from html import escape
from typing import Any
from urllib.parse import quote

from jobs.app.common import AppState, banner, message_html
from pipelines.explore.reports import ReportEntry, find_reports


def frame_html(entry: ReportEntry) -> str:
    metrics = " · ".join(f"{k} {v:.4g}" for k, v in sorted(entry.metrics.items()))
    warn = banner("This report was made with seeded random weights.") if entry.random_weights else ""
    src = "/gradio_api/file=" + quote(str(entry.html))
    return (f"{warn}<p>{entry.n_samples} samples{' · ' + escape(metrics) if metrics else ''} · "
            f'<a href="{src}" target="_blank">open in a new tab</a></p>'
            f'<iframe id="report-frame" src="{src}" style="width:100%;height:900px;border:1px solid #ddd"></iframe>')  # fmt: skip


def build(state: AppState) -> tuple[Any, list[Any], list[Any]]:
    import gradio as gr

    with gr.Row():
        choice = gr.Dropdown(label="report", choices=[], elem_id="report-choice", scale=4)
        refresh = gr.Button("Refresh", scale=1)
    shown = gr.HTML(elem_id="report-shown")

    def listed() -> list[Any]:
        entries = find_reports(state.report_roots)
        if not entries:
            where = ", ".join(state.report_roots) or "(no folder given: cascade app --reports DIR)"
            return [
                gr.update(choices=[], value=None),
                message_html(f"no cascade report output under {where}"),
            ]
        choices = [(e.label, str(e.html)) for e in entries]
        return [gr.update(choices=choices, value=choices[0][1]), frame_html(entries[0])]

    def opened(html: str | None) -> str:
        entry = next((e for e in find_reports(state.report_roots) if str(e.html) == html), None)
        return frame_html(entry) if entry else ""

    refresh.click(listed, [], [choice, shown])
    choice.input(opened, [choice], shown)
    return listed, [], [choice, shown]
