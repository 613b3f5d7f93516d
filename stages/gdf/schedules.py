"""Noise schedules: map diffusion time t ∈ [0, 1] to logSNR λ(t) = ln(α²/σ²).

Only the cosine schedule (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17) is used by Stable Cascade.
"""

from __future__ import annotations

import math

import torch

from stages.gdf._tensor import math_dtype, result_dtype

_HALF_PI = math.pi / 2
T_MIN = 0.001


def cosine_min_var(s: float) -> float:
    """ᾱ normaliser cos²(s/(1+s)·π/2), i.e. the unnormalised signal variance at t = 0."""
    return math.cos(s / (1 + s) * _HALF_PI) ** 2


def cosine_var(t: torch.Tensor, s: float) -> torch.Tensor:
    """Signal variance ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2) (Improved DDPM, eq. 17)."""
    return torch.cos((t + s) / (1 + s) * _HALF_PI) ** 2 / cosine_min_var(s)


def cosine_t_from_logsnr(logsnr: torch.Tensor, s: float) -> torch.Tensor:
    """Invert the cosine schedule: t = acos(√(σ(λ)·ᾱ_min)) / (π/2) · (1+s) − s, with σ the sigmoid."""
    var = torch.sigmoid(logsnr)
    return torch.acos(torch.sqrt(var * cosine_min_var(s))) / _HALF_PI * (1 + s) - s


def shift_logsnr(logsnr: torch.Tensor, shift: float) -> torch.Tensor:
    """Resolution shift: λ + 2·ln(1/shift) (shift > 1 means noisier; SD3 / Stable Cascade "shift")."""
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
    """Cosine schedule, logSNR(t) = logit(clamp(ᾱ(t), clamp_range)).

    With the defaults the logSNR limits are ±ln(0.9999/0.0001) ≈ ±9.2102.

    Args:
        s: Offset s of the cosine schedule (Improved DDPM, eq. 17).
        clamp_range: (min, max) of the signal variance ᾱ, both in (0, 1).
    """

    def __init__(self, s: float = 0.008, clamp_range: tuple[float, float] = (1e-4, 0.9999)) -> None:
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s!r}")
        lo, hi = (float(v) for v in clamp_range)
        if not 0 < lo < hi < 1:
            raise ValueError(f"clamp_range must satisfy 0 < min < max < 1, got {clamp_range!r}")
        self.s = float(s)
        self.clamp_range = (lo, hi)
        self.limits: tuple[float, float] | None = None
        ends = self(torch.tensor([1.0, 0.0], dtype=torch.float64))
        self.limits = (ends[0].item(), ends[1].item())

    def __repr__(self) -> str:
        return f"CosineSchedule(s={self.s}, clamp_range={self.clamp_range})"

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """Unshifted logSNR of times `t` (computed in `t`'s dtype)."""
        return torch.logit(cosine_var(t, self.s).clamp(*self.clamp_range))

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
            shift: Resolution shift; adds 2·ln(1/shift), then clamps to `limits`.
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
        logsnr = shift_logsnr(self.logsnr(t.to(math_dtype(t.device))), shift)
        if self.limits is not None:
            logsnr = logsnr.clamp(*self.limits)
        return logsnr.to(result_dtype(t))

    def t_from_logsnr(self, logsnr: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
        """Inverse of `__call__` inside the clamp range: undo the shift, then invert the cosine."""
        unshifted = shift_logsnr(logsnr.to(math_dtype(logsnr.device)), 1 / shift)
        return cosine_t_from_logsnr(unshifted, self.s).clamp(0.0, 1.0).to(result_dtype(logsnr))
