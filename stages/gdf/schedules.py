"""Noise schedules: map diffusion time t ∈ [0, 1] to logSNR λ(t) = ln(α²/σ²).

Only the cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17) is used by Stable Cascade.

Precision: by default the maths runs in float32 in the same operation order as the official GDF (torch's default
dtype), so logSNRs, limits and noise conds are bit-identical to it on CPU. `precision=torch.float64` computes
everything (constants included) in float64; the two differ in logSNR by up to ~1e-3 very close to t = 0 (at
t ≈ 0.002, where float32 loses digits in 1 − ᾱ), by < 2e-4 for t >= 0.01 and by < 5e-5 for t >= 0.05. The float32
upper limit is 9.210074 (float64: 9.210240).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from stages.gdf._tensor import check_precision, math_dtype, result_dtype

T_MIN = 0.001


class CosineConstants(NamedTuple):
    """Constants of the cosine schedule, as 0-d tensors computed in one precision (see `cosine_constants`)."""

    s: torch.Tensor
    one_plus_s: torch.Tensor
    min_var: torch.Tensor


@functools.lru_cache(maxsize=16)
def _constants(s: float, precision: torch.dtype) -> CosineConstants:
    """`CosineConstants` as CPU tensors of `precision`; callers must not modify them."""
    s_t = torch.tensor(s, dtype=precision)
    one_plus_s = 1 + s_t
    return CosineConstants(s_t, one_plus_s, torch.cos(s_t / one_plus_s * math.pi * 0.5) ** 2)


def cosine_constants(
    s: float, precision: torch.dtype = torch.float32, like: torch.Tensor | None = None
) -> CosineConstants:
    """s, 1 + s and the ᾱ normaliser ᾱ_min = cos²(s/(1+s)·π/2), as 0-d tensors.

    All three are computed in `precision` (s is rounded to it first: the official code holds s, and so 1 + s
    and ᾱ_min, as float32 tensors), then cast to `like`'s device and dtype if given (a widening cast in every
    use here, so the values are unchanged).
    """
    consts = _constants(float(s), check_precision(precision))
    if like is None:
        return consts
    return CosineConstants(*(c.to(device=like.device, dtype=like.dtype) for c in consts))


def cosine_min_var(s: float, precision: torch.dtype = torch.float32) -> float:
    """ᾱ normaliser cos²(s/(1+s)·π/2) (the unnormalised signal variance at t = 0), computed in `precision`."""
    return cosine_constants(s, precision).min_var.item()


def cosine_var(t: torch.Tensor, s: float, precision: torch.dtype = torch.float32) -> torch.Tensor:
    """Signal variance ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2) (Improved DDPM, eq. 17).

    Computed in `precision` (or `t`'s dtype if wider, see `math_dtype`) in the official operation order, with
    the constants of `precision`; the cosine is clamped to [0, 1] before squaring, as in the official code.
    """
    t = t.to(math_dtype(t.device, precision, like=t.dtype))
    c = cosine_constants(s, precision, like=t)
    return torch.cos((c.s + t) / c.one_plus_s * math.pi * 0.5).clamp(0.0, 1.0) ** 2 / c.min_var


def cosine_t_from_logsnr(
    logsnr: torch.Tensor,
    s: float,
    precision: torch.dtype = torch.float32,
    var_range: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Invert the cosine schedule: t = acos(√(σ(λ)·ᾱ_min)) / (π/2) · (1+s) − s, with σ the sigmoid.

    Computed in `precision` (or `logsnr`'s dtype if wider) in the official operation order. `var_range`
    optionally clamps σ(λ) first (as `CosineTNoiseCond` does). The result is not clamped.
    """
    logsnr = logsnr.to(math_dtype(logsnr.device, precision, like=logsnr.dtype))
    c = cosine_constants(s, precision, like=logsnr)
    var = torch.sigmoid(logsnr)
    if var_range is not None:
        var = var.clamp(*var_range)
    return ((var * c.min_var) ** 0.5).acos() / (math.pi * 0.5) * c.one_plus_s - c.s


def shift_logsnr(logsnr: torch.Tensor, shift: float) -> torch.Tensor:
    """Schedule (resolution) shift: λ + 2·ln(1/shift) (shift > 1 means noisier; SD3 / Stable Cascade "shift").

    This is the *schedule's* shift (`CosineSchedule.__call__`, `GDF.diffuse(shift=...)`, sampling). The loss
    weight's `loss_shift` has the opposite sign, λ + 2·ln(shift) (see `loss_weights.LossWeight`).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    return logsnr if shift == 1 else logsnr + 2 * math.log(1 / shift)


def sample_t(
    batch_size: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Training times t = clamp(1 − U(0, 1) + 0.001, 0.001, 1), shape `[batch_size]`, float32."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    u = torch.rand(batch_size, generator=generator, device=device)
    return (1 - u + T_MIN).clamp(T_MIN, 1.0)


class CosineSchedule:
    """Cosine schedule, logSNR(t) = ln(ᾱ/(1−ᾱ)) with ᾱ(t) clamped to `clamp_range`.

    With the defaults the logSNR limits are ±ln(0.9999/0.0001) ≈ ±9.2102.

    Args:
        s: Offset s of the cosine schedule (Improved DDPM, eq. 17).
        clamp_range: (min, max) of the signal variance ᾱ, both in (0, 1).
        precision: Dtype of the constants and the maths: float32 (default, bit-identical to the official GDF)
            or float64. A wider input `t` (float64) promotes the maths to its dtype, as in the official code.
    """

    def __init__(
        self,
        s: float = 0.008,
        clamp_range: tuple[float, float] = (1e-4, 0.9999),
        *,
        precision: torch.dtype = torch.float32,
    ) -> None:
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s!r}")
        lo, hi = (float(v) for v in clamp_range)
        if not 0 < lo < hi < 1:
            raise ValueError(f"clamp_range must satisfy 0 < min < max < 1, got {clamp_range!r}")
        self.s = float(s)
        self.clamp_range = (lo, hi)
        self.precision = check_precision(precision)
        self.limits: tuple[float, float] | None = None
        ends = self(torch.tensor([1.0, 0.0], dtype=self.precision))
        self.limits = (ends[0].item(), ends[1].item())

    def __repr__(self) -> str:
        extra = "" if self.precision == torch.float32 else f", precision={self.precision}"
        return f"CosineSchedule(s={self.s}, clamp_range={self.clamp_range}{extra})"

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """Unshifted, unlimited logSNR of times `t`, computed in `t`'s dtype (with this schedule's constants)."""
        var = cosine_var(t, self.s, self.precision).clamp(*self.clamp_range)
        return (var / (1 - var)).log()

    def __call__(
        self,
        t_or_batch_size: torch.Tensor | float | int,
        shift: float = 1.0,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """logSNR of the given times, or of a freshly sampled training batch.

        Args:
            t_or_batch_size: Times in [0, 1] (clamped), or an int batch size to sample (see `sample_t`).
            shift: Schedule shift; adds 2·ln(1/shift), then clamps to `limits`.
            generator: RNG for sampling a batch.
            device: Device for a sampled batch (or to move `t` to).

        Returns:
            logSNR, same shape as `t` (or `[batch_size]`); dtype of `t` if floating point, else float32.
        """
        if isinstance(t_or_batch_size, bool):
            raise TypeError("t_or_batch_size must be a tensor, a float or an int batch size, not bool")
        if isinstance(t_or_batch_size, int):
            t = sample_t(t_or_batch_size, generator=generator, device=device)
        else:
            t = torch.as_tensor(t_or_batch_size, device=device).clamp(0.0, 1.0)
        dtype = math_dtype(t.device, self.precision, like=t.dtype)
        logsnr = shift_logsnr(self.logsnr(t.to(dtype)), shift)
        if self.limits is not None:
            logsnr = logsnr.clamp(*self.limits)
        return logsnr.to(result_dtype(t))

    def t_from_logsnr(self, logsnr: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
        """Inverse of `__call__` inside the clamp range: undo the shift, then invert the cosine."""
        dtype = math_dtype(logsnr.device, self.precision, like=logsnr.dtype)
        unshifted = shift_logsnr(logsnr.to(dtype), 1 / shift)
        return (
            cosine_t_from_logsnr(unshifted, self.s, self.precision).clamp(0.0, 1.0).to(result_dtype(logsnr))
        )
