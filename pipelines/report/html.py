"""The HTML page of a reconstruction report: one self-contained file beside its ``images/`` folder.

Histograms and the PSNR–SSIM plot are inline SVG, so the page needs no script, no network and no plotting
library. Every string from the data (keys, captions, paths) is escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from pipelines.core.html import CSS, histogram_svg, scatter_svg

LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else escape(str(value))


def _table(title: str, groups: dict[str, dict[str, Any]]) -> str:
    head = "".join(f"<th>{LABELS[m]} mean</th><th>median</th>" for m in LABELS)
    body = "".join(
        f"<tr><td>{escape(name)}</td><td>{s['n']}</td>"
        + "".join(f"<td>{_fmt(s[f'{m}_mean'])}</td><td>{_fmt(s[f'{m}_median'])}</td>" for m in LABELS)
        + "</tr>"
        for name, s in groups.items()
    )
    return f"<h3>{escape(title)}</h3><table><tr><th>{escape(title)}</th><th>n</th>{head}</tr>{body}</table>"


def _sample(s: dict[str, Any]) -> str:
    figures = "".join(
        f'<figure><img src="{escape(s["images"][kind])}" alt="{escape(kind)} of {escape(s["key"])}">'
        f"<figcaption>{label}</figcaption></figure>"
        for kind, label in (
            ("original", "original crop"),
            ("reconstruction", "Stage B + A"),
            ("difference", "|difference| × 4"),
        )
    )
    metrics = " · ".join(f"{LABELS[m]} {_fmt(s[m])}" for m in LABELS)
    return (
        f'<div class="sample">{figures}<div class="meta"><b>{escape(s["key"])}</b><br>{metrics}<br>'
        f"bucket {escape(s['bucket'])} · shard <code>{escape(s['shard'])}</code><br>"
        f"encoder <code>{escape(s['encoder_version'])}</code><br><i>{escape(s['caption'])}</i></div></div>"
    )


def render_html(report: dict[str, Any]) -> str:
    """The whole page for a ``build_report`` dict."""
    overall, samples, metrics = report["overall"], report["samples"], report["metrics"]
    warn = ""
    if report["random_weights"]:
        warn += ('<div class="warn"><b>Random weights.</b> Some models are tiny flavors with seeded random '
                 "weights: the pictures and numbers test the pipeline, not Stable Cascade.</div>")  # fmt: skip
    if metrics["lpips_skipped"]:
        warn += f'<div class="warn">{escape(metrics["lpips_skipped"])}</div>'
    lpips_card = _fmt(overall["lpips_mean"]) if not metrics["lpips_skipped"] else "skipped"
    cards = (
        f'<div class="cards"><div class="card">samples<b>{overall["n"]}</b></div>'
        f'<div class="card">PSNR mean<b>{_fmt(overall["psnr_mean"], 2)} dB</b></div>'
        f'<div class="card">SSIM mean<b>{_fmt(overall["ssim_mean"])}</b></div>'
        f'<div class="card">LPIPS mean<b>{lpips_card}</b></div>'
        f'<div class="card">rejected<b>{len(report["rejects"])}</b></div></div>'
    )
    settings = "".join(
        f"<tr><td>{escape(k)}</td><td>{escape(str(v))}</td></tr>"
        for k, v in [*report["models"].items(), *report["sampler"].items(),
                     *((f"metric {m}", metrics[m]) for m in ("psnr", "ssim", "lpips")),
                     ("compared at", metrics["compared_at"]), *report["source"].items()]
    )  # fmt: skip
    charts = "".join(histogram_svg([s[m] for s in samples], LABELS[m]) for m in LABELS if m != "lpips")
    if not metrics["lpips_skipped"]:
        charts += histogram_svg([s["lpips"] for s in samples], LABELS["lpips"])
    charts += scatter_svg([s["psnr"] for s in samples], [s["ssim"] for s in samples], "PSNR", "SSIM")
    tables = "".join(
        _table(title, report[key])
        for title, key in (
            ("bucket", "by_bucket"),
            ("shard", "by_shard"),
            ("encoder version", "by_encoder_version"),
        )
    )
    worst = "".join(_sample(samples[i]) for i in report["worst"])
    every = "".join(_sample(s) for s in samples)
    rejects = "".join(
        f"<tr><td>{escape(r['key'])}</td><td>{escape(r['step'])}</td><td>{escape(r['reason'])}</td>"
        f"<td>{escape(r['detail'][:300])}</td></tr>"
        for r in report["rejects"]
    )
    rejects_html = (
        f"<h2>Rejected ({len(report['rejects'])})</h2><table><tr><th>key</th><th>step</th><th>reason</th>"
        f"<th>detail</th></tr>{rejects}</table>"
        if rejects
        else ""
    )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Reconstruction report</title>"
        f"<style>{CSS}</style></head><body><h1>Reconstruction report</h1>"
        f"<p>Stage B sampling + Stage A decode against the original crops.</p>{warn}{cards}"
        f"<h2>Distributions</h2><div class='charts'>{charts}</div>"
        f"<h2>Aggregates</h2>{tables}"
        f"<h2>Worst {len(report['worst'])} by {escape(report['worst_by'].upper())}</h2>{worst}"
        f"<h2>All samples ({len(samples)})</h2>{every}{rejects_html}"
        f"<h2>Settings</h2><table>{settings}</table></body></html>"
    )
