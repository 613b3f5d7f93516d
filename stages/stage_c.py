"""Stage C: the text-conditional prior that generates EfficientNet latents (spec §1.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.common import ControlNetDeliverer
from stages.unet import CascadeUNet, UNetLevels


@dataclass(frozen=True, kw_only=True)
class StageCConfig(UNetLevels):
    """Stage C hyper-parameters; the defaults are the released 3.6B model."""

    c_in: int = 16
    c_out: int = 16
    c_r: int = 64
    patch_size: int = 1
    c_cond: int = 2048
    c_hidden: tuple[int, ...] = (2048, 2048)
    nhead: tuple[int, ...] = (32, 32)
    blocks: tuple[tuple[int, ...], tuple[int, ...]] = ((8, 24), (24, 8))
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]] = ((1, 1), (1, 1))
    level_config: tuple[str, ...] = ("CTA", "CTA")
    c_clip_text: int = 1280
    c_clip_text_pooled: int = 1280
    c_clip_img: int = 768
    c_clip_seq: int = 4
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.1, 0.1)
    self_attn: bool = True
    t_conds: tuple[str, ...] = ("sca", "crp")
    switch_level: tuple[bool, ...] | None = (False,)


FLAVORS: dict[str, StageCConfig] = {
    "stage_c/3.6b": StageCConfig(),
    "stage_c/1b": StageCConfig(c_cond=1536, c_hidden=(1536, 1536), nhead=(24, 24), blocks=((4, 12), (12, 4))),
    "stage_c/tiny": StageCConfig(
        c_cond=64,
        c_hidden=(64, 64),
        nhead=(2, 2),
        blocks=((1, 2), (2, 1)),
        c_clip_text=32,
        c_clip_text_pooled=32,
        c_clip_img=32,
    ),
}


class StageC(CascadeUNet):
    """Stage C generator: ``forward(x, r, clip_text, clip_text_pooled, clip_img, cnet=None)``.

    Conditioning is 85 tokens: 77 text hidden states, 4 from the pooled text embedding and 4 from the
    CLIP image embedding. ``sca``/``crp`` default to zeros, as in training and inference.
    """

    def __init__(self, config: StageCConfig) -> None:
        super().__init__(config)
        self.config = config
        self.c_clip_seq = config.c_clip_seq
        self.clip_txt_mapper = nn.Linear(config.c_clip_text, config.c_cond)
        self.clip_txt_pooled_mapper = nn.Linear(config.c_clip_text_pooled, config.c_cond * config.c_clip_seq)
        self.clip_img_mapper = nn.Linear(config.c_clip_img, config.c_cond * config.c_clip_seq)
        self.clip_norm = nn.LayerNorm(config.c_cond, elementwise_affine=False, eps=1e-6)
        self._build_embedding_and_levels()
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        for mapper in (self.clip_txt_mapper, self.clip_txt_pooled_mapper, self.clip_img_mapper):
            nn.init.normal_(mapper.weight, std=0.02)

    def gen_c_embeddings(
        self, clip_text: torch.Tensor, clip_text_pooled: torch.Tensor, clip_img: torch.Tensor
    ) -> torch.Tensor:
        """Map (B,77,Ct), (B,1,Cp) and (B,1,Ci) to the normed (B,85,c_cond) token sequence."""
        if clip_text_pooled.dim() == 2:
            clip_text_pooled = clip_text_pooled.unsqueeze(1)
        if clip_img.dim() == 2:
            clip_img = clip_img.unsqueeze(1)
        b = clip_text.size(0)
        txt = self.clip_txt_mapper(clip_text)
        pooled = self.clip_txt_pooled_mapper(clip_text_pooled).view(
            b, clip_text_pooled.size(1) * self.c_clip_seq, -1
        )
        img = self.clip_img_mapper(clip_img).view(b, clip_img.size(1) * self.c_clip_seq, -1)
        return self.clip_norm(torch.cat([txt, pooled, img], dim=1))

    def forward(
        self,
        x: torch.Tensor,
        r: torch.Tensor,
        clip_text: torch.Tensor,
        clip_text_pooled: torch.Tensor,
        clip_img: torch.Tensor,
        cnet: list[torch.Tensor | None] | None = None,
        **kwargs: torch.Tensor,
    ) -> torch.Tensor:
        """Predict the diffusion target for latents ``x`` (B,16,h,w) at noise condition ``r`` (B,)."""
        r_embed = self.cond_embedding(r, kwargs)
        clip = self.gen_c_embeddings(clip_text, clip_text_pooled, clip_img)
        x = self.embedding(x)
        control = ControlNetDeliverer(cnet) if cnet is not None else None
        level_outputs = self._down_encode(x, r_embed, clip, control)
        x = self._up_decode(level_outputs, r_embed, clip, control)
        return self.clf(x)
