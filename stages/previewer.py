"""Previewer: a small convolutional decoder from Stage C latents to low-resolution RGB previews.

Checkpoint-compatible with the official ``previewer.safetensors`` (one ``blocks`` Sequential, no prefix).
Three stride-2 transposed convs upsample ×8: a 16×24×24 latent becomes a 3×192×192 image (roughly in [0, 1],
not clamped). Used only for training previews. See ``reference/stable-cascade.md`` §1.6.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FLAVORS", "Previewer", "PreviewerConfig"]


@dataclass(frozen=True, kw_only=True)
class PreviewerConfig:
    """Widths of the previewer.

    Attributes:
        c_in: Latent channels (16 for Stage C latents).
        c_hidden: Width at the latent resolution; it halves after the first and second upsampling.
        c_out: Output image channels.
    """

    c_in: int
    c_hidden: int
    c_out: int

    def __post_init__(self) -> None:
        for name in ("c_in", "c_hidden", "c_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PreviewerConfig.{name}={value!r}: must be a positive int")
        if self.c_hidden % 4 != 0:
            raise ValueError(f"PreviewerConfig.c_hidden={self.c_hidden}: must be divisible by 4")


FLAVORS: dict[str, PreviewerConfig] = {
    "previewer": PreviewerConfig(c_in=16, c_hidden=512, c_out=3),
    "previewer/tiny": PreviewerConfig(c_in=16, c_hidden=32, c_out=3),
}


def _act_norm(c: int) -> list[nn.Module]:
    return [nn.GELU(), nn.BatchNorm2d(c)]


class Previewer(nn.Module):
    """Latents ``B×c_in×h×w`` → images ``B×c_out×8h×8w``.

    Layout of ``blocks`` (indices are the checkpoint keys): a 1×1 conv, then three rounds of
    [3×3 conv, stride-2 transposed conv], a final 3×3 conv and a 1×1 conv to ``c_out``; every conv but the last
    is followed by GELU and BatchNorm.
    """

    def __init__(self, config: PreviewerConfig) -> None:
        super().__init__()
        self.config = config
        c0, c1, c2 = config.c_hidden, config.c_hidden // 2, config.c_hidden // 4
        layers: list[nn.Module] = [nn.Conv2d(config.c_in, c0, kernel_size=1), *_act_norm(c0)]
        for c_from, c_to in ((c0, c1), (c1, c2), (c2, c2)):
            layers += [nn.Conv2d(c_from, c_from, kernel_size=3, padding=1), *_act_norm(c_from)]
            layers += [nn.ConvTranspose2d(c_from, c_to, kernel_size=2, stride=2), *_act_norm(c_to)]
        layers += [nn.Conv2d(c2, c2, kernel_size=3, padding=1), *_act_norm(c2)]
        layers.append(nn.Conv2d(c2, config.c_out, kernel_size=1))
        self.blocks = nn.Sequential(*layers)

    def forward(self, latents_bchw: torch.Tensor) -> torch.Tensor:
        """Decode Stage C latents to preview images (not clamped)."""
        return self.blocks(latents_bchw)
