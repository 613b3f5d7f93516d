"""Prediction targets and their inverses for x_t = a·x0 + b·ε.

Each target maps (x0, ε, a, b) to what the network is trained to predict, and inverts a prediction back
to (x0, ε) given the noised input x_t ("undiffuse").
"""

from __future__ import annotations

import torch


class Target:
    """Base class: `__call__` builds the training target, `x0`/`eps` invert a prediction."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __call__(self, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Training target for clean sample `x0` and noise `eps` at scales (a, b)."""
        raise NotImplementedError

    def x0(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Clean sample implied by prediction `pred` of noised input x_t."""
        raise NotImplementedError

    def eps(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Noise implied by prediction `pred` of noised input x_t."""
        raise NotImplementedError

    def undiffuse(
        self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x0, ε) implied by `pred`."""
        return self.x0(noised, pred, a, b), self.eps(noised, pred, a, b)


class EpsilonTarget(Target):
    """ε-prediction (Ho et al. 2020): target ε; x0 = (x_t − b·ε̂)/a."""

    def __call__(self, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return eps

    def x0(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (noised - b * pred) / a

    def eps(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pred


class X0Target(Target):
    """x0-prediction: target x0; ε = (x_t − a·x̂0)/b."""

    def __call__(self, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return x0

    def x0(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pred

    def eps(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (noised - a * pred) / b


class VTarget(Target):
    """v-prediction (Salimans & Ho 2022, "Progressive Distillation", §4): v = a·ε − b·x0.

    Inverse for any (a, b): x0 = (a·x_t − b·v)/(a² + b²), ε = (b·x_t + a·v)/(a² + b²); for VP a² + b² = 1.
    """

    def __call__(self, x0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * eps - b * x0

    def x0(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * noised - b * pred) / (a * a + b * b)

    def eps(self, noised: torch.Tensor, pred: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (b * noised + a * pred) / (a * a + b * b)
