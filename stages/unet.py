"""The level structure that Stage B and Stage C share: down path, up path, skips and repeat mappers.

Keys follow the official layout: ``down_blocks.<level>.<idx>``, ``down_downscalers.<level>``,
``down_repeat_mappers``, ``up_blocks.<k>.<idx>`` (k=0 is the deepest level), ``up_upscalers``,
``up_repeat_mappers``, ``embedding`` and ``clf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from stages.common import (
    ControlHook,
    ResBlock,
    TimestepBlock,
    UpDownBlock2d,
    build_block,
    cond_embedding,
    layer_norm_2d,
    run_level,
)


@dataclass(frozen=True, kw_only=True)
class UNetLevels:
    """Shape of the level stack; shared fields of ``StageCConfig`` and ``StageBConfig``."""

    c_in: int
    c_out: int
    c_r: int
    patch_size: int
    c_cond: int
    c_hidden: tuple[int, ...]
    nhead: tuple[int, ...]
    blocks: tuple[tuple[int, ...], tuple[int, ...]]
    block_repeat: tuple[tuple[int, ...], tuple[int, ...]]
    level_config: tuple[str, ...]
    kernel_size: int
    dropout: tuple[float, ...]
    self_attn: bool
    t_conds: tuple[str, ...]
    switch_level: tuple[bool, ...] | None

    def __post_init__(self) -> None:
        n = len(self.c_hidden)
        for name in ("nhead", "level_config", "dropout"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; c_hidden has {n} levels")
        for name in ("blocks", "block_repeat"):
            value = getattr(self, name)
            if len(value) != 2 or any(len(v) != n for v in value):
                raise ValueError(f"{name}={value!r} must be two tuples of {n} entries (down, up)")
        for i, (c, h, cfg) in enumerate(zip(self.c_hidden, self.nhead, self.level_config, strict=True)):
            if "A" in cfg and (h <= 0 or c % h):
                raise ValueError(f"nhead[{i}]={h} must divide c_hidden[{i}]={c} on an attention level")
            if set(cfg) - set("CTAF"):
                raise ValueError(f"level_config[{i}]={cfg!r} may only use the letters C, T, A, F")
        if self.switch_level is not None and len(self.switch_level) != n - 1:
            raise ValueError(f"switch_level needs {n - 1} entries, got {self.switch_level!r}")


class CascadeUNet(nn.Module):
    """Base class: builds the levels from ``UNetLevels`` and runs the down and up paths."""

    def __init__(self, cfg: UNetLevels) -> None:
        super().__init__()
        self.c_r = cfg.c_r
        self.t_conds = list(cfg.t_conds)
        self._cfg = cfg

    def cond_embedding(self, r: torch.Tensor, extra: dict) -> torch.Tensor:
        """Noise-level embedding plus one per ``t_conds`` entry (``sca``, ``crp``), zeros unless given."""
        return cond_embedding(r, self.c_r, self.t_conds, extra)

    def _block(self, level: int, block_type: str, c_skip: int = 0) -> nn.Module:
        cfg = self._cfg
        return build_block(
            block_type,
            cfg.c_hidden[level],
            cfg.nhead[level],
            c_cond=cfg.c_cond,
            c_r=cfg.c_r,
            t_conds=cfg.t_conds,
            kernel_size=cfg.kernel_size,
            c_skip=c_skip,
            dropout=cfg.dropout[level],
            self_attn=cfg.self_attn,
        )

    def _resampler(self, c_in: int, c_out: int, mode: str, level: int) -> nn.Module:
        if self._cfg.switch_level is not None:
            return UpDownBlock2d(c_in, c_out, mode=mode, enabled=self._cfg.switch_level[level - 1])
        if mode == "down":
            return nn.Conv2d(c_in, c_out, kernel_size=2, stride=2)
        return nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)

    def _build_embedding_and_levels(self) -> None:
        """Create ``embedding``, the down and up stacks and ``clf`` in the official registration order."""
        cfg = self._cfg
        c, p = cfg.c_hidden, cfg.patch_size
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(p), nn.Conv2d(cfg.c_in * p**2, c[0], kernel_size=1), layer_norm_2d(c[0])
        )
        self.down_blocks, self.down_downscalers, self.down_repeat_mappers = (
            nn.ModuleList() for _ in range(3)
        )
        for i in range(len(c)):
            self.down_downscalers.append(
                nn.Sequential(layer_norm_2d(c[i - 1]), self._resampler(c[i - 1], c[i], "down", i))
                if i > 0
                else nn.Identity()
            )
            level = [self._block(i, t) for _ in range(cfg.blocks[0][i]) for t in cfg.level_config[i]]
            self.down_blocks.append(nn.ModuleList(level))
            self.down_repeat_mappers.append(self._repeat_mappers(c[i], cfg.block_repeat[0][i]))
        self.up_blocks, self.up_upscalers, self.up_repeat_mappers = (nn.ModuleList() for _ in range(3))
        for i in reversed(range(len(c))):
            self.up_upscalers.append(
                nn.Sequential(layer_norm_2d(c[i]), self._resampler(c[i], c[i - 1], "up", i))
                if i > 0
                else nn.Identity()
            )
            level = []
            for j in range(cfg.blocks[1][::-1][i]):
                for k, t in enumerate(cfg.level_config[i]):
                    c_skip = c[i] if i < len(c) - 1 and j == k == 0 else 0
                    level.append(self._block(i, t, c_skip=c_skip))
            self.up_blocks.append(nn.ModuleList(level))
            self.up_repeat_mappers.append(self._repeat_mappers(c[i], cfg.block_repeat[1][::-1][i]))
        self.clf = nn.Sequential(
            layer_norm_2d(c[0]), nn.Conv2d(c[0], cfg.c_out * p**2, kernel_size=1), nn.PixelShuffle(p)
        )

    @staticmethod
    def _repeat_mappers(c: int, repeat: int) -> nn.ModuleList:
        return nn.ModuleList([nn.Conv2d(c, c, kernel_size=1) for _ in range(repeat - 1)])

    def _down_encode(
        self, x: torch.Tensor, r_embed: torch.Tensor, clip: torch.Tensor, control: ControlHook | None = None
    ) -> list[torch.Tensor]:
        level_outputs: list[torch.Tensor] = []
        for blocks, downscaler, repmap in zip(
            self.down_blocks, self.down_downscalers, self.down_repeat_mappers, strict=True
        ):
            x = downscaler(x)
            for i in range(len(repmap) + 1):
                x = run_level(blocks, x, r_embed, clip, control=control)
                if i < len(repmap):
                    x = repmap[i](x)
            level_outputs.insert(0, x)
        return level_outputs

    def _up_decode(
        self,
        level_outputs: Sequence[torch.Tensor],
        r_embed: torch.Tensor,
        clip: torch.Tensor,
        control: ControlHook | None = None,
    ) -> torch.Tensor:
        x = level_outputs[0]
        for i, (blocks, upscaler, repmap) in enumerate(
            zip(self.up_blocks, self.up_upscalers, self.up_repeat_mappers, strict=True)
        ):
            skip = level_outputs[i] if i > 0 else None
            for j in range(len(repmap) + 1):
                x = run_level(blocks, x, r_embed, clip, skip=skip, control=control)
                if j < len(repmap):
                    x = repmap[j](x)
            x = upscaler(x)
        return x

    def init_weights(self) -> None:
        """Official from-scratch initialisation of the shared parts (subclasses add their mappers)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
        nn.init.xavier_uniform_(self.embedding[1].weight, 0.02)
        nn.init.constant_(self.clf[1].weight, 0)
        scale = math.sqrt(1 / sum(self._cfg.blocks[0]))
        for level in (*self.down_blocks, *self.up_blocks):
            for block in level:
                if isinstance(block, ResBlock):
                    block.channelwise[-1].weight.data *= scale
                elif isinstance(block, TimestepBlock):
                    for layer in block.modules():
                        if isinstance(layer, nn.Linear):
                            nn.init.constant_(layer.weight, 0)

    def count_resblocks(self) -> int:
        """ResBlocks in execution order (down then up, counting repeats): the ControlNet block indices."""
        total = 0
        for stack, repmaps in (
            (self.down_blocks, self.down_repeat_mappers),
            (self.up_blocks, self.up_repeat_mappers),
        ):
            for blocks, repmap in zip(stack, repmaps, strict=True):
                total += sum(isinstance(b, ResBlock) for b in blocks) * (len(repmap) + 1)
        return total
