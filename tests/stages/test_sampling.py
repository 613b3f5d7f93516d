"""Every sampling function runs end to end at the tiny flavors on CPU and is deterministic under a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data as skdata

from stages import sampling
from stages.conditioners import ClipTextConditioner, ClipVisionConditioner
from stages.control_inputs import centre_mask, control_input
from stages.controlnet import FLAVORS as CONTROLNET
from stages.controlnet import ControlNet
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


@pytest.fixture(scope="module")
def canny_net() -> ControlNet:
    """The tiny canny ControlNet with non-zero projections (the official init zeroes them: no effect)."""
    net = ControlNet(CONTROLNET["controlnet/canny/tiny"]).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for projection in net.projections:
            projection[-1].weight.copy_(torch.randn(projection[-1].weight.shape, generator=gen) * 0.05)
    return net


def test_controlnet_to_image(models, photo, canny_net) -> None:
    kw = {"height": 64, "width": 64, "stage_c": FAST_C, "stage_b": FAST_B, "seed": 4}
    edges = control_input("canny", sampling.fit_to_size(photo, (64, 64)))
    steered = sampling.controlnet_to_image(models, canny_net, edges, ["an astronaut"], **kw)
    plain = sampling.text_to_image(models, ["an astronaut"], **kw)
    assert steered.shape == (1, 3, 64, 64) and not torch.equal(steered, plain)  # the signals steer Stage C
    fresh = ControlNet(CONTROLNET["controlnet/canny/tiny"]).eval()  # zero projections: exactly text-to-image
    assert torch.equal(sampling.controlnet_to_image(models, fresh, edges, ["an astronaut"], **kw), plain)
    with pytest.raises(ValueError, match="2 control inputs for 1 captions"):
        sampling.controlnet_to_image(models, canny_net, edges.expand(2, -1, -1, -1), ["x"], **kw)


def test_controlnet_must_fit_stage_c(models) -> None:
    with torch.device("meta"):  # the released canny ControlNet fits the 3.6B Stage C only
        released = ControlNet(CONTROLNET["controlnet/canny"])
    with pytest.raises(ValueError, match=r"c_proj 2048, blocks up to 63\).*\(c_hidden 64, 6 ResBlocks"):
        sampling.check_controlnet_fits(models.stage_c, released)


def test_inference_control_inputs(photo) -> None:
    mask = centre_mask(2, (8, 12))
    assert mask.shape == (2, 1, 8, 12) and mask.dtype == torch.bool
    assert mask[0, 0].nonzero().tolist() == [[y, x] for y in range(2, 6) for x in range(3, 9)]
    image = sampling.fit_to_size(photo, (8, 12))
    inpaint = control_input("inpainting", image, mask=mask[:1])
    assert torch.equal(inpaint[:, 3:].bool(), mask[:1]) and torch.all(
        inpaint[:, :3][mask[:1].expand(1, 3, -1, -1)] == 1
    )


def test_fit_to_size_and_to_uint8() -> None:
    wide = torch.arange(2 * 4, dtype=torch.float32).reshape(1, 1, 2, 4)
    assert torch.equal(sampling.fit_to_size(wide, (2, 2), nearest=True), wide[..., 1:3])  # centre crop only
    tall = sampling.fit_to_size(torch.rand(1, 3, 50, 100), (64, 32))  # cover (64×128), then crop
    assert tall.shape == (1, 3, 64, 32)
    pixels = sampling.to_uint8(torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.499 / 255]).reshape(1, 3, 1, 2))
    assert pixels.dtype == np.uint8 and pixels.shape == (1, 1, 2, 3)
    assert pixels.ravel().tolist() == [0, 255, 0, 128, 255, 0]  # rounded and clamped, channels last
