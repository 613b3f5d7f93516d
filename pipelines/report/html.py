"""The HTML page of a reconstruction report: one self-contained file beside its ``images/`` folder.

Histograms and the PSNR–SSIM plot are inline SVG, so the page needs no script, no network and no plotting
library. Every string from the data (keys, captions, paths) is escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

LABELS = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS"}
CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;color:#222;padding:0 16px}
h1{margin:0 0 4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;border-radius:6px;margin:12px 0}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #ddd;border-radius:8px;padding:10px 16px;min-width:150px}
.card b{display:block;font-size:22px}table{border-collapse:collapse;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 8px;text-align:right}th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.charts{display:flex;gap:16px;flex-wrap:wrap}.sample{display:flex;gap:12px;align-items:flex-start;margin:12px 0;
border-bottom:1px solid #eee;padding-bottom:12px}.sample figure{margin:0;text-align:center;font-size:12px}
.sample img{width:220px;height:auto;image-rendering:auto;border:1px solid #ccc;display:block}
.meta{font-size:13px;max-width:300px;word-break:break-word}code{background:#f4f4f4;padding:0 3px}
"""


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else escape(str(value))


def histogram_svg(
    values: list[float], label: str, bins: int = 12, width: int = 360, height: int = 180
) -> str:
    """An SVG bar histogram of ``values`` with its range on the x axis."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return f'<svg width="{width}" height="{height}"><text x="10" y="20">{escape(label)}: no values</text></svg>'
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / span * bins), bins - 1)] += 1
    top, bar = max(counts), (width - 40) / bins
    rects = "".join(
        f'<rect x="{30 + i * bar:.1f}" y="{height - 30 - n / top * (height - 60):.1f}" width="{bar - 2:.1f}" '
        f'height="{n / top * (height - 60):.1f}" fill="#4a7bd0"><title>{n}</title></rect>'
        for i, n in enumerate(counts)
    )
    return (
        f'<svg class="hist" width="{width}" height="{height}" role="img" aria-label="{escape(label)} histogram">'
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(label)} (n={len(values)})</text>'
        f"{rects}<line x1='30' x2='{width - 10}' y1='{height - 30}' y2='{height - 30}' stroke='#333'/>"
        f'<text x="30" y="{height - 12}">{lo:.3g}</text>'
        f'<text x="{width - 10}" y="{height - 12}" text-anchor="end">{hi:.3g}</text></svg>'
    )


def scatter_svg(
    xs: list[float], ys: list[float], xlabel: str, ylabel: str, width: int = 360, height: int = 180
) -> str:
    """An SVG scatter plot of paired values."""
    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x is not None and y is not None]
    if not pairs:
        return ""
    (x0, x1), (y0, y1) = ((min(v), max(v)) for v in zip(*pairs, strict=True))
    sx, sy = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    dots = "".join(
        f'<circle cx="{40 + (x - x0) / sx * (width - 60):.1f}" cy="{height - 30 - (y - y0) / sy * (height - 60):.1f}" '
        f'r="3" fill="#d0604a"><title>{x:.3g}, {y:.3g}</title></circle>'
        for x, y in pairs
    )
    return (
        f'<svg class="plot" width="{width}" height="{height}" role="img" aria-label="{escape(ylabel)} against {escape(xlabel)}">'
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(ylabel)} vs {escape(xlabel)}</text>'
        f"<line x1='40' x2='{width - 10}' y1='{height - 30}' y2='{height - 30}' stroke='#333'/>"
        f"<line x1='40' x2='40' y1='24' y2='{height - 30}' stroke='#333'/>{dots}"
        f'<text x="40" y="{height - 12}">{x0:.3g}</text><text x="{width - 10}" y="{height - 12}" text-anchor="end">{x1:.3g}</text>'
        f'<text x="4" y="{height - 30}">{y0:.3g}</text><text x="4" y="30">{y1:.3g}</text></svg>'
    )


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
