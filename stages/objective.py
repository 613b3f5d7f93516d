"""Stage C's training objective on cached tensors, as the official ``train_c`` computes it (spec §3).

The cache stores deterministic values; the training-time randomness happens here, per step:

- caption dropout: with probability 5% a sample's text conditions become the stored empty-caption ones;
- image conditioning: ``clip_img`` is the stored CLIP-L embedding for 10% of samples, zeros otherwise;
- GDF: t ~ U (training schedule), ε target, P2 or adaptive loss weight; per-sample MSE over C,H,W.

The function returns the weighted loss (to backpropagate) and the per-sample raw losses and logSNRs (to update
an adaptive loss weight). Draws come from one ``torch.Generator`` in a fixed order, so a step is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stages.gdf import GDF

CAPTION_DROPOUT = 0.05
CLIP_IMG_PROBABILITY = 0.1


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


def stage_c_loss(
    model: nn.Module,
    gdf: GDF,
    latents: torch.Tensor,
    conditions: dict[str, torch.Tensor],
    *,
    generator: torch.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StepLoss:
    """Diffuse the cached effnet latents, predict ε with Stage C, and weight the per-sample MSE.

    The forward runs under ``torch.autocast`` when ``autocast_dtype`` is given (bf16 officially); the loss is
    computed in float32.
    """
    diffused = gdf.diffuse(latents, shift=1.0, loss_shift=1.0, generator=generator)
    enabled = autocast_dtype is not None
    with torch.autocast(latents.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        pred = model(diffused.noised, diffused.noise_cond, **conditions)
    per_sample = nn.functional.mse_loss(pred.float(), diffused.target.float(), reduction="none").mean(
        dim=(1, 2, 3)
    )
    loss = (per_sample * diffused.loss_weight.to(per_sample)).mean()
    return StepLoss(loss=loss, per_sample=per_sample.detach(), logsnr=diffused.logSNR.detach())
