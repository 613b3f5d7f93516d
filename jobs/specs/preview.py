"""Preview grids: rows of decoded images side by side in one PNG."""

from __future__ import annotations

import io

import torch


def stretch(images_bchw: torch.Tensor) -> torch.Tensor:
    """Contrast-stretch each image and channel to [0, 1]: a random-init decoder's output is near zero, so a
    grid from it shows something only when stretched (real decoders are clamped instead)."""
    low = images_bchw.amin(dim=(2, 3), keepdim=True)
    return (images_bchw - low) / (images_bchw.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-6)


def decoded(images_bchw: torch.Tensor, *, real_weights: bool) -> torch.Tensor:
    """A decoder's output for a grid: as it is with real weights (clamped later), stretched with random ones."""
    return images_bchw if real_weights else stretch(images_bchw)


def png_grid(rows: list[torch.Tensor]) -> bytes:
    """A PNG with one row per tensor of ``rows`` (each ``(n, 3, H, W)``, clamped to [0, 1]; equal shapes)."""
    from PIL import Image

    images = torch.cat(rows).float().clamp(0, 1)
    n, (_, _, h, w) = len(rows[0]), images.shape
    grid = images.reshape(len(rows), n, 3, h, w).permute(0, 3, 1, 4, 2).reshape(len(rows) * h, n * w, 3)
    buffer = io.BytesIO()
    Image.fromarray((grid * 255).round().byte().cpu().numpy()).save(buffer, format="PNG")
    return buffer.getvalue()
