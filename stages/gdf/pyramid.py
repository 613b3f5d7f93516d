"""Stage B pyramid (multi-resolution) noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pyramid_noise(
    eps: torch.Tensor,
    size_range: tuple[int, int] | None = (1, 16),
    levels: int = 10,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Add coarse noise octaves to ε and renormalise to unit variance (Stage B training noise).

    For i = 1 … levels−1 the octave size is h = H // 2^i (H is used for both dims, as in Stable Cascade);
    when `size_range[0] <= h <= size_range[1]`, N(0, I) noise of shape `[B, C, h, h]` is nearest-upsampled to
    `[H, W]` and added with weight m_i = 0.75^i. The sum is divided by √(Σ m²), the base weight 1 included.

    Args:
        eps: Base Gaussian noise `[B, C, H, W]`.
        size_range: Inclusive (min, max) octave size that gets noise; None means every size >= 1.
        levels: Number of pyramid levels, the base included.
        generator: RNG for the octave noise.

    Returns:
        Noise of `eps`'s shape, device and dtype, with per-element variance 1 if `eps` has variance 1.
    """
    if eps.ndim != 4:
        raise ValueError(f"eps must be [B, C, H, W], got shape {tuple(eps.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels!r}")
    lo, hi = size_range if size_range is not None else (1, eps.shape[-2])
    batch, channels, height, width = eps.shape
    out = eps.clone()
    sq_sum = 1.0
    for i in range(1, levels):
        size = height // 2**i
        if size < 1:
            break
        if not lo <= size <= hi:
            continue
        m = 0.75**i
        octave = torch.randn(
            (batch, channels, size, size), generator=generator, device=eps.device, dtype=eps.dtype
        )
        out = out + F.interpolate(octave, size=(height, width), mode="nearest") * m
        sq_sum += m * m
    return out / sq_sum**0.5
