"""ControlNet control inputs (spec §1.7): canny, inpainting and super-resolution filters on real images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data
from torchvision.transforms.functional import gaussian_blur

from stages.control_inputs import (
    BLUR_SIGMA,
    CONTROL_KINDS,
    canny_edges,
    control_input,
    inpaint_input,
    inpaint_mask,
    random_saliency,
    saliency_size,
    sample_inpaint_mask,
    sr_effnet_input,
)
from stages.flavors import build_model, get_flavor


def _to_tensor(image: np.ndarray, size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 HWC → 1×3×H×W float in [0, 1], optionally resized (bilinear, antialiased)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div(255).unsqueeze(0)
    if size is not None:
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return _to_tensor(data.astronaut(), (256, 256))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """Two real images, 256×384."""
    return torch.cat([_to_tensor(data.chelsea(), (256, 384)), _to_tensor(data.coffee(), (256, 384))])


@pytest.fixture(scope="module")
def effnet() -> torch.nn.Module:
    return build_model("effnet/tiny")[0]


def _cv2_canny(x: torch.Tensor) -> np.ndarray:
    """Direct cv2 call on one 3×H×W image, truncating to uint8 as the official filter does."""
    img = (x.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    return cv2.Canny(img, 100, 200)


# --- canny -------------------------------------------------------------------------------------------------


def test_canny_cv2_accepts_three_channels() -> None:
    edges = cv2.Canny(data.astronaut(), 100, 200)
    assert edges.shape == data.astronaut().shape[:2] and set(np.unique(edges)) == {0, 255}


def test_canny_shape_range_and_matches_cv2(astronaut: torch.Tensor) -> None:
    out = canny_edges(astronaut)
    assert out.shape == (1, 1, 256, 256) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    small = F.interpolate(astronaut, size=(224, 224), mode="bilinear", align_corners=False)
    ref = _cv2_canny(small[0])
    density = (ref > 0).mean()
    assert 0.02 < density < 0.3  # a real image has edges, but not everywhere
    # Where cv2 finds edges on the 224² resize, the upsampled output is lit; elsewhere it is (nearly) dark.
    up = F.interpolate(out, size=(224, 224), mode="bilinear", align_corners=False)[0, 0].numpy()
    assert up[ref > 0].mean() > 0.5 and up[ref == 0].mean() < 0.1
    expected = F.interpolate(
        torch.from_numpy(ref).float().div(255)[None, None], size=(256, 256), mode="bilinear"
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_canny_binary_without_resampling(astronaut: torch.Tensor) -> None:
    out = canny_edges(astronaut, resize=None)
    assert set(out.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(out[0, 0], torch.from_numpy(_cv2_canny(astronaut[0])).float() / 255)
    # A 224² image: the bilinear resizes are identities, so the default path is binary too.
    x224 = _to_tensor(data.astronaut(), (224, 224))
    assert set(canny_edges(x224).unique().tolist()) == {0.0, 1.0}
    assert torch.equal(canny_edges(x224), canny_edges(x224, resize=None))


def test_canny_constant_image_has_no_edges() -> None:
    assert canny_edges(torch.full((2, 3, 100, 150), 0.6)).count_nonzero() == 0


# --- inpainting --------------------------------------------------------------------------------------------


def test_random_saliency_range_and_determinism() -> None:
    a = random_saliency(3, (240, 360), torch.Generator().manual_seed(0))
    b = random_saliency(3, (240, 360), torch.Generator().manual_seed(0))
    c = random_saliency(3, (240, 360), torch.Generator().manual_seed(1))
    assert a.shape == (3, 1, 240, 360) and torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() > 0 and a.max() <= 1 and (a.amax(dim=(1, 2, 3)) > 0.9).all()
    assert saliency_size((256, 384)) == (240, 360) and saliency_size((500, 300)) == (400, 240)


def test_sample_inpaint_mask_determinism(batch: torch.Tensor) -> None:
    a = sample_inpaint_mask(batch, torch.Generator().manual_seed(0))
    b = sample_inpaint_mask(batch, torch.Generator().manual_seed(0))
    c = sample_inpaint_mask(batch, torch.Generator().manual_seed(1))
    assert a.shape == (2, 1, 256, 384) and a.dtype == torch.bool
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.any() and not a.all()


def test_inpaint_input_whitens_masked_pixels(batch: torch.Tensor) -> None:
    mask = sample_inpaint_mask(batch, torch.Generator().manual_seed(0))
    out = inpaint_input(batch, mask)
    assert out.shape == (2, 4, 256, 384)
    m = mask.expand(-1, 3, -1, -1)
    assert (out[:, :3][m] == 1.0).all()
    assert torch.equal(out[:, :3][~m], batch[~m])
    assert torch.equal(out[:, 3:], mask.float())
    with pytest.raises(ValueError, match="mask shape"):
        inpaint_input(batch, mask[:, :, :100])


def test_outpaint_inverts_and_threshold_is_per_sample() -> None:
    # A half-plane map: 0.2 left of column 120, 0.8 from it on (240 at full size); the blur keeps a
    # straight step where it is.
    sal = torch.full((2, 1, 120, 240), 0.2)
    sal[..., 120:] = 0.8
    size = (240, 480)
    inpaint = inpaint_mask(sal, 0.5, outpaint=False, size=size)
    outpaint = inpaint_mask(sal, 0.5, outpaint=True, size=size)
    expected = torch.zeros(2, 1, *size, dtype=torch.bool)
    expected[..., 240:] = True
    assert torch.equal(inpaint, expected) and torch.equal(outpaint, ~expected)
    mixed = inpaint_mask(sal, 0.5, outpaint=torch.tensor([False, True]), size=size)
    assert torch.equal(mixed[0], inpaint[0]) and torch.equal(mixed[1], outpaint[1])
    per_sample = inpaint_mask(sal, torch.tensor([0.1, 0.9]), outpaint=False, size=size)
    assert per_sample[0].all() and not per_sample[1].any()


def test_inpaint_mask_blur_smooths_small_specks() -> None:
    sal = torch.zeros(1, 1, 240, 240)
    sal[..., 100:104, 100:104] = 1.0  # a 4-px speck vanishes under the 141-px blur (sigma 21.5)
    assert abs(BLUR_SIGMA - 21.5) < 1e-12  # torchvision's default sigma for kernel 141
    x = torch.rand(1, 1, 80, 80)
    assert torch.equal(gaussian_blur(x, [141, 141]), gaussian_blur(x, [141, 141], [BLUR_SIGMA, BLUR_SIGMA]))
    assert not inpaint_mask(sal, 0.5, outpaint=False, size=(240, 240)).any()
    big = torch.zeros(1, 1, 240, 240)
    big[..., 60:180, 60:180] = 1.0
    assert inpaint_mask(big, 0.5, outpaint=False, size=(240, 240))[..., 120, 120].all()
    # Masks smaller than the kernel still work (kernel shrunk to fit the reflect padding).
    assert inpaint_mask(big, 0.5, outpaint=False, size=(32, 32)).shape == (1, 1, 32, 32)


# --- super-resolution --------------------------------------------------------------------------------------


def test_sr_latent_is_upsampled_encoding_of_downscale(batch: torch.Tensor, effnet: torch.nn.Module) -> None:
    latent, preview = sr_effnet_input(batch, effnet)
    assert latent.shape == (2, 16, 256 // 32, 384 // 32) and not latent.requires_grad
    low = F.interpolate(batch, scale_factor=0.5, mode="nearest")
    with torch.no_grad():
        expected = effnet.encode(low).repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    assert torch.equal(latent, expected)
    assert preview.shape == batch.shape
    assert torch.equal(preview, low.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1))


def test_sr_latent_size_matches_full_image_for_odd_sizes(effnet: torch.nn.Module) -> None:
    images = torch.rand(1, 3, 250, 300)
    latent, preview = sr_effnet_input(images, effnet)
    with torch.no_grad():
        assert latent.shape == effnet.encode(images).shape == (1, 16, 8, 10)
    assert preview.shape == images.shape


# --- dispatch ----------------------------------------------------------------------------------------------


def test_control_input_channels(batch: torch.Tensor, effnet: torch.nn.Module) -> None:
    for kind, channels in CONTROL_KINDS.items():
        out = control_input(kind, batch, generator=torch.Generator().manual_seed(0), effnet=effnet)
        h, w = (256 // 32, 384 // 32) if kind == "super_resolution" else (256, 384)
        assert out.shape == (2, channels, h, w)
        assert get_flavor(f"controlnet/{kind}").config.c_in == channels
        assert get_flavor(f"controlnet/{kind}/tiny").config.c_in == channels


def test_control_input_errors(batch: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="effnet"):
        control_input("super_resolution", batch)
    with pytest.raises(ValueError, match="canny, inpainting, super_resolution"):
        control_input("depth", batch)


def test_tiny_controlnet_accepts_canny(astronaut: torch.Tensor) -> None:
    model = build_model("controlnet/canny/tiny")[0]
    with torch.no_grad():
        out = model(canny_edges(astronaut))
    assert isinstance(out, list) and len(out) == max(model.config.proj_blocks) + 1
    assert all((o is not None) == (i in model.config.proj_blocks) for i, o in enumerate(out))
