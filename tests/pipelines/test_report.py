"""``cascade report``: metrics, the reconstruction step against the official path, and the whole report
(JSON + HTML opened in headless Chromium) from a real cache of scikit-image photos and from raw shards."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.plan import Plan, PlannedStep
from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.shards import members_tar_bytes
from pipelines.core.sources import SourceConfig
from pipelines.core.step import Resources
from pipelines.encode.models import EncoderConfig
from pipelines.encode.steps import PIXELS
from pipelines.report.pipeline import ReportConfig, run_report
from pipelines.report.steps import RECON_PNG, CacheCrops, Reconstruct
from pipelines.train_data.crops import CropSpec
from schemas.columns import CLIP_TEXT_POOLED, EFFNET, KEY, REJECT_REASON, SOURCE_SHARD
from stages.flavors import build_model
from stages.image_metrics import ImageMetrics, LpipsConfig, build_lpips
from stages.sampling import CascadeModels, SamplerSettings, reconstruct
from stages.weights import WeightsError
from tests import tiny
from tests.browser import open_page
from tests.jobs.train_cache import build_cache
from tests.pipelines.photos import captions, jpeg
from tests.s3 import moto_endpoint

RANDOM_LPIPS = tiny.reconstruct(lpips=LpipsConfig(random_backbone=True), timesteps=4)


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --- metrics (no Ray) -----------------------------------------------------------------------------------


def test_psnr_ssim_match_their_definitions_and_lpips_is_skipped_without_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 48, 40, generator=gen)
    b = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    metrics = ImageMetrics(LpipsConfig())
    out = metrics(a, b)
    mse = ((a - b) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out["psnr"], 10 * torch.log10(1 / mse), rtol=1e-5, atol=1e-4)
    same = metrics(a, a)
    assert torch.all(same["ssim"] > 0.9999) and torch.all(same["psnr"] == 100.0)  # capped, JSON-safe
    assert torch.all(out["ssim"] < same["ssim"])
    assert torch.isnan(out["lpips"]).all()
    assert "alexnet backbone" in metrics.lpips_skipped and "nothing is downloaded" in metrics.lpips_skipped
    with pytest.raises(ValueError, match="net='resnet'"):
        LpipsConfig(net="resnet")


def test_lpips_backbone_loads_from_safetensors_only(tmp_path) -> None:
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    backbone = torchvision.models.alexnet(weights=None)
    path = tmp_path / "alexnet.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(path))
    model = build_lpips(LpipsConfig(backbone_weights=str(path)))
    torch.testing.assert_close(model.net.slice1[0].weight, backbone.features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(
        getattr(model.net.slice5, "10").bias, backbone.features[10].bias, rtol=0, atol=0
    )
    a = torch.rand(2, 3, 64, 64)
    metrics = ImageMetrics(LpipsConfig(backbone_weights=str(path)))
    assert metrics.lpips_skipped is None
    scores = metrics(a, a.flip(-1))["lpips"]
    assert torch.all(scores > 0) and torch.all(metrics(a, a)["lpips"].abs() < 1e-6)
    pickle = tmp_path / "alexnet.pth"
    torch.save(backbone.state_dict(), pickle)
    with pytest.raises(WeightsError, match="pickles are never loaded"):
        build_lpips(LpipsConfig(backbone_weights=str(pickle)))


# --- the reconstruction step against the official reconstruction (no Ray) -------------------------------


def test_reconstruct_step_equals_the_official_reconstruction() -> None:
    """Effnet of the ×3/4 nearest crop, then Stage B at 4/3 of it: the step decodes what ``reconstruct`` does."""
    models = CascadeModels(*(build_model(f"{n}/tiny")[0] for n in ("stage_c", "stage_b", "stage_a", "effnet")),
                           text=build_model("clip_text/tiny")[0])  # fmt: skip
    photo = np.array(Image.open(io.BytesIO(jpeg("chelsea"))).convert("RGB").resize((128, 128)))
    image = torch.from_numpy(photo).permute(2, 0, 1).float().div(255)[None]
    official = reconstruct(
        models,
        image,
        [captions()["chelsea"]],
        stage_b=SamplerSettings(timesteps=4, cfg=1.1, shift=1.0),
        seed=7,
    )
    small = torch.nn.functional.interpolate(image, size=(96, 96), mode="nearest")
    effnet = models.effnet.encode(small)
    _, pooled = models.text([captions()["chelsea"]])
    batch = {KEY: np.array(["chelsea"], dtype=object), PIXELS: np.stack([small[0].numpy()]),
             EFFNET: effnet.detach().numpy(), CLIP_TEXT_POOLED: pooled.detach().numpy()}  # fmt: skip
    config = tiny.reconstruct(timesteps=4, seed=7)
    out = Plan(tuple(batch), [PlannedStep(Reconstruct, config)]).run_local(batch)
    expect = torch.nn.functional.interpolate(official, size=(96, 96), mode="bilinear", antialias=True)
    expect = (expect.clamp(0, 1) * 255).round().byte()[0].permute(1, 2, 0).numpy()
    got = decode_png(out[RECON_PNG][0])
    assert got.shape == (96, 96, 3)
    assert np.abs(got.astype(int) - expect.astype(int)).max() <= 1
    assert out[REJECT_REASON][0] == "" and 0 < out["psnr"][0] < 100 and math.isnan(out["lpips"][0])


def test_missing_source_shard_becomes_a_reject(tmp_path) -> None:
    batch = {
        KEY: np.array(["gone"], dtype=object),
        SOURCE_SHARD: np.array([str(tmp_path / "00000.tar")], dtype=object),
        EFFNET: np.zeros((1, 16, 2, 2), np.float32),
    }
    out = Plan(tuple(batch), [PlannedStep(CacheCrops, CropSpec())]).run_local(batch)
    assert out[REJECT_REASON][0] == "source_unavailable" and out[PIXELS][0].size == 0


# --- whole reports on Ray -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    return build_cache(tmp_path_factory.mktemp("report_cache"))


def check_page(out: Path, report: dict, tmp_path: Path) -> None:
    """Open report.html in headless Chromium: every image renders at its file's size, charts are drawn."""
    page = open_page(out / "report.html", tmp_path / "report.png")
    n_images = 3 * (len(report["samples"]) + len(report["worst"]))
    assert len(page.images) == n_images
    for image in page.images:
        assert image["complete"] and image["width"] > 0, image
        with Image.open(out / image["src"]) as file:
            assert (image["width"], image["height"]) == file.size
    assert page.svgs >= 3
    assert "Reconstruction report" in page.text and "Random weights" in page.text
    assert page.screenshot.stat().st_size > 10_000


@pytest.mark.slow  # 71 s; the demo (tests/jobs/test_demo.py) makes a report from its cache by default
def test_report_from_a_cache(cache, tmp_path) -> None:
    _, latents = cache
    out = tmp_path / "report"
    summary = run_report(ReportConfig(output_dir=str(out), latents=str(latents), num_samples=5, worst_k=3,
                                      reconstruct=RANDOM_LPIPS))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert summary.n_samples == 5 == len(report["samples"]) and summary.random_weights
    assert report["random_weights"] and "random backbone: values meaningless" in report["metrics"]["lpips"]
    samples = report["samples"]
    assert len({s["key"] for s in samples}) == 5
    for s in samples:
        assert 0 < s["psnr"] < 100 and -1 <= s["ssim"] <= 1 and s["lpips"] > 0
        original = decode_png((out / s["images"]["original"]).read_bytes())
        h, w = (int(v) * 32 for v in reversed(s["bucket"].split("x")))
        assert original.shape == (h, w, 3)
        assert decode_png((out / s["images"]["reconstruction"]).read_bytes()).shape == (h, w, 3)
        assert s["encoder_version"].startswith("effnet/tiny@")
    for group in ("by_bucket", "by_shard", "by_encoder_version"):
        assert sum(g["n"] for g in report[group].values()) == 5
    assert set(report["by_bucket"]) == {s["bucket"] for s in samples}
    worst = [samples[i]["lpips"] for i in report["worst"]]
    assert report["worst_by"] == "lpips" and len(worst) == 3 and worst == sorted(worst, reverse=True)
    assert worst[0] == max(s["lpips"] for s in samples)
    assert math.isclose(summary.psnr_mean, float(np.mean([s["psnr"] for s in samples])), rel_tol=1e-9)
    check_page(out, report, tmp_path)
    again = tmp_path / "again"
    run_report(ReportConfig(output_dir=str(again), latents=str(latents), num_samples=5, worst_k=3,
                            reconstruct=RANDOM_LPIPS))  # fmt: skip
    assert json.loads((again / "report.json").read_text())["samples"] == samples  # seeded: the same report
    before = (again / "report.json").stat().st_mtime_ns
    other = ReportConfig(output_dir=str(again), latents=str(latents), num_samples=5, worst_k=3, reconstruct=RANDOM_LPIPS,
                         reconstruct_resources=Resources(num_cpus=1, batch_size=2))  # fmt: skip
    assert run_report(other) == run_report(other)  # committed: the same summary, nothing redone
    assert (again / "report.json").stat().st_mtime_ns == before
    (again / "_commits" / "report.json").unlink()  # what a run killed before its commit leaves: staging only
    (again / "manifest.json").unlink()
    (again / "report.html").unlink()
    (again / "_staging" / "report" / "images").mkdir(parents=True)
    (again / "_staging" / "report" / "images" / "00000_original.png").write_bytes(b"cut short")
    run_report(other)
    assert json.loads((again / "report.json").read_text())["samples"] == samples
    assert (again / "report.html").exists() and not (again / "_staging").exists()


def test_report_from_raw_images_lists_bad_rows(ray_local, tmp_path) -> None:
    names = ("coffee", "rocket", "astronaut")
    src = tmp_path / "raw"
    src.mkdir()
    members = [(n, {"jpg": jpeg(n), "txt": captions()[n].encode()}) for n in names]
    members.append(("broken", {"jpg": jpeg("camera")[:300], "txt": b"a truncated photo"}))
    (src / "00000.tar").write_bytes(members_tar_bytes(members))
    out = tmp_path / "report"
    summary = run_report(ReportConfig(
        output_dir=str(out), images=SourceConfig(kind="webdataset", path=str(src)), num_samples=4,
        effnet=EncoderConfig(flavor="effnet/tiny"), clip_text=EncoderConfig(flavor="clip_text/tiny"),
        preprocess=PreprocessConfig(mode="buckets", image_size_px=256), reconstruct=tiny.reconstruct(timesteps=4),
    ))  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert summary.n_samples == 3 and summary.n_rejected == 1
    assert [r["key"] for r in report["rejects"]] == ["broken"]
    assert report["rejects"][0]["step"] == "preprocess" and report["rejects"][0]["reason"]
    assert sorted(s["key"] for s in report["samples"]) == sorted(names)
    assert {s["caption"] for s in report["samples"]} == {captions()[n] for n in names}
    assert summary.lpips_skipped and report["metrics"]["lpips_skipped"] == summary.lpips_skipped
    assert report["worst_by"] == "psnr" and all(s["lpips"] is None for s in report["samples"])
    assert set(report["models"]) == {"stage_b", "stage_a", "effnet", "clip_text"}
    assert {s["bucket"] for s in report["samples"]} == {"9x6", "8x8"}  # 3:2 photos and the square one
    check_page(out, report, tmp_path)
    assert "LPIPS skipped" in open_page(out / "report.html", tmp_path / "again.png").text


@pytest.mark.slow  # 28 s; by default reports from raw images and the demo's cache
def test_report_writes_to_s3_and_reads_a_moved_cache(cache, tmp_path) -> None:
    shards, latents = cache
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)  # the cache records the old shard paths; ``images`` relocates them
    with moto_endpoint() as endpoint:
        fs = fsspec.filesystem("s3", endpoint_url=endpoint)
        fs.mkdir("report-test-bucket")
        fs.put(str(latents) + "/", "report-test-bucket/latents/", recursive=True)
        summary = run_report(ReportConfig(
            output_dir="s3://report-test-bucket/report", latents="s3://report-test-bucket/latents",
            images=SourceConfig(kind="webdataset", path=str(moved)), num_samples=2,
            endpoint_url=endpoint, output_endpoint_url=endpoint, reconstruct=tiny.reconstruct(timesteps=2),
        ))  # fmt: skip
        assert summary.html == "s3://report-test-bucket/report/report.html"
        report = json.loads(fs.cat_file("report-test-bucket/report/report.json"))
        assert len(report["samples"]) == 2 and not report["rejects"]
        for s in report["samples"]:
            assert fs.exists(f"report-test-bucket/report/{s['images']['reconstruction']}")
        assert b"Reconstruction report" in fs.cat_file("report-test-bucket/report/report.html")


def test_bad_report_config_names_the_field(tmp_path) -> None:
    from jobs.config import ConfigError, load_config

    with pytest.raises(ValueError, match="set latents"):
        ReportConfig(output_dir=str(tmp_path), reconstruct=tiny.reconstruct())
    tiny_models = ["reconstruct.stage_a.flavor=stage_a/tiny", "reconstruct.stage_b.flavor=stage_b/tiny"]
    with pytest.raises(ConfigError, match=r"missing required config field\(s\): reconstruct$"):
        load_config(ReportConfig, None, [f"output_dir={tmp_path}", "latents=x"])  # no default models
    with pytest.raises(ConfigError, match=r"effnet and clip_text are required for raw images"):
        load_config(ReportConfig, None, [f"output_dir={tmp_path}", "images.kind=folder", "images.path=x",
                                         *tiny_models])  # fmt: skip
    with pytest.raises(ConfigError, match=r"reconstruct: stage_b\.flavor"):
        load_config(ReportConfig, None, [f"output_dir={tmp_path}", "latents=x", tiny_models[0],
                                         "reconstruct.stage_b.flavor=stage_a/tiny"])  # fmt: skip
    with pytest.raises(ConfigError, match=r"reconstruct\.lpips: net="):
        load_config(
            ReportConfig,
            None,
            [f"output_dir={tmp_path}", "latents=x", "reconstruct.lpips.net=resnet", *tiny_models],
        )
    with pytest.raises(ValueError, match="weights is required"):
        EncoderConfig(flavor="stage_b/700m")
