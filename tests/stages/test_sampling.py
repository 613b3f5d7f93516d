"""Every sampling function runs end to end at the tiny flavors on CPU and is deterministic under a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from stages import sampling
from stages.conditioners import ClipTextConditioner, ClipVisionConditioner
from stages.effnet import FLAVORS as EFFNET
from stages.effnet import EfficientNetEncoder
from stages.stage_a import FLAVORS as STAGE_A
from stages.stage_a import StageA
from stages.stage_b import FLAVORS as STAGE_B
from stages.stage_b import StageB
from stages.stage_c import FLAVORS as STAGE_C
from stages.stage_c import StageC

FAST_C = sampling.SamplerSettings(timesteps=3, cfg=4.0, shift=2.0)
FAST_B = sampling.SamplerSettings(timesteps=2, cfg=1.1, shift=1.0)


@pytest.fixture(scope="module")
def models() -> sampling.CascadeModels:
    torch.manual_seed(0)
    built = sampling.CascadeModels(
        stage_c=StageC(STAGE_C["stage_c/tiny"]).eval(),
        stage_b=StageB(STAGE_B["stage_b/tiny"]).eval(),
        stage_a=StageA(STAGE_A["stage_a/tiny"]).eval(),
        effnet=EfficientNetEncoder(EFFNET["effnet/tiny"]),
        text=ClipTextConditioner.from_flavor("clip_text/tiny"),
        vision=ClipVisionConditioner.from_flavor("clip_vision/tiny"),
    )
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the official init zeroes the output convs; randomise so outputs depend on inputs
        for model in (built.stage_c, built.stage_b):
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return built


@pytest.fixture(scope="module")
def photo() -> torch.Tensor:
    img = torch.from_numpy(np.ascontiguousarray(skdata.astronaut())).permute(2, 0, 1).float() / 255
    return torch.nn.functional.interpolate(img[None], size=(128, 128), mode="bilinear", antialias=True)


def test_latent_sizes() -> None:
    assert sampling.latent_sizes(1024, 1024) == ((24, 24), (256, 256))
    assert sampling.latent_sizes(1024, 1536) == ((24, 36), (256, 384))
    assert sampling.effnet_input_size(1024, 1024) == (768, 768)


def test_text_to_image(models) -> None:
    kw = {"height": 128, "width": 96, "stage_c": FAST_C, "stage_b": FAST_B}
    a = sampling.text_to_image(models, ["a photo of a cat", "an astronaut"], seed=1, **kw)
    b = sampling.text_to_image(models, ["a photo of a cat", "an astronaut"], seed=1, **kw)
    c = sampling.text_to_image(models, ["a photo of a cat", "an astronaut"], seed=2, **kw)
    assert a.shape == (2, 3, 128, 96) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stage_c_uses_shift_and_cfg(models) -> None:
    base = sampling.sample_stage_c(models, ["a dog"], (4, 4), settings=FAST_C, seed=3)
    no_cfg = sampling.sample_stage_c(
        models, ["a dog"], (4, 4), settings=sampling.SamplerSettings(timesteps=3, cfg=1.0, shift=2.0), seed=3
    )
    assert base.shape == (1, 16, 4, 4) and not torch.allclose(base, no_cfg)


def test_image_variation(models, photo) -> None:
    kw = {"height": 64, "width": 64, "stage_c": FAST_C, "stage_b": FAST_B}
    a = sampling.image_variation(models, photo, seed=5, **kw)
    assert a.shape == (1, 3, 64, 64) and torch.equal(a, sampling.image_variation(models, photo, seed=5, **kw))
    plain = sampling.text_to_image(models, [""], seed=5, **kw)
    assert not torch.equal(a, plain)  # the CLIP-L embedding conditions Stage C


def test_image_to_image(models, photo) -> None:
    a = sampling.image_to_image(
        models, photo, ["an astronaut"], image_size_px=64, stage_c=FAST_C, stage_b=FAST_B
    )
    b = sampling.image_to_image(
        models, photo, ["an astronaut"], image_size_px=64, stage_c=FAST_C, stage_b=FAST_B
    )
    assert a.shape == (1, 3, 88, 88) and torch.equal(a, b)
    with pytest.raises(ValueError, match="strength"):
        sampling.image_to_image(models, photo, ["x"], strength=1.5)


def test_reconstruct(models, photo) -> None:
    a = sampling.reconstruct(models, photo, ["an astronaut"], stage_b=FAST_B)
    assert a.shape == photo.shape and torch.equal(
        a, sampling.reconstruct(models, photo, ["an astronaut"], stage_b=FAST_B)
    )
    assert sampling.effnet_input_size(128, 128) == (96, 96)
