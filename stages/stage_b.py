"""Stage B: the diffusion decoder from EfficientNet latents to Stage A latents (spec §1.3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.common import layer_norm_2d
from stages.unet import CascadeUNet, UNetLevels


@dataclass(frozen=True, kw_only=True)
class StageBConfig(UNetLevels):
    """Stage B hyper-parameters; the defaults are the released 1.5B model (``model_version: 3B``)."""

    c_in: int = 4
    c_out: int = 4
    c_r: int = 64
    patch_size: int = 2
    c_cond: int = 1280
    c_hidden: tuple[int, ...] = (320, 640, 1280, 1280)
    nhead: tuple[int, ...] = (-1, -1, 20, 20)
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((2, 6, 28, 6), (6, 28, 6, 2))
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1, 1, 1), (3, 3, 2, 2))
    level_config: tuple[str, ...] = ("CT", "CT", "CTA", "CTA")
    c_clip: int = 1280
    c_clip_seq: int = 4
    c_effnet: int = 16
    c_pixels: int = 3
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.0, 0.0, 0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca",)
    switch_level: tuple[bool, ...] | None = None


FLAVORS: dict[str, StageBConfig] = {
    "stage_b/1.5b": StageBConfig(),
    "stage_b/700m": StageBConfig(
        c_hidden=(320, 576, 1152, 1152),
        nhead=(-1, 9, 18, 18),
        blocks=((2, 4, 14, 4), (4, 14, 4, 2)),
        block_repeat=((1, 1, 1, 1), (2, 2, 2, 2)),
    ),
    "stage_b/tiny": StageBConfig(
        c_cond=64,
        c_hidden=(16, 32, 64, 64),
        nhead=(-1, -1, 2, 2),
        blocks=((1, 1, 1, 1), (1, 1, 1, 1)),
        block_repeat=((1, 1, 1, 1), (2, 2, 1, 1)),
        c_clip=32,
    ),
}


def _cond_mapper(c_in: int, c_hidden: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_hidden * 4, kernel_size=1),
        nn.GELU(),
        nn.Conv2d(c_hidden * 4, c_hidden, kernel_size=1),
        layer_norm_2d(c_hidden),
    )


class StageB(CascadeUNet):
    """Stage B generator: ``forward(x, r, effnet, clip, pixels=None)``.

    ``clip`` is the pooled CLIP-bigG text embedding (B,1,1280), mapped to 4 tokens; ``effnet`` is the
    Stage C latent, bilinearly resized to the embedded size and added to the input.
    """

    def __init__(self, config: StageBConfig) -> None:
        super().__init__(config)
        self.config = config
        self.c_clip_seq = config.c_clip_seq
        self.effnet_mapper = _cond_mapper(config.c_effnet, config.c_hidden[0])
        self.pixels_mapper = _cond_mapper(config.c_pixels, config.c_hidden[0])
        self.clip_mapper = nn.Linear(config.c_clip, config.c_cond * config.c_clip_seq)
        self.clip_norm = nn.LayerNorm(config.c_cond, elementwise_affine=False, eps=1e-6)
        self._build_embedding_and_levels()
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        nn.init.normal_(self.clip_mapper.weight, std=0.02)
        nn.init.normal_(self.effnet_mapper[0].weight, std=0.02)
        nn.init.normal_(self.effnet_mapper[2].weight, std=0.02)
        nn.init.normal_(self.pixels_mapper[0].weight, std=0.02)
        nn.init.normal_(self.pixels_mapper[2].weight, std=0.02)

    def gen_c_embeddings(self, clip: torch.Tensor) -> torch.Tensor:
        """Map the pooled text embedding (B,S,1280) to (B,S·4,c_cond) normed tokens."""
        if clip.dim() == 2:
            clip = clip.unsqueeze(1)
        tokens = self.clip_mapper(clip).view(clip.size(0), clip.size(1) * self.c_clip_seq, -1)
        return self.clip_norm(tokens)

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        effnet: torch.Tensor,
        clip: torch.Tensor,
        pixels: torch.Tensor | None = None,
        **kwargs: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the diffusion target for Stage A latents ``x`` (B,4,H/4,W/4) at noise condition ``r``."""
        if pixels is None:
            pixels = x.new_zeros(x.size(0), 3, 8, 8)
        r_embed = self.cond_embedding(r, kwargs)
        clip = self.gen_c_embeddings(clip)
        x = self.embedding(x)
        size = x.shape[-2:]
        x = x + self.effnet_mapper(F.interpolate(effnet, size=size, mode="bilinear", align_corners=True))
        x = x + F.interpolate(self.pixels_mapper(pixels), size=size, mode="bilinear", align_corners=True)
        level_outputs = self._down_encode(x, r_embed, clip)
        x = self._up_decode(level_outputs, r_embed, clip)
        return self.clf(x)
