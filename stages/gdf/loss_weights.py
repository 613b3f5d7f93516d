"""Per-sample loss weights as functions of logSNR."""

from __future__ import annotations

import math
from typing import Any

import torch


def loss_shift_logsnr(logsnr: torch.Tensor, shift: float) -> torch.Tensor:
    """The loss weight's shift ("loss_shift"): λ + 2·ln(shift).

    This is the official `BaseLossWeight.__call__(logSNR, shift)` convention, the *opposite* sign of the
    schedule's shift (`schedules.shift_logsnr`, λ + 2·ln(1/shift)): a loss_shift > 1 moves λ towards higher SNR,
    so P2 weighs every sample as if it were less noisy.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    return logsnr if shift == 1 else logsnr + 2 * math.log(shift)


class LossWeight:
    """Base class: `__call__(logsnr, shift)` shifts λ to λ + 2·ln(shift) ("loss_shift"), then weighs it.

    Note the sign: the loss shift is the opposite of the schedule's shift (λ + 2·ln(1/shift)), as in the
    official GDF (see `loss_shift_logsnr`).
    """

    def weight(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Weight of each (already shifted) logSNR."""
        raise NotImplementedError

    @torch.no_grad()
    def __call__(self, logsnr: torch.Tensor, shift: float = 1.0) -> torch.Tensor:
        """Per-sample weights of `logsnr` shifted by the loss shift (λ + 2·ln(shift)), same shape as `logsnr`."""
        return self.weight(loss_shift_logsnr(logsnr, shift))


class P2LossWeight(LossWeight):
    """Perception-prioritised weight (Choi et al. 2022, "P2 weighting", eq. 8): w = (k + e^(s·λ))^(−γ).

    As in the official GDF, `s` scales the logSNR (w = (k + SNR^s)^(−γ)); the defaults give
    w = (1 + e^λ)^(−1) = sigmoid(−λ). Computed in λ's dtype with the official expression; e^(s·λ) overflowing
    to +inf gives the correct limit 0 for γ > 0.

    Args:
        k: Offset k >= 0.
        gamma: Exponent γ.
        s: Scale s of the logSNR.
    """

    def __init__(self, k: float = 1.0, gamma: float = 1.0, s: float = 1.0) -> None:
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k!r}")
        self.k, self.gamma, self.s = float(k), float(gamma), float(s)

    def __repr__(self) -> str:
        return f"P2LossWeight(k={self.k}, gamma={self.gamma}, s={self.s})"

    def weight(self, logsnr: torch.Tensor) -> torch.Tensor:
        return (self.k + (logsnr * self.s).exp()) ** -self.gamma


class AdaptiveLossWeight(LossWeight):
    """Weight = 1 / (EMA of the raw loss in the sample's logSNR bucket), clamped to `weight_range`.

    Buckets: edges `linspace(*logsnr_range, buckets - 1)`, bucket index `searchsorted(edges, λ)`, so there are
    `buckets` bins including the two open-ended ones. Losses start at 1 (weight 1). `__call__(λ, shift)` looks up
    the bucket of the loss-shifted λ + 2·ln(shift); `update_buckets` takes the unshifted λ (as the official
    trainers pass `GDF.diffuse`'s logSNR).

    Args:
        logsnr_range: (min, max) logSNR covered by the bucket edges.
        buckets: Number of buckets (>= 2).
        weight_range: (min, max) clamp of the weight.
    """

    def __init__(
        self,
        logsnr_range: tuple[float, float] = (-10.0, 10.0),
        buckets: int = 300,
        weight_range: tuple[float, float] = (1e-7, 1e7),
    ) -> None:
        if buckets < 2:
            raise ValueError(f"buckets must be >= 2, got {buckets!r}")
        if not logsnr_range[0] < logsnr_range[1]:
            raise ValueError(f"logsnr_range must satisfy min < max, got {logsnr_range!r}")
        if not 0 < weight_range[0] <= weight_range[1]:
            raise ValueError(f"weight_range must satisfy 0 < min <= max, got {weight_range!r}")
        self.weight_range = (float(weight_range[0]), float(weight_range[1]))
        self.bucket_ranges = torch.linspace(float(logsnr_range[0]), float(logsnr_range[1]), buckets - 1)
        self.bucket_losses = torch.ones(buckets)

    def __repr__(self) -> str:
        lo, hi = self.bucket_ranges[0].item(), self.bucket_ranges[-1].item()
        return f"AdaptiveLossWeight(logsnr_range=({lo}, {hi}), buckets={len(self.bucket_losses)})"

    def bucket_indices(self, logsnr: torch.Tensor) -> torch.Tensor:
        """Bucket index of each logSNR (on logSNR's device)."""
        edges = self.bucket_ranges.to(logsnr.device)
        return torch.searchsorted(edges, logsnr.detach().to(edges.dtype).contiguous())

    def weight(self, logsnr: torch.Tensor) -> torch.Tensor:
        losses = self.bucket_losses.to(logsnr.device)[self.bucket_indices(logsnr)]
        return (1 / losses).clamp(*self.weight_range).to(logsnr.dtype)

    @torch.no_grad()
    def update_buckets(self, logsnr: torch.Tensor, loss: torch.Tensor, beta: float = 0.99) -> None:
        """EMA update: for every bucket hit by the batch, L ← β·L + (1−β)·mean(losses in that bucket).

        Args:
            logsnr: Per-sample logSNR, shape `[B]` (as returned by `GDF.diffuse`, unweighted).
            loss: Raw (unweighted) per-sample loss, shape `[B]`.
            beta: EMA decay in [0, 1].
        """
        if not 0 <= beta <= 1:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        if logsnr.shape != loss.shape:
            raise ValueError(f"logsnr {tuple(logsnr.shape)} and loss {tuple(loss.shape)} shapes differ")
        idx = self.bucket_indices(logsnr.flatten().cpu())
        n = len(self.bucket_losses)
        sums = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, loss.detach().flatten().cpu().double())
        counts = torch.bincount(idx, minlength=n)
        hit = counts > 0
        mean = (sums[hit] / counts[hit]).to(self.bucket_losses.dtype)
        self.bucket_losses[hit] = beta * self.bucket_losses[hit] + (1 - beta) * mean

    def state_dict(self) -> dict[str, list[float]]:
        """JSON-serialisable state: {"bucket_ranges": [...], "bucket_losses": [...]} as plain floats."""
        return {"bucket_ranges": self.bucket_ranges.tolist(), "bucket_losses": self.bucket_losses.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict` exactly (float32 values survive a float/JSON round trip unchanged)."""
        missing = {"bucket_ranges", "bucket_losses"} - set(state)
        if missing:
            raise ValueError(f"adaptive loss state is missing keys {sorted(missing)}")
        ranges = torch.tensor(state["bucket_ranges"], dtype=torch.float32)
        losses = torch.tensor(state["bucket_losses"], dtype=torch.float32)
        if ranges.ndim != 1 or losses.ndim != 1 or len(losses) != len(ranges) + 1:
            raise ValueError(
                f"bucket_losses must be 1-D with len(bucket_ranges) + 1 entries, "
                f"got {len(losses)} losses for {len(ranges)} edges"
            )
        if len(ranges) > 1 and not bool((ranges[1:] >= ranges[:-1]).all()):
            raise ValueError("bucket_ranges must be sorted ascending")
        self.bucket_ranges, self.bucket_losses = ranges, losses
