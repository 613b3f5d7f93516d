"""Stable Cascade ControlNet: a backbone plus zero-initialised projections delivered into Stage C (spec §1.7).

The output is a list indexed by Stage C ResBlock (execution order); entries are None except at
``proj_blocks``. Stage C adds each tensor, bilinearly resized, to x before that ResBlock
(see ``stages.common.ControlNetDeliverer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.common import LayerNorm2d
from stages.effnet import FLAVORS as EFFNET_FLAVORS
from stages.effnet import EfficientNetEncoder

RELEASED_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)
BOTTLENECK_MODES = ("effnet", "simple", "large")


@dataclass(frozen=True, kw_only=True)
class ControlNetConfig:
    """ControlNet hyper-parameters; defaults are the released canny-style effnet model with 3 input channels.

    Attributes:
        c_in: channels of the control input (canny 1, inpainting 4, super-resolution 16, identity 512).
        c_proj: channels of the injected signals (Stage C's c_hidden: 2048 on 3.6B).
        proj_blocks: Stage C ResBlock indices that receive a control signal.
        bottleneck_mode: ``effnet`` (EfficientNetV2-S features), ``simple`` or ``large``.
        effnet_flavor: the EfficientNet flavor used by the ``effnet`` mode.
        large_widths: (expand, hidden, out) channels of the ``large`` bottleneck.
        large_blocks: residual blocks of the ``large`` bottleneck.
    """

    c_in: int = 3
    c_proj: int = 2048
    proj_blocks: tuple[int, ...] = RELEASED_BLOCKS
    bottleneck_mode: str = "effnet"
    effnet_flavor: str = "effnet"
    large_widths: tuple[int, int, int] = (16384, 1024, 1280)
    large_blocks: int = 8

    def __post_init__(self) -> None:
        if self.bottleneck_mode not in BOTTLENECK_MODES:
            raise ValueError(
                f"bottleneck_mode={self.bottleneck_mode!r}; allowed: {', '.join(BOTTLENECK_MODES)}"
            )
        if (
            not self.proj_blocks
            or min(self.proj_blocks) < 0
            or len(set(self.proj_blocks)) != len(self.proj_blocks)
        ):
            raise ValueError(
                f"proj_blocks={self.proj_blocks!r} must be distinct non-negative ResBlock indices"
            )
        if self.effnet_flavor not in EFFNET_FLAVORS:
            raise ValueError(f"effnet_flavor={self.effnet_flavor!r}; allowed: {', '.join(EFFNET_FLAVORS)}")
        if self.c_in < 1 or self.c_proj < 1:
            raise ValueError(f"c_in={self.c_in} and c_proj={self.c_proj} must be positive")


_TINY = {
    "c_proj": 64,
    "proj_blocks": (0, 2, 3, 5),
    "effnet_flavor": "effnet/tiny",
    "large_widths": (64, 32, 48),
}
FLAVORS: dict[str, ControlNetConfig] = {
    "controlnet/canny": ControlNetConfig(c_in=1),
    "controlnet/inpainting": ControlNetConfig(c_in=4),
    "controlnet/super_resolution": ControlNetConfig(c_in=16, bottleneck_mode="large"),
    "controlnet/identity": ControlNetConfig(c_in=512, bottleneck_mode="simple", proj_blocks=tuple(range(64))),
    "controlnet/canny/tiny": ControlNetConfig(c_in=1, **_TINY),
    "controlnet/inpainting/tiny": ControlNetConfig(c_in=4, **_TINY),
    "controlnet/super_resolution/tiny": ControlNetConfig(
        c_in=16, bottleneck_mode="large", large_blocks=2, **_TINY
    ),
    "controlnet/identity/tiny": ControlNetConfig(
        c_in=8, bottleneck_mode="simple", **{**_TINY, "proj_blocks": tuple(range(6))}
    ),
}


class CNetResBlock(nn.Module):
    """[LN2d (affine), GELU, Conv3×3] twice, with a residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
            LayerNorm2d(c),
            nn.GELU(),
            nn.Conv2d(c, c, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def _effnet_backbone(c_in: int, flavor: str) -> tuple[nn.Module, int]:
    """EfficientNet features; a non-RGB input swaps the stem conv (padding 0, as released)."""
    config = EFFNET_FLAVORS[flavor]
    backbone = EfficientNetEncoder(config).backbone
    if c_in != 3:
        stem = backbone[0][0]
        old = stem.weight.data
        new = nn.Conv2d(c_in, stem.out_channels, kernel_size=3, stride=2, bias=False)
        if c_in > 3:
            nn.init.constant_(new.weight, 0)
            new.weight.data[:, :3] = old[:, :3].clone()
        else:
            new.weight.data = old[:, :c_in].clone()
        backbone[0][0] = new
    return backbone, config.last_channel


def _large_backbone(c_in: int, widths: tuple[int, int, int], n_blocks: int) -> tuple[nn.Module, int]:
    expand, hidden, out = widths
    layers = [
        nn.Conv2d(c_in, expand, kernel_size=1),
        nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(expand, hidden, kernel_size=1),
        *[CNetResBlock(hidden) for _ in range(n_blocks)],
        nn.Conv2d(hidden, out, kernel_size=1),
    ]
    return nn.Sequential(*layers), out


class ControlNet(nn.Module):
    """``forward(control_input) -> list`` of length max(proj_blocks)+1 with signals at ``proj_blocks``."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.proj_blocks = list(config.proj_blocks)
        if config.bottleneck_mode == "effnet":
            self.backbone, embd = _effnet_backbone(config.c_in, config.effnet_flavor)
            self.backbone.eval()
        elif config.bottleneck_mode == "simple":
            embd = config.c_in
            self.backbone = nn.Sequential(
                nn.Conv2d(embd, embd * 4, kernel_size=3, padding=1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(embd * 4, embd, kernel_size=3, padding=1),
            )
        else:
            self.backbone, embd = _large_backbone(config.c_in, config.large_widths, config.large_blocks)
        self.projections = nn.ModuleList()
        for _ in self.proj_blocks:
            projection = nn.Sequential(
                nn.Conv2d(embd, embd, kernel_size=1, bias=False),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Conv2d(embd, config.c_proj, kernel_size=1, bias=False),
            )
            nn.init.constant_(projection[-1].weight, 0)
            self.projections.append(projection)

    def train(self, mode: bool = True) -> ControlNet:
        """Train the projections (and the large/simple backbone); an effnet backbone's BN stays in eval."""
        super().train(mode)
        if self.config.bottleneck_mode == "effnet":
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor | None]:
        features = self.backbone(x)
        outputs: list[torch.Tensor | None] = [None] * (max(self.proj_blocks) + 1)
        for projection, idx in zip(self.projections, self.proj_blocks, strict=True):
            outputs[idx] = projection(features)
        return outputs


class ControlledStageC(nn.Module):
    """A frozen Stage C steered by a ControlNet: ``forward(..., control=)`` injects ``controlnet(control)``
    (the official ControlNet trainer's generator call, with ``cnet=controlnet(cnet_input)``)."""

    def __init__(self, generator: nn.Module, controlnet: nn.Module) -> None:
        super().__init__()
        self.generator = generator.requires_grad_(False)
        self.controlnet = controlnet

    def forward(
        self, x: torch.Tensor, r: torch.Tensor, control: torch.Tensor, **conditions: torch.Tensor
    ) -> torch.Tensor:
        return self.generator(x, r, cnet=self.controlnet(control), **conditions)
