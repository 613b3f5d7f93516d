"""The ``cascade report`` outputs under some folders, for the app's Reports tab (local folders; no Ray).

A report output is a folder with ``report.json`` (every number) and ``report.html`` (which loads its images from
``images/`` beside it). Folders are searched a few levels deep, so a demo or project root finds its reports.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAX_DEPTH = 3


@dataclass(frozen=True)
class ReportEntry:
    """One report: its page, and what its ``report.json`` says at a glance."""

    html: Path
    n_samples: int
    random_weights: bool
    metrics: dict[str, float]

    @property
    def label(self) -> str:
        weights = " · random weights" if self.random_weights else ""
        return f"{self.html.parent} · {self.n_samples} samples{weights}"


def find_reports(roots: Iterable[str | Path]) -> list[ReportEntry]:
    """Every report output in or under ``roots`` (up to ``MAX_DEPTH`` levels), sorted by path."""
    found: dict[Path, ReportEntry] = {}
    for root in roots:
        root = Path(root).expanduser().resolve()
        candidates = [root / "report.json"] + [p for d in range(1, MAX_DEPTH + 1)
                                               for p in root.glob("/".join(["*"] * d) + "/report.json")]  # fmt: skip
        for path in candidates:
            if path.is_file() and (path.parent / "report.html").is_file() and path.parent not in found:
                found[path.parent] = _entry(path)
    return [found[k] for k in sorted(found)]


def _entry(path: Path) -> ReportEntry:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        report = {}
    means = report.get("metrics", {}) if isinstance(report.get("metrics"), dict) else {}
    metrics = {k: float(v["mean"]) for k, v in means.items() if isinstance(v, dict) and "mean" in v}
    return ReportEntry(path.parent / "report.html", len(report.get("samples", ())), bool(report.get("random_weights")),
                       metrics)  # fmt: skip
