"""Stage B training (``cascade train-b``) on a real cache of Stage A latents (tiny flavors, 2 CPUs)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jobs.train import check_train, run_train
from jobs.train_config import PreviewConfig, ScalingSpec, TrainConfig
from pipelines.train_data.batches import TrainDataConfig
from schemas import columns as c
from tests.jobs.train_cache import CAPTIONED, build_cache
from tests.jobs.train_runs import (
    kill_and_resume,
    loads_strictly_and_into_diffusers,
    metrics,
    two_workers_match,
)
from tests.pipelines.photos import captions, jpeg

HALF_CPU = ScalingSpec(num_workers=1, cpus_per_worker=0.5)


@pytest.fixture(scope="module")
def cache(ray_local, tmp_path_factory) -> tuple[Path, Path]:
    """7 real photos: Stage A latents of their 128 px crops (4×32×32) and effnet conditioning at 2 and 3 cells."""
    return build_cache(
        tmp_path_factory.mktemp("train_b"), mode="center", image_size_px=128, stage_a_size_px=128
    )


def _config(cache: tuple[Path, Path], out: Path, **overrides) -> TrainConfig:
    fields = {"data": TrainDataConfig(path=str(cache[1]), read_cpus=0.25), "output_dir": str(out),
              "mode": "stage_b", "flavor": "stage_b/tiny", "allow_random_weights": True, "batch_size": 4, "grad_accum_steps": 2,
              "max_steps": 12, "save_every": 4, "log_every": 1, "bf16_autocast": False,
              "adaptive_loss_weight": True, "scaling": HALF_CPU}  # fmt: skip
    return TrainConfig(**(fields | overrides))


def test_the_plan_reads_stage_a_latents_pooled_text_and_every_stored_effnet_size(cache) -> None:
    plan = check_train(_config(cache, Path("unused")))
    assert plan.columns == {c.STAGE_A: (4, 32, 32), c.CLIP_TEXT_POOLED: (32,),
                            "stage_b_effnet_2": (16, 2, 2), "stage_b_effnet_3": (16, 3, 3)}  # fmt: skip


def test_a_cache_without_stage_b_inputs_is_refused_naming_what_is_missing() -> None:
    from jobs.specs.stage_b import stage_b_columns
    from stages.flavors import get_flavor

    stage_c_cache = {c.EFFNET: (16,), c.CLIP_TEXT: (77, 32), c.CLIP_TEXT_POOLED: (32,), c.CLIP_IMG: (32,)}
    model = get_flavor("stage_b/tiny").config
    for shapes in (stage_c_cache, stage_c_cache | {c.STAGE_A: (4, 32, 32)}):
        with pytest.raises(ValueError, match="encode it with stage_a and stage_b_conditioning"):
            stage_b_columns(model, shapes)
    subset = stage_b_columns(model, stage_c_cache | {c.STAGE_A: (4, 32, 32), "stage_b_effnet_3": (16, 3, 3)})
    assert subset == {c.STAGE_A: (4, 32, 32), c.CLIP_TEXT_POOLED: (32,), "stage_b_effnet_3": (16, 3, 3)}


@pytest.mark.slow  # 122 s; by default Stage B's plan, inputs and refusals are checked here and its model in tests/stages
def test_a_tiny_stage_b_learns_on_cached_stage_a_latents(cache, tmp_path) -> None:
    """300 steps: the loss falls; the checkpoint loads strictly into stages and diffusers; previews decode."""
    config = _config(cache, tmp_path, grad_accum_steps=1, max_steps=300, save_every=300, log_every=10, lr=1e-3,
                     bf16_autocast=True, adaptive_loss_weight=False,
                     preview=PreviewConfig(every=300, samples=2, timesteps=3, stage_a="stage_a/tiny"))  # fmt: skip
    summary = run_train(config)
    rows = metrics(summary)
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    print(f"\ntiny Stage B on 7 cached photos: loss {first:.4f} (steps 10-30) -> {last:.4f} (steps 280-300)")
    assert last < 0.75 * first
    checkpoint = Path(summary.checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        "generator.safetensors", "optimizer.safetensors", "preview.png", "trainer_state.json"]  # fmt: skip
    grid = np.asarray(Image.open(checkpoint / "preview.png"))
    assert grid.shape == (
        3 * 128,
        2 * 128,
        3,
    )  # 2 samples; original crops, Stage A of the target, of the sample
    originals = {name: _stage_a_crop(name) for name in CAPTIONED if name in captions()}
    for i in range(2):  # the top row: the photos' 128 px center crops, pixel for pixel
        tile = grid[:128, i * 128 : (i + 1) * 128]
        assert any(np.array_equal(tile, crop) for crop in originals.values())
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(2, 4, 32, 32, generator=gen), "timestep_ratio": torch.rand(2, generator=gen),
              "effnet": torch.randn(2, 16, 3, 3, generator=gen),
              "clip_text_pooled": torch.randn(2, 1, 32, generator=gen)}  # fmt: skip
    loads_strictly_and_into_diffusers(checkpoint / "generator.safetensors", "stage_b/tiny", inputs)


def _stage_a_crop(name: str) -> np.ndarray:
    from pipelines.core.images import decode_rgb, to_float_chw
    from pipelines.core.preprocess import PreprocessConfig, crop_for_stage_a

    image = torch.from_numpy(to_float_chw(decode_rgb(jpeg(name), max_pixels=10**8)))
    crop = crop_for_stage_a(
        image, PreprocessConfig(mode="center", image_size_px=128, stage_a_size_px=128)
    ).pixels
    return (crop * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


@pytest.fixture(scope="module")
def one_worker_run(cache, tmp_path_factory):
    """The reference: 1 worker, accumulation 2, 12 steps, adaptive loss weight, checkpoints every 4."""
    config = _config(cache, tmp_path_factory.mktemp("one_b"))
    return config, run_train(config)


@pytest.mark.slow  # 80 s; Stage C's two-worker equivalence (tests/jobs/test_train.py) runs by default
def test_two_workers_match_one_worker_with_doubled_accumulation(cache, one_worker_run, tmp_path) -> None:
    s1, s2 = two_workers_match(*one_worker_run, tmp_path)
    assert (s1["mode"], s1["world_size"], s2["world_size"]) == ("stage_b", 1, 2)


@pytest.mark.slow  # 125 s, like Stage C's; by default a killed Stage C worker resumes from its checkpoint
def test_kill_and_resume_repeats_the_uninterrupted_trajectory(cache, one_worker_run, tmp_path) -> None:
    """SIGKILL `cascade train-b` after its first checkpoint, rerun it: the same losses and weights."""
    one_config, one = one_worker_run
    kill_and_resume("train-b", dataclasses.replace(one_config, output_dir=str(tmp_path)), one)
