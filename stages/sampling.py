"""Sampling with the official inference settings, as plain functions (spec §5).

- text-to-image: Stage C 20 steps, cfg 4, shift 2 → Stage B 10 steps, cfg 1.1, shift 1 → Stage A decode;
- image variation: the image's CLIP-L embedding as ``clip_img`` with an empty caption;
- image-to-image: the effnet latent noised to t=0.8, then 16 Stage C steps from there;
- reconstruction: resize (nearest) by 3/4 to a multiple of 32 → effnet → Stage B sampling → Stage A;
- ControlNet: ``controlnet(control) × multiplier`` steers both guidance branches of Stage C (the same signals,
  as the official ``ControlNetCore`` sets ``conditions['cnet'] = unconditions['cnet']``), then Stage B and A
  as for text-to-image.

Every function returns images in [0, 1] and is deterministic under ``seed``. Each sampler keeps the x0
prediction of the last step, as the official notebooks do. :func:`to_uint8` is the one conversion to 8-bit
pixels (what a PNG holds).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from stages.conditioners import ClipTextConditioner, ClipVisionConditioner
from stages.controlnet import ControlNet
from stages.effnet import EfficientNetEncoder
from stages.gdf import GDF, stage_gdf
from stages.stage_a import StageA
from stages.stage_b import StageB
from stages.stage_c import StageC

C_COMPRESSION = 42.67  # pixels per Stage C latent cell at inference (1024 px → 24)
B_COMPRESSION = 4  # pixels per Stage A latent cell


@dataclass(frozen=True, kw_only=True)
class SamplerSettings:
    """One stage's sampler settings (official notebook defaults are in ``STAGE_C`` and ``STAGE_B``)."""

    timesteps: int
    cfg: float
    shift: float
    cfg_rho: float = 0.7

    def __post_init__(self) -> None:
        if self.timesteps < 1:
            raise ValueError(f"timesteps={self.timesteps} must be >= 1")
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift} must be > 0")


STAGE_C = SamplerSettings(timesteps=20, cfg=4.0, shift=2.0)
STAGE_B = SamplerSettings(timesteps=10, cfg=1.1, shift=1.0)


@dataclass
class CascadeModels:
    """The models one text-to-image run needs; ``vision`` only for image variation."""

    stage_c: StageC
    stage_b: StageB
    stage_a: StageA
    effnet: EfficientNetEncoder
    text: ClipTextConditioner
    vision: ClipVisionConditioner | None = None
    gdf: GDF | None = None

    def __post_init__(self) -> None:
        self.gdf = self.gdf or stage_gdf()

    @property
    def device(self) -> torch.device:
        return next(self.stage_c.parameters()).device


def latent_sizes(height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Stage C (⌈H/42.67⌉, ⌈W/42.67⌉) and Stage B (⌈H/4⌉, ⌈W/4⌉) latent sizes for an output size."""
    c = (math.ceil(height / C_COMPRESSION), math.ceil(width / C_COMPRESSION))
    return c, (math.ceil(height / B_COMPRESSION), math.ceil(width / B_COMPRESSION))


def _last_x0(
    gdf: GDF, model, inputs: dict, uncond: dict, shape, settings: SamplerSettings, **kw
) -> torch.Tensor:
    """Run ``gdf.sample`` to the end and return the last step's x0 prediction."""
    steps = gdf.sample(
        model,
        inputs,
        shape,
        unconditional_inputs=uncond,
        timesteps=kw.pop("timesteps", settings.timesteps),
        cfg=settings.cfg,
        cfg_rho=settings.cfg_rho,
        shift=settings.shift,
        **kw,
    )
    *_, (x0, _x, _pred) = steps
    return x0


def _text_conditions(models: CascadeModels, captions: Sequence[str], clip_img: torch.Tensor | None) -> dict:
    clip_text, pooled = models.text(list(captions))
    device = models.device
    if clip_img is None:
        clip_img = torch.zeros(len(captions), 1, models.stage_c.config.c_clip_img)
    return {
        "clip_text": clip_text.to(device),
        "clip_text_pooled": pooled.to(device),
        "clip_img": clip_img.reshape(len(captions), 1, -1).to(device),
    }


def sample_stage_c(
    models: CascadeModels,
    captions: Sequence[str],
    size_hw: tuple[int, int],
    *,
    clip_img: torch.Tensor | None = None,
    settings: SamplerSettings = STAGE_C,
    seed: int = 42,
    t_start: float = 1.0,
    x_init: torch.Tensor | None = None,
    cnet: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Stage C latents (B,16,h,w) for captions; the unconditional pass uses "" captions and zero clip_img.

    ``cnet`` (from :func:`controlnet_signals`) goes to both the conditional and the unconditional pass.
    """
    cond = _text_conditions(models, captions, clip_img)
    uncond = _text_conditions(models, [""] * len(captions), None)
    if cnet is not None:
        cond["cnet"] = uncond["cnet"] = list(cnet)
    shape = (len(captions), models.stage_c.config.c_in, *size_hw)
    generator = torch.Generator(device=models.device).manual_seed(seed)
    timesteps = settings.timesteps if t_start == 1.0 else int(settings.timesteps * t_start)
    return _last_x0(
        models.gdf, models.stage_c, cond, uncond, shape, settings,
        timesteps=timesteps, t_start=t_start, x_init=x_init, generator=generator, device=models.device,
    )  # fmt: skip


def sample_stage_b(
    models: CascadeModels,
    effnet_latents: torch.Tensor,
    captions: Sequence[str],
    size_hw: tuple[int, int],
    *,
    settings: SamplerSettings = STAGE_B,
    seed: int = 42,
) -> torch.Tensor:
    """Stage A latents (B,4,H/4,W/4) from Stage C latents; the unconditional effnet is zeros."""
    _, pooled = models.text(list(captions))
    return stage_b_latents(
        models.stage_b, effnet_latents, pooled, size_hw, gdf=models.gdf, settings=settings, seed=seed
    )


def stage_b_latents(
    stage_b: StageB,
    effnet_latents: torch.Tensor,
    pooled: torch.Tensor,
    size_hw: tuple[int, int],
    *,
    gdf: GDF | None = None,
    settings: SamplerSettings = STAGE_B,
    seed: int = 42,
) -> torch.Tensor:
    """Stage B sampling from effnet latents and pooled CLIP-bigG text embeddings (B,1,1280), e.g. a cache's."""
    device = next(stage_b.parameters()).device
    pooled = pooled.reshape(pooled.size(0), 1, -1).to(device)
    cond = {"effnet": effnet_latents.to(device), "clip": pooled}
    uncond = {"effnet": torch.zeros_like(cond["effnet"]), "clip": pooled}
    shape = (effnet_latents.size(0), stage_b.config.c_in, *size_hw)
    generator = torch.Generator(device=device).manual_seed(seed)
    return _last_x0(
        gdf or stage_gdf(), stage_b, cond, uncond, shape, settings, generator=generator, device=device
    )


def stage_b_size(effnet_hw: Sequence[int]) -> tuple[int, int]:
    """Stage B's latent size for an effnet latent: 4/3 of the encoded pixel size (768 px → 24 → 256), /4, even."""
    return tuple(2 * round(s * 32 * 4 / 3 / B_COMPRESSION / 2) for s in effnet_hw)


def decode(models: CascadeModels, stage_a_latents: torch.Tensor) -> torch.Tensor:
    """Stage A decode, clamped to [0, 1]."""
    return models.stage_a.decode(stage_a_latents).float().clamp(0, 1)


@torch.no_grad()
def text_to_image(
    models: CascadeModels,
    captions: Sequence[str],
    *,
    height: int = 1024,
    width: int = 1024,
    seed: int = 42,
    stage_c: SamplerSettings = STAGE_C,
    stage_b: SamplerSettings = STAGE_B,
    clip_img: torch.Tensor | None = None,
    cnet: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Captions → images (B,3,H,W) in [0,1] with the official two-stage sampling (``cnet``: a ControlNet's
    signals for Stage C, see :func:`controlnet_to_image`)."""
    size_c, size_b = latent_sizes(height, width)
    latents_c = sample_stage_c(
        models, captions, size_c, clip_img=clip_img, settings=stage_c, seed=seed, cnet=cnet
    )
    latents_b = sample_stage_b(models, latents_c, captions, size_b, settings=stage_b, seed=seed)
    return decode(models, latents_b)


@torch.no_grad()
def image_variation(models: CascadeModels, images: torch.Tensor, *, seed: int = 42, **kwargs) -> torch.Tensor:
    """Variations of images (B,3,H,W) in [0,1]: CLIP-L image embedding with an empty caption."""
    if models.vision is None:
        raise ValueError("image_variation needs CascadeModels.vision (a CLIP vision conditioner)")
    clip_img = models.vision(images).unsqueeze(1)
    captions = [""] * images.size(0)
    return text_to_image(models, captions, clip_img=clip_img, seed=seed, **kwargs)


def resize_short_side(images: torch.Tensor, size_px: int) -> torch.Tensor:
    """Resize (bilinear, antialias) so the short side is ``size_px``; the official image-to-image input."""
    return TF.resize(images, [size_px], antialias=True)


@torch.no_grad()
def image_to_image(
    models: CascadeModels,
    images: torch.Tensor,
    captions: Sequence[str],
    *,
    strength: float = 0.8,
    image_size_px: int = 768,
    seed: int = 42,
    stage_c: SamplerSettings = STAGE_C,
    stage_b: SamplerSettings = STAGE_B,
) -> torch.Tensor:
    """Noise the effnet latent of ``images`` to t=``strength`` (shift 1), then sample from there."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength={strength} must be in (0, 1]")
    device = models.device
    latents = models.effnet.encode(resize_short_side(images, image_size_px).to(device))
    generator = torch.Generator(device=device).manual_seed(seed)
    t = torch.full((latents.size(0),), strength, device=device)
    x_init = models.gdf.diffuse(latents, t=t, generator=generator).noised
    # Stage C works at the effnet latent's size; Stage B decodes at 4/3 of the encoded pixel size.
    size_b = stage_b_size(latents.shape[-2:])
    latents_c = sample_stage_c(
        models, captions, latents.shape[-2:], settings=stage_c, seed=seed, t_start=strength, x_init=x_init
    )
    latents_b = sample_stage_b(models, latents_c, captions, size_b, settings=stage_b, seed=seed)
    return decode(models, latents_b)


def effnet_input_size(height: int, width: int, factor: float = 0.75) -> tuple[int, int]:
    """The reconstruction's effnet input size: (⌊H·f/32⌋·32, ⌊W·f/32⌋·32); 1024 → 768."""
    return (int(height * factor / 32) * 32, int(width * factor / 32) * 32)


@torch.no_grad()
def reconstruct(
    models: CascadeModels,
    images: torch.Tensor,
    captions: Sequence[str] | None = None,
    *,
    seed: int = 42,
    stage_b: SamplerSettings = STAGE_B,
) -> torch.Tensor:
    """Stage A + B as an autoencoder: images (B,3,H,W) → nearest resize ×3/4 → effnet → Stage B → Stage A."""
    h, w = images.shape[-2:]
    small = F.interpolate(images, size=effnet_input_size(h, w), mode="nearest")
    latents = models.effnet.encode(small.to(models.device))
    captions = list(captions) if captions is not None else [""] * images.size(0)
    size_b = (h // B_COMPRESSION, w // B_COMPRESSION)
    latents_b = sample_stage_b(models, latents, captions, size_b, settings=stage_b, seed=seed)
    return decode(models, latents_b)


def check_controlnet_fits(stage_c: StageC, controlnet: ControlNet) -> None:
    """Refuse a ControlNet whose signals do not fit Stage C: their width must be Stage C's first level width
    and their ResBlock indices must exist (the released ControlNets fit the 3.6B Stage C only, spec §1.7)."""
    config, width, n_blocks = controlnet.config, stage_c.config.c_hidden[0], stage_c.count_resblocks()
    if config.c_proj != width or max(config.proj_blocks) >= n_blocks:
        raise ValueError(
            f"the ControlNet (c_proj {config.c_proj}, blocks up to {max(config.proj_blocks)}) does not fit "
            f"this Stage C (c_hidden {width}, {n_blocks} ResBlocks)"
        )


def controlnet_signals(
    controlnet: nn.Module, control: torch.Tensor, multiplier: float = 1.0
) -> list[torch.Tensor | None]:
    """The ControlNet's per-ResBlock signals for a control input (B,c_in,H,W), each × ``multiplier``
    (the official ``cnet_multiplier``, 1.0), computed once for every sampling step."""
    param = next(controlnet.parameters())
    signals = controlnet(control.to(device=param.device, dtype=param.dtype))
    return [None if s is None else s.float() * multiplier for s in signals]


@torch.no_grad()
def controlnet_to_image(
    models: CascadeModels,
    controlnet: ControlNet,
    control: torch.Tensor,
    captions: Sequence[str],
    *,
    height: int = 1024,
    width: int = 1024,
    seed: int = 42,
    stage_c: SamplerSettings = STAGE_C,
    stage_b: SamplerSettings = STAGE_B,
    multiplier: float = 1.0,
) -> torch.Tensor:
    """Captions steered by a ControlNet → images (B,3,H,W) in [0,1] (spec §5, ControlNet).

    ``control`` is the ControlNet's input, one per caption (``stages.control_inputs``: canny edges of the
    control image, the inpainting ``[masked image, mask]``, the super-resolution low-res effnet latent); its
    size may differ from the output's, as each signal is resized to Stage C's activations.
    """
    if control.size(0) != len(captions):
        raise ValueError(f"{control.size(0)} control inputs for {len(captions)} captions")
    check_controlnet_fits(models.stage_c, controlnet)
    cnet = controlnet_signals(controlnet, control, multiplier)
    return text_to_image(
        models, captions, height=height, width=width, seed=seed, stage_c=stage_c, stage_b=stage_b, cnet=cnet
    )


def fit_to_size(images: torch.Tensor, size_hw: tuple[int, int], *, nearest: bool = False) -> torch.Tensor:
    """Resize images (B,C,H,W) to cover ``size_hw`` (aspect kept; bilinear with antialias, or nearest for
    masks), then centre-crop to exactly ``size_hw``."""
    height, width = size_hw
    scale = max(height / images.shape[-2], width / images.shape[-1])
    cover = [max(height, round(images.shape[-2] * scale)), max(width, round(images.shape[-1] * scale))]
    mode = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
    resized = TF.resize(images, cover, interpolation=mode, antialias=not nearest)
    return TF.center_crop(resized, [height, width])


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B,3,H,W) in [0, 1] → (B,H,W,3) uint8, rounded: the pixels a PNG of the sample holds."""
    return (
        (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    )
