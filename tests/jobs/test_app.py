"""``cascade app`` as a user meets it: the real server (started through the CLI on a free loopback port) over
the demo's real outputs, driven by Playwright in Debian's Chromium. Screenshots go to the test's folder (and to
``$CASCADE_SCREENSHOTS`` when set: the README's screenshot comes from here)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from tests.browser import CHROMIUM_FLAGS, chromium

REPO = Path(__file__).resolve().parents[2]
NOT_AN_IMAGE = b"%PDF-1.4 this is not an image\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(demo_run, tmp_path_factory):
    pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(REPO)}
    with log.open("w") as sink:
        server = subprocess.Popen([sys.executable, "-m", "jobs.cli", "app", str(demo_run.output), "--tiny",
                                   "--port", str(port)], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert server.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"the app did not listen within 120 s:\n{log.read_text()}"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def page(app_url):
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(app_url)
        page.wait_for_selector("#kept-count", timeout=120_000)
        yield page
        browser.close()


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"app-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    if os.environ.get("CASCADE_SCREENSHOTS"):
        shutil.copy(path, Path(os.environ["CASCADE_SCREENSHOTS"]) / path.name)
    return path


def _sizes(page_or_frame, selector: str) -> list[int]:
    """Natural widths of the images under ``selector``, once every one has finished loading."""
    page_or_frame.wait_for_function(
        f"Array.from(document.querySelectorAll({json.dumps(selector)})).every(i => i.complete)",
        timeout=60_000,
    )
    return page_or_frame.evaluate(
        f"Array.from(document.querySelectorAll({json.dumps(selector)})).map(i => i.naturalWidth)"
    )


def _open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def test_explore_shows_the_scores_and_a_slider_gives_cascade_filters_count(
    page, demo_run, ray_local, tmp_path
) -> None:
    _open_tab(page, "Explore")
    assert "12 rows in 1 shards" in page.inner_text("#explore-summary")
    assert "Random weights" in page.inner_text("body")
    kept_images = _sizes(page, "#grid-kept img")
    assert len(kept_images) == 12 and all(w > 0 for w in kept_images)  # every sample, before any rule
    assert page.evaluate("document.querySelectorAll('#explore-charts svg').length") == 5
    scores = json.loads((demo_run.output / "scores" / "manifest.json").read_text())
    assert scores["random_weights"] is True

    # move the aesthetic slider to the middle of its range, and tick "drop duplicates"
    box = page.locator("#slider-aesthetic_score input[type=number]")
    low, high, step = (float(box.get_attribute(a)) for a in ("min", "max", "step"))
    assert (high - low) / step >= 100  # random-weight scores span a narrow range: the step follows it
    before = page.inner_text("#kept-count")
    box.fill(str(round(low + round((high - low) / 2 / step) * step, 8)))
    box.press("Enter")
    page.wait_for_function(f"document.querySelector('#kept-count').innerText !== {json.dumps(before)}")
    page.locator("#drop-duplicates input").check()
    page.wait_for_timeout(1500)
    kept = int(page.get_attribute("#kept-count", "data-kept"))
    assert 0 < kept < 12
    assert all(w > 0 for w in _sizes(page, "#grid-kept img, #grid-dropped img"))
    _shot(page, tmp_path, "explore")

    # the written YAML runs with cascade filter, which keeps exactly the count the page showed
    out = tmp_path / "filtered"
    page.locator("#explore-yaml-output textarea").fill(str(out))
    page.locator("#explore-yaml-path textarea").fill(str(tmp_path / "rules.yaml"))
    page.click("#write-yaml")
    page.wait_for_function("document.querySelector('#filter-yaml').innerText.includes('rules')")
    config = yaml.safe_load((tmp_path / "rules.yaml").read_text())
    assert [r["field"] for r in config["rules"]] == ["aesthetic_score", "duplicate_of"]
    assert main(["filter", "--config", str(tmp_path / "rules.yaml")]) == 0
    report = json.loads((out / "filter_report.json").read_text())
    assert report["n_kept"] == kept


def test_cache_tab_shows_decodes_beside_the_original_crops(page, tmp_path) -> None:
    _open_tab(page, "Cache")
    page.wait_for_selector("#cache-rows img.decode", timeout=60_000)
    sizes = _sizes(page, "#cache-rows img")
    assert len(sizes) >= 2 and all(w > 0 for w in sizes)  # a decode and its original crop per row
    assert page.locator("#cache-rows img.crop").count() == page.locator("#cache-rows img.decode").count()
    _shot(page, tmp_path, "cache")


def test_reports_tab_opens_the_demo_report_with_its_images(page, tmp_path) -> None:
    _open_tab(page, "Reports")
    page.wait_for_selector("#report-frame", timeout=60_000)
    frame = page.frame_locator("#report-frame").locator("body")
    frame.wait_for(timeout=60_000)
    handle = page.locator("#report-frame").element_handle().content_frame()
    sizes = _sizes(handle, "img")
    assert sizes and all(w > 0 for w in sizes)
    _shot(page, tmp_path, "reports")


def test_sample_tab_draws_with_tiny_weights_and_refuses_a_non_image(page, tmp_path) -> None:
    _open_tab(page, "Sample")
    page.locator("#sample-prompt textarea").fill("a photo of a cat")
    for field, value in (("height", 256), ("width", 256), ("c-steps", 2), ("b-steps", 2)):
        page.locator(f"#sample-{field} input").fill(str(value))
    page.click("#sample-run")
    page.wait_for_selector("#sample-output img", timeout=120_000)
    assert all(w > 0 for w in _sizes(page, "#sample-output img"))
    assert "random weights" in page.inner_text("#sample-output").lower()
    _shot(page, tmp_path, "sample")
    bad = tmp_path / "notes.jpg"
    bad.write_bytes(NOT_AN_IMAGE)
    page.locator("#sample-mode input").click()
    page.get_by_role("option", name="image-variation").click()
    page.locator("#sample-image input[type=file]").set_input_files(str(bad))
    page.click("#sample-run")
    page.wait_for_selector("#sample-output [role=alert]", timeout=60_000)
    assert "not an image" in page.inner_text("#sample-output [role=alert]")


def test_a_missing_folder_is_a_message_in_the_page(page, tmp_path) -> None:
    _open_tab(page, "Explore")
    page.locator("#explore-scores-dir textarea").fill(str(tmp_path / "nowhere"))
    page.get_by_role("button", name="Open").first.click()
    page.wait_for_selector("#explore-summary [role=alert]", timeout=60_000)
    assert "holds no finished output" in page.inner_text("#explore-summary")
    assert "Traceback" not in page.inner_text("body")
