"""Headless Chromium for page tests: Debian's ``chromium`` driven by Playwright (no browser download).

``open_page`` loads a local HTML file and returns what the page shows: every image's natural size (0 when it
did not render), the SVG charts, the visible text, and a full-page screenshot. Tests skip, with the reason,
when Chromium or Playwright is not installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@dataclass
class Page:
    images: list[dict]  # {"src", "width", "height", "complete"}
    svgs: int
    text: str
    screenshot: Path


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium); the page was not opened")
    return path


def open_page(html: Path, screenshot: Path) -> Page:
    """Open ``html`` in headless Chromium, wait for every image, and take a full-page screenshot."""
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(html.resolve().as_uri(), wait_until="load")
            page.wait_for_function("Array.from(document.images).every(i => i.complete)", timeout=30_000)
            images = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.getAttribute('src'), width: i.naturalWidth,"
                " height: i.naturalHeight, complete: i.complete}))"
            )
            svgs = page.evaluate("document.querySelectorAll('svg').length")
            text = page.inner_text("body")
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return Page(images, svgs, text, screenshot)
