"""Self-contained HTML pages of reports: one stylesheet, and charts as inline SVG (no script, no network,
no plotting library). Every string from the data is escaped by the callers and here."""

from __future__ import annotations

import math
from html import escape

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
    return bars_svg(counts, f"{lo:.3g}", f"{hi:.3g}", f"{label} (n={len(values)})", width, height)


def bars_svg(counts: list[int], lo: str, hi: str, title: str, width: int = 360, height: int = 180,
             marker: float | None = None) -> str:  # fmt: skip
    """SVG bars of pre-binned ``counts`` labelled ``lo``..``hi``; ``marker`` (0..1 of the axis) draws a line."""
    top, bar = max(max(counts), 1), (width - 40) / max(1, len(counts))
    rects = "".join(
        f'<rect x="{30 + i * bar:.1f}" y="{height - 30 - n / top * (height - 60):.1f}" width="{max(bar - 2, 1):.1f}" '
        f'height="{n / top * (height - 60):.1f}" fill="#4a7bd0"><title>{n}</title></rect>'
        for i, n in enumerate(counts)
    )
    if marker is not None:
        x = 30 + marker * (width - 40)
        rects += f"<line x1='{x:.1f}' x2='{x:.1f}' y1='24' y2='{height - 30}' stroke='#d0604a' stroke-dasharray='4'/>"
    return (
        f'<svg class="hist" width="{width}" height="{height}" role="img" aria-label="{escape(title)} histogram">'
        f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(title)}</text>'
        f"{rects}<line x1='30' x2='{width - 10}' y1='{height - 30}' y2='{height - 30}' stroke='#333'/>"
        f'<text x="30" y="{height - 12}">{escape(lo)}</text>'
        f'<text x="{width - 10}" y="{height - 12}" text-anchor="end">{escape(hi)}</text></svg>'
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
