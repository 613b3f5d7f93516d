"""ControlNet control inputs: the official filters that turn images into ControlNet conditioning (spec §1.7).

Images are float tensors in [0, 1] shaped ``B×3×H×W``. Each kind produces the input of one ControlNet flavor
(``stages.controlnet``); :data:`CONTROL_KINDS` maps kind → channels (the flavor's ``c_in``):

- ``canny`` (1 channel), :func:`canny_edges`: bilinear resize to 224², ``cv2.Canny(·, 100, 200)``, /255,
  bilinear resize back.
- ``inpainting`` (4 channels), :func:`inpaint_input` with a mask from :func:`sample_inpaint_mask`: the masked
  pixels of the image are set to white (1.0) and the mask is appended as a fourth channel.
- ``super_resolution`` (16 channels), :func:`sr_effnet_input`: the EfficientNet latent of a nearest ×0.5
  downscale, nearest-upsampled to the full image's latent size.

**The inpainting saliency map is a stand-in.** The official InpaintFilter thresholds the output of a saliency
MicroResNet run on a 240-px resize; that model's weights are not shipped, so :func:`random_saliency` draws a
smooth random blob (an axis-aligned 2-D gaussian at a random centre with random radii, values in (0, 1])
instead. Everything after the saliency map — threshold t ~ U(0.04, 0.4), outpaint inversion with p = 0.4,
nearest resize to full size, a 141-px gaussian blur, ``> 0.5`` — is the official post-processing
(:func:`inpaint_mask`), so a real saliency model can be dropped in by passing its map to :func:`inpaint_mask`.

The blur uses ``torchvision.transforms.functional.gaussian_blur`` with kernel 141 and sigma
:data:`BLUR_SIGMA` = 21.5, torchvision's default for that kernel size (``0.3 * ((141 - 1) * 0.5 - 1) + 0.8``),
which is what the official code gets by passing no sigma. torchvision pads by reflection, which needs
``kernel // 2 < min(H, W)``; for masks smaller than 71 px the kernel is shrunk to the largest odd size that
fits (sigma kept), where the official code would fail. The 141² kernel is applied as a dense 2-D convolution
(about 1 s per 512² mask on 2 CPU threads).
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from stages.effnet import EfficientNetEncoder

__all__ = [
    "BLUR_KERNEL",
    "BLUR_SIGMA",
    "CANNY_THRESHOLDS",
    "CONTROL_KINDS",
    "SALIENCY_SHORT_SIDE",
    "canny_edges",
    "centre_mask",
    "control_input",
    "inpaint_input",
    "inpaint_mask",
    "random_saliency",
    "saliency_size",
    "sample_inpaint_mask",
    "sr_effnet_input",
]

CONTROL_KINDS: dict[str, int] = {"canny": 1, "inpainting": 4, "super_resolution": 16}
"""Control kind → channels of its control input (the ``c_in`` of ``controlnet/<kind>`` and its /tiny twin)."""

CANNY_THRESHOLDS = (100, 200)
BLUR_KERNEL = 141
BLUR_SIGMA = 0.3 * ((BLUR_KERNEL - 1) * 0.5 - 1) + 0.8  # 21.5: torchvision's default for kernel 141
SALIENCY_SHORT_SIDE = 240
_EFFNET_STRIDE = 32


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected B×3×H×W images in [0, 1], got shape {tuple(images.shape)}")


def canny_edges(images: torch.Tensor, resize: int | None = 224) -> torch.Tensor:
    """The official CannyFilter: ``B×3×H×W`` images in [0, 1] → ``B×1×H×W`` float32 edges in [0, 1].

    Images are bilinearly resized (``align_corners=False``) to ``resize × resize``, converted per image to
    HWC uint8 as ``(x * 255).astype(np.uint8)`` (truncation, as the official code does; values are clipped to
    [0, 255] first so out-of-range input cannot wrap), passed to ``cv2.Canny(·, 100, 200)`` (OpenCV accepts
    3-channel input and uses the largest per-channel gradient), divided by 255 and resized back to ``H × W``.
    ``resize=None`` skips both resizes, giving exact {0, 1} edges.
    """
    _check_images(images)
    size = images.shape[-2:]
    x = images.detach().float()
    if resize is not None:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear", align_corners=False)
    hwc = (x * 255).clamp(0, 255).permute(0, 2, 3, 1).cpu().numpy()
    low, high = CANNY_THRESHOLDS
    edges = np.stack([cv2.Canny(np.ascontiguousarray(img.astype(np.uint8)), low, high) for img in hwc])
    out = torch.from_numpy(edges).to(device=images.device, dtype=torch.float32).div(255).unsqueeze(1)
    if resize is not None:
        out = F.interpolate(out, size=size, mode="bilinear", align_corners=False)
    return out


def _per_sample(value: float | bool | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or ``(B,)`` value as a ``B×1×1×1`` tensor."""
    t = torch.as_tensor(value, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"expected a scalar or a ({batch},) tensor, got shape {tuple(t.shape)}")
    return t.view(batch, 1, 1, 1)


def inpaint_mask(
    saliency: torch.Tensor,
    threshold: float | torch.Tensor,
    *,
    outpaint: bool | torch.Tensor,
    size: tuple[int, int],
) -> torch.Tensor:
    """The official InpaintFilter post-processing of a saliency map: ``B×1×h×w`` in [0, 1] → ``B×1×H×W`` bool.

    ``mask = saliency > threshold`` (scalar or per-sample ``(B,)`` threshold), inverted where ``outpaint``
    (scalar or ``(B,)`` bool), resized nearest to ``size = (H, W)``, gaussian-blurred (kernel
    :data:`BLUR_KERNEL`, sigma :data:`BLUR_SIGMA`; see the module docstring for tiny sizes), then ``> 0.5``.
    True marks the pixels to paint.
    """
    if saliency.ndim != 4 or saliency.shape[1] != 1:
        raise ValueError(f"expected a B×1×h×w saliency map, got shape {tuple(saliency.shape)}")
    batch = saliency.shape[0]
    thr = _per_sample(threshold, batch, saliency.device).to(saliency.dtype)
    flip = _per_sample(outpaint, batch, saliency.device).bool()
    mask = (saliency > thr) ^ flip
    height, width = size
    mask = F.interpolate(mask.float(), size=(height, width), mode="nearest")
    kernel = min(BLUR_KERNEL, 2 * min(height, width) - 1)  # reflect padding needs kernel // 2 < side
    return gaussian_blur(mask, [kernel, kernel], [BLUR_SIGMA, BLUR_SIGMA]) > 0.5


def inpaint_input(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting control input: ``cat[image with masked pixels set to 1.0, mask as float]`` → ``B×4×H×W``."""
    _check_images(images)
    expected = (images.shape[0], 1, *images.shape[-2:])
    if tuple(mask.shape) != expected:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match images: expected {expected}")
    mask = mask.to(device=images.device, dtype=torch.bool)
    return torch.cat([images.masked_fill(mask, 1.0), mask.to(images.dtype)], dim=1)


def centre_mask(batch: int, size_hw: tuple[int, int]) -> torch.Tensor:
    """The default inference inpainting mask ``B×1×H×W`` bool: the centre half of each side (rows H/4..3H/4,
    columns W/4..3W/4) is painted, the border kept."""
    height, width = size_hw
    mask = torch.zeros(batch, 1, height, width, dtype=torch.bool)
    mask[..., height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    return mask


def random_saliency(
    batch: int, size_hw: tuple[int, int], generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stand-in saliency maps ``B×1×h×w`` in (0, 1]: one smooth gaussian blob per sample.

    The official saliency MicroResNet's weights are not shipped (see the module docstring). Each blob is an
    axis-aligned 2-D gaussian centred at a uniform point of the central 80% of the map, with per-axis radii
    (standard deviations) drawn uniformly from 10%–35% of that side; its peak is ~1. Deterministic given
    ``generator`` (None uses torch's global RNG); the result lives on the generator's device.
    """
    height, width = size_hw
    device = generator.device if generator is not None else torch.device("cpu")
    draws = torch.rand(batch, 4, generator=generator, device=device)
    centre = 0.1 + 0.8 * draws[:, :2]  # (cy, cx) in normalised coordinates
    radius = 0.10 + 0.25 * draws[:, 2:]  # (ry, rx)
    ys = (torch.arange(height, device=device) + 0.5) / height
    xs = (torch.arange(width, device=device) + 0.5) / width
    dy = (ys.view(1, height, 1) - centre[:, 0].view(-1, 1, 1)) / radius[:, 0].view(-1, 1, 1)
    dx = (xs.view(1, 1, width) - centre[:, 1].view(-1, 1, 1)) / radius[:, 1].view(-1, 1, 1)
    return torch.exp(-0.5 * (dy**2 + dx**2)).unsqueeze(1)


def saliency_size(size_hw: tuple[int, int], short_side: int = SALIENCY_SHORT_SIDE) -> tuple[int, int]:
    """The saliency map's size: short side ``short_side``, long side scaled and truncated (torchvision resize)."""
    height, width = size_hw
    if height <= width:
        return short_side, int(short_side * width / height)
    return int(short_side * height / width), short_side


def sample_inpaint_mask(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    threshold_range: tuple[float, float] = (0.04, 0.4),
    p_outpaint: float = 0.4,
) -> torch.Tensor:
    """A training inpainting mask ``B×1×H×W`` bool for ``images`` (``B×3×H×W``), drawn from ``generator``.

    Per sample: threshold ~ U(threshold_range) and outpaint ~ Bernoulli(p_outpaint), then a stand-in
    :func:`random_saliency` map at 240 px (short side, aspect kept) goes through :func:`inpaint_mask`.
    Draw order (thresholds, outpaint flags, saliency) is fixed, so a seeded generator gives the same mask.
    """
    _check_images(images)
    batch, _, height, width = images.shape
    device = generator.device if generator is not None else torch.device("cpu")
    low, high = threshold_range
    threshold = low + (high - low) * torch.rand(batch, generator=generator, device=device)
    outpaint = torch.rand(batch, generator=generator, device=device) < p_outpaint
    saliency = random_saliency(batch, saliency_size((height, width)), generator)
    mask = inpaint_mask(saliency, threshold, outpaint=outpaint, size=(height, width))
    return mask.to(images.device)


def _latent_size(side: int) -> int:
    """EfficientNet output side: each of the five stride-2 3×3 convs (padding 1) maps n to ceil(n / 2)."""
    return -(-side // _EFFNET_STRIDE)


@torch.no_grad()
def sr_effnet_input(
    images: torch.Tensor, effnet: EfficientNetEncoder, scale: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official SREffnetFilter: returns (latent ``B×16×H/32×W/32``, low-res preview ``B×3×H×W``).

    Images are downscaled nearest by ``scale`` (``F.interpolate(scale_factor=scale)``, so the low-res side is
    ``floor(side * scale)``), encoded with ``effnet.encode`` (which ImageNet-normalises [0, 1] input itself)
    and the latent is upsampled nearest to the full image's latent size ``ceil(H/32) × ceil(W/32)``. When H and
    W are multiples of ``32 / scale`` this is exactly the official ``scale_factor=1/scale`` upsampling; other
    sizes would be off by a row or column there, and get the full-image latent size here. The preview is the
    low-res image upsampled nearest back to ``H × W``.
    """
    _check_images(images)
    if not 0 < scale <= 1:
        raise ValueError(f"scale={scale!r} must be in (0, 1]")
    height, width = images.shape[-2:]
    low = F.interpolate(images, scale_factor=scale, mode="nearest")
    param = next(effnet.parameters())
    latent = effnet.encode(low.to(device=param.device, dtype=param.dtype))
    target = (_latent_size(height), _latent_size(width))
    latent = F.interpolate(latent, size=target, mode="nearest")
    preview = F.interpolate(low, size=(height, width), mode="nearest")
    return latent, preview


def control_input(
    kind: str,
    images: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    effnet: EfficientNetEncoder | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The control input of ``kind`` (a :data:`CONTROL_KINDS` key) for ``B×3×H×W`` images in [0, 1].

    ``canny``: :func:`canny_edges`; ``inpainting``: :func:`inpaint_input` with ``mask`` (``B×1×H×W``, True =
    paint; at inference a user's mask or :func:`centre_mask`), else a training mask from
    :func:`sample_inpaint_mask` (drawn from ``generator``); ``super_resolution``: the latent of
    :func:`sr_effnet_input`, which needs ``effnet``. The result has ``CONTROL_KINDS[kind]`` channels.
    """
    if kind == "canny":
        return canny_edges(images)
    if kind == "inpainting":
        return inpaint_input(images, mask if mask is not None else sample_inpaint_mask(images, generator))
    if kind == "super_resolution":
        if effnet is None:
            raise ValueError("control kind 'super_resolution' needs effnet= (an EfficientNetEncoder)")
        return sr_effnet_input(images, effnet)[0]
    raise ValueError(f"unknown control kind {kind!r}; allowed: {', '.join(CONTROL_KINDS)}")
