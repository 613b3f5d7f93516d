"""What the app's tabs share: the state the command line gave, and small HTML pieces."""

from __future__ import annotations

import dataclasses
from html import escape
from pathlib import Path
from typing import Any

CSS = """
.grid{display:flex;flex-wrap:wrap;gap:10px}
.grid figure{margin:0;width:170px;font-size:12px;line-height:1.3}
.grid figure img{max-width:160px;max-height:160px;display:block;border-radius:4px}
.grid .missing{width:160px;height:100px;background:#eee;display:flex;align-items:center;justify-content:center}
.charts{display:flex;flex-wrap:wrap;gap:8px}
.cascade-warn{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;border-radius:6px;color:#222}
.cascade-error{background:#fde2e1;border:1px solid #e08080;padding:8px 12px;border-radius:6px;color:#222}
.counts{font-size:16px}
.pair{display:flex;gap:12px;margin:8px 0;align-items:flex-start}
.pair img{width:192px;border-radius:4px}
"""


@dataclasses.dataclass
class AppState:
    """Where the outputs are and which weights the models use (from ``cascade app``'s options).

    Attributes:
        root: the folder the app was opened on (a demo or project output), if any.
        scores_dir, dedup_dir, latents_dir: outputs found under ``root`` or given explicitly.
        report_roots: folders searched for ``cascade report`` outputs.
        weights: a folder with the released weights under their official names.
        tiny: use the ``*/tiny`` flavors with seeded random weights (tests and demos only).
        device: torch device for the Previewer and sampling.
        storage_options: fsspec options for s3:// outputs.
    """

    root: str | None = None
    scores_dir: str | None = None
    dedup_dir: str | None = None
    latents_dir: str | None = None
    report_roots: list[str] = dataclasses.field(default_factory=list)
    weights: str | None = None
    tiny: bool = False
    device: str = "cpu"
    storage_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def random_weights(self) -> bool:
        return self.weights is None and self.tiny

    def default_filter_output(self) -> str:
        return str(Path(self.root or ".") / "filtered-app")

    def default_filter_yaml(self) -> str:
        return str(Path(self.root or ".") / "filter-app.yaml")

    @property
    def allowed_paths(self) -> list[str]:
        """Folders the browser may load files from (report pages and their images)."""
        return sorted({str(Path(p).expanduser().resolve()) for p in self.report_roots})


def banner(text: str) -> str:
    return f'<div class="cascade-warn"><b>Random weights.</b> {escape(text)}</div>'


def message_html(text: str) -> str:
    """A user-facing error in the page (never a traceback)."""
    return f'<div class="cascade-error" role="alert">{escape(text)}</div>'


def figure_html(src: str | None, title: str, caption_html: str) -> str:
    image = (f'<img src="{src}" alt="{escape(title)}">' if src
             else '<div class="missing">image not found</div>')  # fmt: skip
    return f"<figure>{image}<figcaption><b>{escape(title)}</b><br>{caption_html}</figcaption></figure>"
