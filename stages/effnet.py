"""EfficientNetEncoder: the image encoder that defines Stable Cascade's Stage C latent space.

Checkpoint-compatible with the official ``effnet_encoder.safetensors``: ``backbone`` is torchvision's
EfficientNetV2-S ``features`` (built here without weights) and ``mapper`` projects 1280 → 16 channels followed
by a parameter-free BatchNorm that standardises the latents. Output stride is 32: a 768² image gives 16×24×24.
See ``reference/stable-cascade.md`` §1.5.

Two entry points, so the ImageNet normalisation cannot be forgotten or applied twice:

- :meth:`EfficientNetEncoder.encode` takes images in [0, 1] and normalises them itself (use this);
- :meth:`EfficientNetEncoder.forward` is the official module's forward and expects already-normalised input.

The encoder is frozen by design: it always stays in eval mode, because BN running statistics are part of the
latent definition (``train()`` is a no-op that keeps eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn
from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig, MBConvConfig

__all__ = [
    "FLAVORS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EfficientNetEncoder",
    "EffnetConfig",
    "EffnetStage",
    "imagenet_normalize",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_STEM_STRIDE = 2
_OUTPUT_STRIDE = 32


def imagenet_normalize(images_bchw: torch.Tensor) -> torch.Tensor:
    """Map RGB images in [0, 1] (NCHW) to ImageNet-normalised input: ``(x - mean) / std`` per channel."""
    if images_bchw.ndim != 4 or images_bchw.shape[1] != 3:
        raise ValueError(f"imagenet_normalize expects B×3×H×W images, got shape {tuple(images_bchw.shape)}")
    kw = {"device": images_bchw.device, "dtype": images_bchw.dtype}
    mean = torch.tensor(IMAGENET_MEAN, **kw).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, **kw).view(1, 3, 1, 1)
    return (images_bchw - mean) / std


@dataclass(frozen=True, kw_only=True)
class EffnetStage:
    """One EfficientNet stage: ``layers`` (Fused)MBConv blocks, the first with ``stride`` and ``c_in``."""

    kind: Literal["fused", "mb"]
    expand_ratio: int
    kernel: int
    stride: int
    c_in: int
    c_out: int
    layers: int

    def __post_init__(self) -> None:
        if self.kind not in ("fused", "mb"):
            raise ValueError(f"EffnetStage.kind={self.kind!r}: must be 'fused' or 'mb'")
        for name in ("expand_ratio", "kernel", "c_in", "c_out", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"EffnetStage.{name}={getattr(self, name)!r}: must be >= 1")
        if self.stride not in (1, 2):
            raise ValueError(f"EffnetStage.stride={self.stride!r}: must be 1 or 2")

    def torchvision_config(self) -> FusedMBConvConfig | MBConvConfig:
        """The equivalent torchvision block config."""
        cls = FusedMBConvConfig if self.kind == "fused" else MBConvConfig
        args = (self.expand_ratio, self.kernel, self.stride, self.c_in, self.c_out, self.layers)
        return cls(*args)


@dataclass(frozen=True, kw_only=True)
class EffnetConfig:
    """Architecture of the EfficientNet encoder.

    Attributes:
        stages: Backbone stages after the stride-2 stem; their strides must multiply to 16 (total stride 32).
        last_channel: Channels of the backbone's final 1×1 conv (released: 1280).
        c_latent: Latent channels produced by the mapper (released: 16).
        bn_eps: BatchNorm eps inside the backbone (torchvision's V2 models use 1e-3).
    """

    stages: tuple[EffnetStage, ...]
    last_channel: int
    c_latent: int
    bn_eps: float

    def __post_init__(self) -> None:
        if not self.stages or not all(isinstance(s, EffnetStage) for s in self.stages):
            raise ValueError(f"EffnetConfig.stages={self.stages!r}: must be a non-empty tuple of EffnetStage")
        for prev, cur in zip(self.stages, self.stages[1:], strict=False):
            if cur.c_in != prev.c_out:
                raise ValueError(f"EffnetConfig.stages: c_in={cur.c_in} does not follow c_out={prev.c_out}")
        stride = _STEM_STRIDE
        for s in self.stages:
            stride *= s.stride
        if stride != _OUTPUT_STRIDE:
            raise ValueError(f"EffnetConfig.stages: total stride is {stride}, must be {_OUTPUT_STRIDE}")
        for name in ("last_channel", "c_latent"):
            if getattr(self, name) < 1:
                raise ValueError(f"EffnetConfig.{name}={getattr(self, name)!r}: must be >= 1")
        if not 0 < self.bn_eps < 1:
            raise ValueError(f"EffnetConfig.bn_eps={self.bn_eps!r}: must be in (0, 1)")


def _stage(kind: Literal["fused", "mb"], *args: int) -> EffnetStage:
    e, k, s, ci, co, n = args
    return EffnetStage(kind=kind, expand_ratio=e, kernel=k, stride=s, c_in=ci, c_out=co, layers=n)


FLAVORS: dict[str, EffnetConfig] = {
    # torchvision's EfficientNetV2-S.
    "effnet": EffnetConfig(
        stages=(
            _stage("fused", 1, 3, 1, 24, 24, 2),
            _stage("fused", 4, 3, 2, 24, 48, 4),
            _stage("fused", 4, 3, 2, 48, 64, 4),
            _stage("mb", 4, 3, 2, 64, 128, 6),
            _stage("mb", 6, 3, 1, 128, 160, 9),
            _stage("mb", 6, 3, 2, 160, 256, 15),
        ),
        last_channel=1280,
        c_latent=16,
        bn_eps=1e-3,
    ),
    # Same stage layout (backbone.0..7, stride 32), one narrow block per stage.
    "effnet/tiny": EffnetConfig(
        stages=(
            _stage("fused", 1, 3, 1, 8, 8, 1),
            _stage("fused", 4, 3, 2, 8, 16, 1),
            _stage("fused", 4, 3, 2, 16, 24, 1),
            _stage("mb", 4, 3, 2, 24, 32, 1),
            _stage("mb", 4, 3, 1, 32, 40, 1),
            _stage("mb", 4, 3, 2, 40, 48, 1),
        ),
        last_channel=128,
        c_latent=16,
        bn_eps=1e-3,
    ),
}


class EfficientNetEncoder(nn.Module):
    """EfficientNet backbone + 1×1 mapper to ``c_latent`` channels with a parameter-free BatchNorm."""

    def __init__(self, config: EffnetConfig) -> None:
        super().__init__()
        self.config = config
        net = EfficientNet(
            [s.torchvision_config() for s in config.stages],
            dropout=0.0,
            num_classes=1,  # the classifier is discarded; keep it tiny
            norm_layer=partial(nn.BatchNorm2d, eps=config.bn_eps),
            last_channel=config.last_channel,
        )
        self.backbone = net.features
        self.mapper = nn.Sequential(
            nn.Conv2d(config.last_channel, config.c_latent, kernel_size=1, bias=False),
            nn.BatchNorm2d(config.c_latent, affine=False),
        )
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetEncoder:
        """Keep eval mode whatever ``mode`` is: the encoder is frozen and its BN statistics define the latents."""
        return super().train(False)

    def forward(self, normalized_bchw: torch.Tensor) -> torch.Tensor:
        """Official forward: ImageNet-normalised ``B×3×H×W`` → latents ``B×c_latent×H/32×W/32``."""
        return self.mapper(self.backbone(normalized_bchw))

    def encode(self, images_bchw: torch.Tensor) -> torch.Tensor:
        """Encode RGB images in [0, 1] (``B×3×H×W``) to Stage C latents ``B×c_latent×H/32×W/32``."""
        return self(imagenet_normalize(images_bchw))
