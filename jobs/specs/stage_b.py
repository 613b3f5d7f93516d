"""The Stage B training spec (official ``train_b``): the diffusion decoder from effnet latents to Stage A
latents, trained on the cache (spec §3 "Stage B specifics").

The cache holds what ``train_b`` computes every step: the Stage A latents ``encode(x)/0.43`` of the 1024 px
crop (the target), the pooled CLIP-bigG text, and the effnet latent of the crop NEAREST-resized to every size
f ~ U(0.5, 1) can pick (encode's ``stage_b_conditioning``). The objective draws f once per micro-batch, uses the
effnet latent for 90% of samples and zeros for the rest, drops 5% of captions to the stored empty caption,
and diffuses with pyramid noise: ε target, P2 or adaptive loss weight, shift 1 (the yamls' ``shift: 4`` is
unused officially), bf16 autocast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from jobs.specs.preview import decoded, png_grid
from jobs.specs.spec import TrainSpec, frozen_flavor
from jobs.specs.stage_c import UNET_UNITS, build_generator
from pipelines.core.notice import notice
from pipelines.train_data.crops import crop_spec, training_crops
from schemas import columns as c
from stages.flavors import get_flavor
from stages.gdf import GDF, stage_gdf
from stages.objective import StepLoss, diffusion_loss, stage_b_conditions, stage_b_noise

if TYPE_CHECKING:
    from jobs.train_config import TrainConfig
    from jobs.train_loop import TrainLoop
    from pipelines.train_data.batches import MicroBatch

PREVIEW_TIMESTEPS, PREVIEW_CFG = 10, 1.1  # the Stage B sampling of the official notebooks
STAGE_A_CELLS = 8  # one effnet cell (32 px) is 8 Stage A latent cells (4 px)
STAGE_A_PX = 4  # pixels per Stage A latent cell


def stage_b_columns(model: Any, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    stage_a = shapes.get(c.STAGE_A)
    cells = c.stage_b_cells_of(shapes)
    if stage_a is None or not cells:
        raise ValueError(
            "Stage B trains on Stage A latents and the effnet latents of their crop at every training size: "
            "the cache holds " + ", ".join(sorted(shapes)) + "; encode it with stage_a and "
            "stage_b_conditioning (exact or subset)"
        )
    return {
        c.STAGE_A: (model.c_in, *stage_a[1:]),
        c.CLIP_TEXT_POOLED: (model.c_clip,),
        **{c.stage_b_effnet_column(s): (model.c_effnet, s, s) for s in cells},
    }


def gdf(config: TrainConfig) -> GDF:
    return stage_gdf(adaptive=config.adaptive_loss_weight)


def _effnet_by_cells(loop: TrainLoop, batch: MicroBatch) -> dict[int, torch.Tensor]:
    return {s: loop.tensor(batch, c.stage_b_effnet_column(s)) for s in c.stage_b_cells_of(loop.columns)}


def objective(loop: TrainLoop, batch: MicroBatch, model: nn.Module) -> StepLoss:
    """``train_b.forward_pass`` on cached tensors."""
    latents = loop.tensor(batch, c.STAGE_A)
    n_cells = latents.shape[-1] // STAGE_A_CELLS
    conditions = stage_b_conditions(loop.tensor(batch, c.CLIP_TEXT_POOLED), loop.empty[c.CLIP_TEXT_POOLED],
                                    _effnet_by_cells(loop, batch), n_cells)  # fmt: skip
    return diffusion_loss(model, loop.gdf, latents, conditions, epsilon=stage_b_noise(latents),
                          autocast_dtype=loop.autocast)  # fmt: skip


@torch.no_grad()
def preview(loop: TrainLoop, batch: MicroBatch) -> bytes:
    """Rows: the original crops (re-read from the image shards the cache records), Stage A's decode of the cached
    Stage A latents, and Stage A's decode of Stage B samples (10 steps, cfg 1.1) conditioned on the cached effnet
    latent of the size nearest 3/4 of the crop (the official reconstruction's ``effnet_factor``) and
    unconditioned on zeros and the empty caption. Without the image shards the first row is left out."""
    cfg = loop.config.preview
    stage_a = loop.frozen_model(cfg.stage_a, cfg.stage_a_weights)
    latents = loop.tensor(batch, c.STAGE_A)
    n = min(cfg.samples, len(latents))
    latents = latents[:n]
    by_cells = _effnet_by_cells(loop, batch)
    three_quarters = latents.shape[-1] // STAGE_A_CELLS * 3 / 4
    effnet = by_cells[min(by_cells, key=lambda s: (abs(s - three_quarters), s))][:n]
    pooled = loop.tensor(batch, c.CLIP_TEXT_POOLED)[:n].reshape(n, 1, -1)
    cond = {"effnet": effnet, "clip": pooled}
    uncond = {"effnet": torch.zeros_like(effnet),
              "clip": loop.empty[c.CLIP_TEXT_POOLED].reshape(1, 1, -1).expand_as(pooled)}  # fmt: skip
    x0 = loop.sample(cond, uncond, latents.shape, timesteps=cfg.timesteps or PREVIEW_TIMESTEPS,
                     cfg=PREVIEW_CFG if cfg.cfg is None else cfg.cfg)  # fmt: skip
    real = cfg.stage_a_weights is not None
    rows = [decoded(stage_a.decode(x), real_weights=real) for x in (latents, x0)]
    return png_grid(_originals(loop, batch, n, latents.shape[-1] * STAGE_A_PX) + rows)


def _originals(loop: TrainLoop, batch: MicroBatch, n: int, side: int) -> list[torch.Tensor]:
    """The samples' Stage A crops (side² px, center) from their source shards; [] with a notice if unreadable."""
    data = loop.config.data
    keys, shards = batch[c.KEY].split("\n")[:n], batch[c.SOURCE_SHARD].split("\n")[:n]
    try:
        spec = crop_spec(data.path, None, data.storage_options)
        crops = training_crops([(s, k, (side, side)) for s, k in zip(shards, keys, strict=True)], spec)
    except (OSError, KeyError, ValueError) as err:
        notice(f"preview: the original crops are left out ({err})")
        return []
    return [torch.from_numpy(np.stack(crops)).to(loop.device).float() / 255]


def check_preview(config: TrainConfig) -> None:
    preview = config.preview
    if not preview.every:
        return
    stage_a = frozen_flavor(
        "preview.stage_a", preview.stage_a, preview.stage_a_weights, "when preview.every > 0"
    )
    c_out = get_flavor(config.flavor).config.c_out
    if stage_a.family != "stage_a" or stage_a.config.c_latent != c_out:
        raise ValueError(f"preview.stage_a={preview.stage_a!r} does not decode {config.flavor} latents")


STAGE_B = TrainSpec(
    name="stage_b", mode="stage_b", command="train-b", flavor_family="stage_b", columns=stage_b_columns,
    build=build_generator, gdf=gdf, objective=objective, checkpoint="generator", preview=preview,
    fsdp_units=UNET_UNITS, ema=True, checks=(check_preview,),
)  # fmt: skip
