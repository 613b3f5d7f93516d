"""Small tensor helpers shared by the GDF modules (dtype policy, broadcasting)."""

from __future__ import annotations

import torch


def math_dtype(device: torch.device) -> torch.dtype:
    """Dtype for schedule maths: float64 where the device supports it (MPS has no float64)."""
    return torch.float32 if device.type == "mps" else torch.float64


def result_dtype(x: torch.Tensor) -> torch.dtype:
    """Dtype a schedule-like result is returned in: the input's if floating point, else float32."""
    return x.dtype if x.is_floating_point() else torch.float32


def work_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32, so that half-precision latents are undiffused without large rounding errors."""
    return torch.promote_types(x.dtype, torch.float32)


def expand_as_batch(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample `[B]` (or scalar) tensor to broadcast against `like` (`[B, ...]`).

    Args:
        v: Per-sample values of shape `[B]` or `[]`.
        like: Tensor whose rank, device and dtype the result takes.

    Returns:
        `v` viewed as `[B, 1, ..., 1]` (or `[1, ..., 1]`) on `like`'s device and dtype.
    """
    if v.ndim > 1:
        raise ValueError(f"per-sample values must have shape [B] or [], got {tuple(v.shape)}")
    shape = tuple(v.shape) + (1,) * (like.ndim - v.ndim)
    return v.reshape(shape).to(device=like.device, dtype=like.dtype)
