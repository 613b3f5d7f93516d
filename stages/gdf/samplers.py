"""Reverse-process samplers: one step from (x_t, x̂0, ε̂) at scales (a, b) to scales (a_prev, b_prev)."""

from __future__ import annotations

from typing import Protocol

import torch


class Sampler(Protocol):
    """What `GDF.sample` needs of a sampler: one reverse step from scales (a, b) to (a_prev, b_prev)."""

    def step(
        self,
        x: torch.Tensor,
        x0: torch.Tensor,
        eps: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        a_prev: torch.Tensor,
        b_prev: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...


class DDIMSampler:
    """DDIM step (Song et al. 2021, "DDIM", eq. 12) generalised to any scaler:

    x_prev = a_prev·x̂0 + √(b_prev² − σ²)·ε̂ + σ·z,  σ = η·√(b_prev²/b²)·√(1 − a²/a_prev²) (eq. 16).

    η = 0 is deterministic DDIM; η = 1 is ancestral DDPM sampling (Ho et al. 2020).

    Args:
        eta: Stochasticity η >= 0.
    """

    def __init__(self, eta: float = 0.0) -> None:
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta!r}")
        self.eta = float(eta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eta={self.eta})"

    def sigma(
        self, a: torch.Tensor, b: torch.Tensor, a_prev: torch.Tensor, b_prev: torch.Tensor
    ) -> torch.Tensor:
        """Noise scale σ of the step (DDIM eq. 16)."""
        ratio = (1 - (a * a) / (a_prev * a_prev)).clamp_min(0.0)
        return self.eta * torch.sqrt(b_prev * b_prev / (b * b)) * torch.sqrt(ratio)

    def step(
        self,
        x: torch.Tensor,
        x0: torch.Tensor,
        eps: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        a_prev: torch.Tensor,
        b_prev: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return x_prev for the current x_t and its (x̂0, ε̂).

        Args:
            x: Current noised sample x_t (only its shape, device and dtype are used).
            x0: Predicted clean sample.
            eps: Predicted noise.
            a, b: Scales of x_t, broadcastable to `x`.
            a_prev, b_prev: Scales of the target step, broadcastable to `x`.
            noise: Optional z ~ N(0, I) to use instead of drawing one.
            generator: RNG for z (only drawn when η > 0 and `noise` is None).
        """
        sigma = self.sigma(a, b, a_prev, b_prev)
        x_prev = a_prev * x0 + torch.sqrt((b_prev * b_prev - sigma * sigma).clamp_min(0.0)) * eps
        if self.eta > 0:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x_prev = x_prev + sigma * noise
        return x_prev


class DDPMSampler(DDIMSampler):
    """Ancestral DDPM sampling: DDIM with η = 1 (Ho et al. 2020, Algorithm 2)."""

    def __init__(self) -> None:
        super().__init__(eta=1.0)

    def __repr__(self) -> str:
        return "DDPMSampler()"


class LCMSampler:
    """Latent-consistency sampling (Luo et al. 2023, "LCM", Algorithm 1): x_prev = a_prev·x̂0 + b_prev·z.

    The x̂0 prediction is re-noised to the next step's level with *fresh* noise z ~ N(0, I); ε̂ and x_t are not
    used. As in the official GDF `LCMSampler`, every step re-noises, the last one included (with the clamped
    cosine schedule the last target, t = 0, has b_prev ≈ 0.01); `GDF.sample` yields x̂0 alongside, which is what
    callers keep.
    """

    def __repr__(self) -> str:
        return "LCMSampler()"

    def step(
        self,
        x: torch.Tensor,
        x0: torch.Tensor,
        eps: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        a_prev: torch.Tensor,
        b_prev: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Return x_prev = a_prev·x0 + b_prev·z (same arguments as `DDIMSampler.step`).

        Args:
            x: Current noised sample x_t (only its shape, device and dtype are used).
            x0: Predicted clean sample.
            eps: Predicted noise (unused).
            a, b: Scales of x_t (unused).
            a_prev, b_prev: Scales of the target step, broadcastable to `x`.
            noise: Optional z ~ N(0, I) to use instead of drawing one.
            generator: RNG for z.
        """
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return a_prev * x0 + b_prev * noise
