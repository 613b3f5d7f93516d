"""Noise conditioning: what the denoiser receives as its "time" input."""

from __future__ import annotations

import torch

from stages.gdf._tensor import check_precision, result_dtype
from stages.gdf.schedules import cosine_t_from_logsnr, cosine_var


class CosineTNoiseCond:
    """r = the cosine-schedule time of a logSNR (Improved DDPM eq. 17 inverted).

    r = acos(√(σ(λ)·ᾱ_min)) / (π/2) · (1+s) − s, with ᾱ_min = cos²(s/(1+s)·π/2) and σ(λ) clamped to
    `clamp_range`; r is clamped to `clamp_range` too (the official code uses the one range for both; with the
    default [0, 1] the first clamp is a no-op). With a shifted schedule the model receives the r of the
    *shifted* logSNR, not the nominal t.

    Args:
        s: Cosine offset (must match the schedule's for r to equal t).
        clamp_range: (min, max) of σ(λ) and of r.
        precision: Dtype of the constants and the maths: float32 (default, bit-identical to the official GDF)
            or float64. A float64 logSNR promotes the maths to float64.
    """

    def __init__(
        self,
        s: float = 0.008,
        clamp_range: tuple[float, float] = (0.0, 1.0),
        *,
        precision: torch.dtype = torch.float32,
    ) -> None:
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s!r}")
        lo, hi = (float(v) for v in clamp_range)
        if lo > hi:
            raise ValueError(f"clamp_range must satisfy min <= max, got {clamp_range!r}")
        self.s = float(s)
        self.clamp_range = (lo, hi)
        self.precision = check_precision(precision)

    def __repr__(self) -> str:
        extra = "" if self.precision == torch.float32 else f", precision={self.precision}"
        return f"CosineTNoiseCond(s={self.s}, clamp_range={self.clamp_range}{extra})"

    def __call__(self, logsnr: torch.Tensor) -> torch.Tensor:
        """r for each logSNR, returned in logSNR's dtype (float32 maths by default, see `precision`)."""
        r = cosine_t_from_logsnr(logsnr, self.s, self.precision, var_range=self.clamp_range)
        return r.clamp(*self.clamp_range).to(result_dtype(logsnr))

    def logsnr(self, r: torch.Tensor) -> torch.Tensor:
        """Inverse: λ = logit(cos²((r+s)/(1+s)·π/2)/ᾱ_min); +inf at r = 0 where the variance is 1."""
        r = torch.as_tensor(r)
        var = cosine_var(r, self.s, self.precision).clamp(0.0, 1.0)
        return torch.logit(var).to(result_dtype(r))
