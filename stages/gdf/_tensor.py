"""Small tensor helpers shared by the GDF modules (dtype policy, broadcasting)."""

from __future__ import annotations

import torch

#: Precisions a schedule / noise cond can compute in. float32 is what the official GDF uses (torch's default
#: dtype); float64 is kept as an option for analysis.
PRECISIONS = (torch.float32, torch.float64)


def check_precision(precision: torch.dtype) -> torch.dtype:
    """Validate a schedule `precision` argument (float32 or float64)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be torch.float32 or torch.float64, got {precision!r}")
    return precision


def math_dtype(
    device: torch.device, precision: torch.dtype = torch.float32, like: torch.dtype | None = None
) -> torch.dtype:
    """Dtype for schedule maths: `precision`, promoted to `like` if that is a wider floating dtype.

    The promotion mirrors the official code, whose float32 constants are promoted when it is given a float64
    input. MPS has no float64, so there the result is float32.
    """
    dtype = precision
    if like is not None and like.is_floating_point:
        dtype = torch.promote_types(dtype, like)
    return torch.float32 if device.type == "mps" and dtype == torch.float64 else dtype


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
