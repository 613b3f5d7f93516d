"""Exponential moving average of a model's weights, as the official ``update_weights_ema`` (spec §1, §3).

Parameters **and buffers** are blended: ``ema ← β·ema + (1 − β)·src``; ``β = 0`` is a hard copy (the official
trainer copies until ``ema_start_iters``). Integer buffers (counters) are copied.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_weights_ema(ema: nn.Module, src: nn.Module, beta: float = 0.999) -> None:
    """Blend ``src``'s parameters and buffers into ``ema`` (same architecture) in place."""
    if not 0 <= beta <= 1:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    pairs = [
        *zip(ema.parameters(), src.parameters(), strict=True),
        *zip(ema.buffers(), src.buffers(), strict=True),
    ]
    for e, s in pairs:
        s = s.detach().to(e.device)
        if e.is_floating_point():
            e.copy_(e * beta + s.to(e.dtype) * (1 - beta))  # the official formula, not lerp (bitwise)
        else:
            e.copy_(s)
