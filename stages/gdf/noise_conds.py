"""Noise conditioning: what the denoiser receives as its "time" input."""

from __future__ import annotations

import torch

from stages.gdf._tensor import math_dtype, result_dtype
from stages.gdf.schedules import cosine_t_from_logsnr, cosine_var


class CosineTNoiseCond:
    """r = the cosine-schedule time of a logSNR (Improved DDPM eq. 17 inverted).

    r = acos(√(σ(λ)·ᾱ_min)) / (π/2) · (1+s) − s, with ᾱ_min = cos²(s/(1+s)·π/2), clamped to `clamp_range`.
    With a shifted schedule the model receives the r of the *shifted* logSNR, not the nominal t.

    Args:
        s: Cosine offset (must match the schedule's for r to equal t).
        clamp_range: (min, max) of r.
    """

    def __init__(self, s: float = 0.008, clamp_range: tuple[float, float] = (0.0, 1.0)) -> None:
        if s < 0:
            raise ValueError(f"s must be >= 0, got {s!r}")
        lo, hi = (float(v) for v in clamp_range)
        if lo > hi:
            raise ValueError(f"clamp_range must satisfy min <= max, got {clamp_range!r}")
        self.s = float(s)
        self.clamp_range = (lo, hi)

    def __repr__(self) -> str:
        return f"CosineTNoiseCond(s={self.s}, clamp_range={self.clamp_range})"

    def __call__(self, logsnr: torch.Tensor) -> torch.Tensor:
        """r for each logSNR, in logSNR's dtype (maths in float64 where available)."""
        r = cosine_t_from_logsnr(logsnr.to(math_dtype(logsnr.device)), self.s)
        return r.clamp(*self.clamp_range).to(result_dtype(logsnr))

    def logsnr(self, r: torch.Tensor) -> torch.Tensor:
        """Inverse: λ = logit(cos²((r+s)/(1+s)·π/2)/ᾱ_min); +inf at r = 0 where the variance is 1."""
        r = torch.as_tensor(r)
        var = cosine_var(r.to(math_dtype(r.device)), self.s).clamp(0.0, 1.0)
        return torch.logit(var).to(result_dtype(r))
