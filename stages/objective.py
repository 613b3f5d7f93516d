"""The training objectives on cached tensors, as the official ``train_c`` and ``train_b`` compute them (spec §3).

The cache stores deterministic values; the training-time randomness happens here, per step:

- caption dropout: with probability 5% a sample's text conditions become the stored empty-caption ones;
- Stage C's image conditioning: ``clip_img`` is the stored CLIP-L embedding for 10% of samples, zeros otherwise;
- Stage B's effnet conditioning: one factor f ~ U(0.5, 1) per micro-batch picks the effnet latent of the
  crop NEAREST-resized to ⌊n·f⌋ cells (stored per size by encode); 10% of samples get zeros instead;
- GDF: t ~ U (training schedule), ε target (Stage B: pyramid noise), P2 or adaptive loss weight; per-sample
  MSE over C,H,W.

The function returns the weighted loss (to backpropagate) and the per-sample raw losses and logSNRs (to update
an adaptive loss weight). Draws come from one ``torch.Generator`` in a fixed order, so a step is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from stages.gdf import GDF, pyramid_noise

CAPTION_DROPOUT = 0.05
CLIP_IMG_PROBABILITY = 0.1
STAGE_B_EFFNET_PROBABILITY = 0.9  # train_b: samples with rand <= 0.9 get the effnet map, the rest zeros


@dataclass(frozen=True)
class StepLoss:
    """One step's loss: ``loss`` to backpropagate; ``per_sample`` and ``logsnr`` for the adaptive buckets."""

    loss: torch.Tensor
    per_sample: torch.Tensor
    logsnr: torch.Tensor


def condition_batch(
    clip_text: torch.Tensor,
    clip_text_pooled: torch.Tensor,
    clip_img: torch.Tensor,
    empty_text: torch.Tensor,
    empty_pooled: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    caption_dropout: float = CAPTION_DROPOUT,
    clip_img_probability: float = CLIP_IMG_PROBABILITY,
) -> dict[str, torch.Tensor]:
    """Stage C's conditions from cached tensors with the official per-sample randomness.

    Args:
        clip_text: (B, 77, C) cached hidden states; clip_text_pooled: (B, 1, C) or (B, C); clip_img: (B, D).
        empty_text, empty_pooled: the dataset's stored empty-caption conditions, (77, C) and (C,) or (1, C).
        generator: RNG for the two draws (caption dropout first, then image use).
    """
    b = clip_text.shape[0]
    device = clip_text.device
    drop = torch.rand(b, generator=generator, device=device) < caption_dropout
    use_img = torch.rand(b, generator=generator, device=device) < clip_img_probability
    pooled = clip_text_pooled.reshape(b, 1, -1)
    text = torch.where(drop[:, None, None], empty_text.to(clip_text).expand_as(clip_text), clip_text)
    pooled = torch.where(
        drop[:, None, None], empty_pooled.reshape(1, 1, -1).to(pooled).expand_as(pooled), pooled
    )
    img = torch.where(use_img[:, None], clip_img.reshape(b, -1), torch.zeros_like(clip_img.reshape(b, -1)))
    return {"clip_text": text, "clip_text_pooled": pooled, "clip_img": img.unsqueeze(1)}


def stage_b_cells(n_cells: int, stored: Sequence[int], *, generator: torch.Generator | None = None) -> int:
    """The effnet size of one micro-batch: f ~ U(0.5, 1), ⌊n·f⌋ cells (train_b draws f once per batch).

    With every size in [n/2, n) stored this is exact; with a subset (encode's ``stage_b_conditioning:
    subset``) it is the stored size nearest to the drawn one, ties to the smaller.
    """
    f = 0.5 + 0.5 * torch.rand((), generator=generator).item()
    drawn = int(n_cells * f)
    return min(sorted(stored), key=lambda s: (abs(s - drawn), s))


def stage_b_conditions(
    clip_text_pooled: torch.Tensor,
    empty_pooled: torch.Tensor,
    effnet_by_cells: Mapping[int, torch.Tensor],
    n_cells: int,
    *,
    generator: torch.Generator | None = None,
    caption_dropout: float = CAPTION_DROPOUT,
    effnet_probability: float = STAGE_B_EFFNET_PROBABILITY,
) -> dict[str, torch.Tensor]:
    """Stage B's conditions from cached tensors with the official per-sample randomness.

    Args:
        clip_text_pooled: (B, C) or (B, 1, C) pooled CLIP-bigG text; empty_pooled: the stored empty caption's.
        effnet_by_cells: stored effnet latents (B, 16, s, s) by cell size s.
        n_cells: the Stage A crop's side in effnet cells (32 at 1024 px).
        generator: RNG for the draws, in order: caption dropout (B), the size factor (1), effnet use (B).

    Returns:
        ``{"effnet": (B, 16, s, s), "clip": (B, 1, C)}``, the keyword inputs of ``StageB.forward``.
    """
    b = clip_text_pooled.shape[0]
    device = clip_text_pooled.device
    drop = torch.rand(b, generator=generator, device=device) < caption_dropout
    pooled = clip_text_pooled.reshape(b, 1, -1)
    pooled = torch.where(
        drop[:, None, None], empty_pooled.reshape(1, 1, -1).to(pooled).expand_as(pooled), pooled
    )
    cells = stage_b_cells(n_cells, list(effnet_by_cells), generator=generator)
    effnet = effnet_by_cells[cells]
    use = torch.rand(b, generator=generator, device=device) <= effnet_probability
    return {"effnet": torch.where(use[:, None, None, None], effnet, torch.zeros_like(effnet)), "clip": pooled}


def diffusion_loss(
    model: nn.Module,
    gdf: GDF,
    latents: torch.Tensor,
    conditions: dict[str, torch.Tensor],
    *,
    epsilon: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepLoss:
    """Diffuse the cached latents, predict ε with the model, and weight the per-sample MSE.

    ``epsilon`` is the noise to diffuse with (Stage B: pyramid noise); None draws N(0, I) (Stage C). The
    forward runs under ``torch.autocast`` when ``autocast_dtype`` is given (bf16 officially); the loss is
    computed in float32.
    """
    diffused = gdf.diffuse(latents, epsilon=epsilon, shift=1.0, loss_shift=1.0, generator=generator)
    enabled = autocast_dtype is not None
    with torch.autocast(latents.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        pred = model(diffused.noised, diffused.noise_cond, **conditions)
    per_sample = nn.functional.mse_loss(pred.float(), diffused.target.float(), reduction="none").mean(
        dim=(1, 2, 3)
    )
    loss = (per_sample * diffused.loss_weight.to(per_sample)).mean()
    return StepLoss(loss=loss, per_sample=per_sample.detach(), logsnr=diffused.logSNR.detach())


def stage_b_noise(latents: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """train_b's ε: N(0, I) plus coarse octaves of size 1…16, renormalised (``pyramid_noise``)."""
    eps = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    return pyramid_noise(eps, generator=generator)
