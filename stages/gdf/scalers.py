"""Input scalers: (a, b) such that the noised sample is x_t = a·x0 + b·ε."""

from __future__ import annotations

import torch


class VPScaler:
    """Variance-preserving scaler: a = √σ(λ), b = √(1 − σ(λ)) with σ the sigmoid (a² + b² = 1, DDPM)."""

    def __repr__(self) -> str:
        return "VPScaler()"

    def __call__(self, logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (a, b) for the given logSNR, in logSNR's dtype.

        b is computed as √σ(−λ), which equals √(1 − σ(λ)) without cancellation at high logSNR.
        """
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()
