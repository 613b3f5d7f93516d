"""Building blocks shared by Stage B and Stage C (official module names and key layout).

Every block keeps the state-dict keys of the official release (see the spec, §1.1):
``depthwise``, ``channelwise.{0,2,4}``, ``attention.attn.*``, ``kv_mapper.1``, ``mapper[_<cond>]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def layer_norm_2d(c: int) -> LayerNorm2d:
    """The parameter-free 2-D LayerNorm used everywhere in Stage B/C (no keys, eps 1e-6)."""
    return LayerNorm2d(c, elementwise_affine=False, eps=1e-6)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 global response normalisation on NHWC tensors (Woo et al. 2023, eq. 1-3)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ResBlock(nn.Module):
    """Depthwise conv → LN → (skip concat) → channelwise MLP with GRN, plus the residual."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = layer_norm_2d(c)
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        x_res = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return x + x_res


class Attention2D(nn.Module):
    """Multi-head attention over the pixels of a feature map, optionally also attending to itself."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(c, nhead, dropout=dropout, bias=True, batch_first=True)

    def forward(self, x: torch.Tensor, kv: torch.Tensor, self_attn: bool = False) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).permute(0, 2, 1)
        if self_attn:
            kv = torch.cat([x, kv], dim=1)
        x = self.attn(x, kv, kv, need_weights=False)[0]
        return x.permute(0, 2, 1).reshape(b, c, h, w)


class AttnBlock(nn.Module):
    """Cross-attention to the conditioning tokens; with ``self_attn`` the image tokens are prepended to K/V."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.norm = layer_norm_2d(c)
        self.attention = Attention2D(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.kv_mapper(kv)
        return x + self.attention(self.norm(x), kv, self_attn=self.self_attn)


class FeedForwardBlock(nn.Module):
    """LN + channelwise MLP with GRN ('F' in a level config; unused by the released models)."""

    def __init__(self, c: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = layer_norm_2d(c)
        self.channelwise = nn.Sequential(
            nn.Linear(c, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.channelwise(self.norm(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """Adaptive affine modulation x·(1+a)+b from the noise-level embedding and extra conditions."""

    def __init__(self, c: int, c_timestep: int, conds: Sequence[str] = ("sca",)) -> None:
        super().__init__()
        self.mapper = nn.Linear(c_timestep, c * 2)
        self.conds = list(conds)
        for cname in self.conds:
            setattr(self, f"mapper_{cname}", nn.Linear(c_timestep, c * 2))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        chunks = t.chunk(len(self.conds) + 1, dim=1)
        a, b = self.mapper(chunks[0])[:, :, None, None].chunk(2, dim=1)
        for i, cname in enumerate(self.conds):
            ac, bc = getattr(self, f"mapper_{cname}")(chunks[i + 1])[:, :, None, None].chunk(2, dim=1)
            a, b = a + ac, b + bc
        return x * (1 + a) + b


class UpDownBlock2d(nn.Module):
    """Stage C's level switch: a 1×1 conv, with (``enabled``) or without bilinear resampling."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True) -> None:
        super().__init__()
        if mode not in ("up", "down"):
            raise ValueError(f"mode must be 'up' or 'down', got {mode!r}")
        resample: nn.Module = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([resample, mapping] if mode == "up" else [mapping, resample])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the noise condition r ∈ [0,1] (scaled by ``max_positions``), [sin | cos]."""
    r = r * max_positions
    half_dim = c_r // 2
    scale = math.log(max_positions) / (half_dim - 1)
    freqs = torch.arange(half_dim, device=r.device).float().mul(-scale).exp()
    emb = r[:, None].float() * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb.to(r.dtype)


def cond_embedding(r: torch.Tensor, c_r: int, t_conds: Sequence[str], extra: dict) -> torch.Tensor:
    """The noise-level embedding followed by one embedding per ``t_conds`` name (zeros when not given)."""
    parts = [r_embedding(r, c_r)]
    for name in t_conds:
        value = extra.get(name)
        parts.append(r_embedding(torch.zeros_like(r) if value is None else value, c_r))
    return torch.cat(parts, dim=1)


ControlHook = Callable[[], "torch.Tensor | None"]


class ControlNetDeliverer:
    """A cursor over ControlNet outputs: each call returns the next entry (None where nothing is injected).

    Stage C calls it once before every ResBlock, in execution order.
    """

    def __init__(self, controls: Sequence[torch.Tensor | None]) -> None:
        self.controls = list(controls)
        self.position = 0

    def __call__(self) -> torch.Tensor | None:
        if self.position >= len(self.controls):
            return None
        signal = self.controls[self.position]
        self.position += 1
        return signal


def run_level(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    r_embed: torch.Tensor,
    clip: torch.Tensor,
    skip: torch.Tensor | None = None,
    control: ControlHook | None = None,
) -> torch.Tensor:
    """Run one level's modules once; the skip feeds the first ResBlock, control is added before each ResBlock."""
    for k, block in enumerate(blocks):
        if isinstance(block, ResBlock):
            block_skip = skip if k == 0 else None
            if block_skip is not None and x.shape[-2:] != block_skip.shape[-2:]:
                x = F.interpolate(x.float(), block_skip.shape[-2:], mode="bilinear", align_corners=True).to(
                    x.dtype
                )
            if control is not None:
                signal = control()
                if signal is not None:
                    x = x + F.interpolate(signal, size=x.shape[-2:], mode="bilinear", align_corners=True)
            x = block(x, block_skip)
        elif isinstance(block, AttnBlock):
            x = block(x, clip)
        elif isinstance(block, TimestepBlock):
            x = block(x, r_embed)
        else:
            x = block(x)
    return x


def build_block(
    block_type: str,
    c_hidden: int,
    nhead: int,
    *,
    c_cond: int,
    c_r: int,
    t_conds: Sequence[str],
    kernel_size: int,
    c_skip: int = 0,
    dropout: float = 0.0,
    self_attn: bool = True,
) -> nn.Module:
    """One module from a level-config letter: C=ResBlock, T=TimestepBlock, A=AttnBlock, F=FeedForward."""
    if block_type == "C":
        return ResBlock(c_hidden, c_skip, kernel_size=kernel_size, dropout=dropout)
    if block_type == "A":
        return AttnBlock(c_hidden, c_cond, nhead, self_attn=self_attn, dropout=dropout)
    if block_type == "F":
        return FeedForwardBlock(c_hidden, dropout=dropout)
    if block_type == "T":
        return TimestepBlock(c_hidden, c_r, conds=t_conds)
    raise ValueError(f"unknown block type {block_type!r}; allowed: C, T, A, F")
