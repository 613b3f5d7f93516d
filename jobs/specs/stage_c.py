"""The Stage C training specs: full fine-tune (``train_c``), LoRA (``train_c_lora``) and ControlNet
(``train_c_controlnet``), as the official trainers define them (spec §3).

All three read the same cache columns and share the objective (``stages.objective.diffusion_loss``): ε target,
P2 or adaptive loss weight, caption dropout 5% to the stored empty caption, the CLIP-L image embedding for 10%
of samples. They differ in what trains (the generator, the LoRA bundle, the ControlNet) and in what is saved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from jobs.specs.preview import decoded, png_grid
from jobs.specs.spec import Built, TrainSpec, frozen_flavor
from pipelines.train_data.batches import IMAGES
from schemas import columns as c
from stages.common import AttnBlock, FeedForwardBlock, ResBlock, TimestepBlock
from stages.flavors import build_model, get_flavor
from stages.gdf import GDF, stage_gdf
from stages.objective import StepLoss, condition_batch, diffusion_loss

if TYPE_CHECKING:
    from jobs.train_config import TrainConfig
    from jobs.train_loop import TrainLoop
    from pipelines.train_data.batches import MicroBatch

UNET_UNITS = (ResBlock, AttnBlock, TimestepBlock, FeedForwardBlock)  # the official FSDP wrap policy
PREVIEW_TIMESTEPS, PREVIEW_CFG = 20, 5.0  # train_c's sampling_configs


def stage_c_columns(model: Any, shapes: Any) -> dict[str, tuple[int, ...]]:
    return {
        c.EFFNET: (model.c_in,),
        c.CLIP_TEXT: (77, model.c_clip_text),
        c.CLIP_TEXT_POOLED: (model.c_clip_text_pooled,),
        c.CLIP_IMG: (model.c_clip_img,),
    }


def _stage_c(config: TrainConfig, device: torch.device) -> nn.Module:
    model, _ = build_model(config.flavor, weights=config.weights)
    return model.train().to(device)


def build_generator(config: TrainConfig, device: torch.device) -> Built:
    stage_c = _stage_c(config, device)
    return Built(stage_c, stage_c, {"generator": stage_c})


def build_lora(config: TrainConfig, device: torch.device) -> Built:
    from stages.lora import build_lora

    stage_c = _stage_c(config, device).requires_grad_(False)
    bundle = build_lora(stage_c, filters=config.lora.filters, rank=config.lora.rank).to(device)
    return Built(bundle, stage_c, {"lora": bundle})


def build_controlnet(config: TrainConfig, device: torch.device) -> Built:
    from stages.controlnet import ControlledStageC

    cn = config.controlnet
    assert cn is not None
    cnet, _ = build_model(cn.flavor, weights=cn.weights)
    controlled = ControlledStageC(_stage_c(config, device), cnet.train()).to(device)
    frozen = {}
    if cn.kind == "super_resolution":
        frozen["control_effnet"] = build_model(cn.effnet, weights=cn.effnet_weights, device=device)[0]
    return Built(cnet, controlled, {"controlnet": cnet}, frozen)


def gdf(config: TrainConfig) -> GDF:
    offset = config.controlnet.noise if config.controlnet is not None else 0.0
    return stage_gdf(adaptive=config.adaptive_loss_weight, offset_noise=offset)


def _control(loop: TrainLoop, batch: MicroBatch) -> torch.Tensor:
    from stages.control_inputs import control_input

    cn = loop.config.controlnet
    assert cn is not None
    images = torch.from_numpy(np.asarray(batch[IMAGES])).to(loop.device).float() / 255
    return control_input(cn.kind, images, effnet=loop.frozen.get("control_effnet"))


def objective(loop: TrainLoop, batch: MicroBatch, model: nn.Module) -> StepLoss:
    """``train_c.forward_pass`` on cached tensors (the ControlNet's control input from the training crops)."""
    conditions = condition_batch(
        loop.tensor(batch, c.CLIP_TEXT), loop.tensor(batch, c.CLIP_TEXT_POOLED), loop.tensor(batch, c.CLIP_IMG),
        loop.empty[c.CLIP_TEXT], loop.empty[c.CLIP_TEXT_POOLED],
    )  # fmt: skip
    if loop.config.controlnet is not None:
        conditions["control"] = _control(loop, batch)
    return diffusion_loss(
        model, loop.gdf, loop.tensor(batch, c.EFFNET), conditions, autocast_dtype=loop.autocast
    )


@torch.no_grad()
def preview(loop: TrainLoop, batch: MicroBatch) -> bytes:
    """The Previewer decode of the cached latents (top row) and of samples for their conditions (bottom).

    With real Previewer weights the decode is clamped to [0, 1] as officially; a random-init Previewer (tests,
    demos) is contrast-stretched per image and channel instead, since its raw output is near zero.
    """
    cfg = loop.config.preview
    previewer = loop.frozen_model(cfg.previewer, cfg.previewer_weights)
    n = min(cfg.samples, len(batch[c.EFFNET]))
    cond = {
        c.CLIP_TEXT: loop.tensor(batch, c.CLIP_TEXT)[:n],
        c.CLIP_TEXT_POOLED: loop.tensor(batch, c.CLIP_TEXT_POOLED)[:n].reshape(n, 1, -1),
        c.CLIP_IMG: torch.zeros_like(loop.tensor(batch, c.CLIP_IMG)[:n]).reshape(n, 1, -1),
    }
    uncond = {
        c.CLIP_TEXT: loop.empty[c.CLIP_TEXT].expand_as(cond[c.CLIP_TEXT]),
        c.CLIP_TEXT_POOLED: loop.empty[c.CLIP_TEXT_POOLED].reshape(1, 1, -1).expand(n, 1, -1),
        c.CLIP_IMG: cond[c.CLIP_IMG],
    }
    if loop.config.controlnet is not None:
        cond["control"] = uncond["control"] = _control(loop, {**batch, IMAGES: np.asarray(batch[IMAGES])[:n]})
    latents = loop.tensor(batch, c.EFFNET)[:n]
    x0 = loop.sample(cond, uncond, latents.shape, timesteps=cfg.timesteps or PREVIEW_TIMESTEPS,
                     cfg=PREVIEW_CFG if cfg.cfg is None else cfg.cfg)  # fmt: skip
    real = cfg.previewer_weights is not None
    return png_grid([decoded(previewer(x), real_weights=real) for x in (latents, x0)])


def check_previewer(config: TrainConfig) -> None:
    preview = config.preview
    if not preview.every:
        return
    previewer = frozen_flavor("preview.previewer", preview.previewer, preview.previewer_weights,
                              "when preview.every > 0")  # fmt: skip
    if previewer.config.c_in != get_flavor(config.flavor).config.c_in:
        raise ValueError(f"preview.previewer={preview.previewer!r} does not decode {config.flavor} latents")


def check_controlnet(config: TrainConfig) -> None:
    """The ControlNet must fit the Stage C flavor (width, ResBlock indices) and its control kind."""
    from stages.control_inputs import CONTROL_KINDS

    cn = config.controlnet
    assert cn is not None
    cnet = _flavor("controlnet.flavor", cn.flavor).config
    stage_c = get_flavor(config.flavor)
    n_blocks = stage_c.build(device="meta").count_resblocks()
    if cnet.c_proj != stage_c.config.c_hidden[0] or max(cnet.proj_blocks) >= n_blocks:
        raise ValueError(
            f"controlnet.flavor={cn.flavor!r} (c_proj {cnet.c_proj}, blocks {list(cnet.proj_blocks)}) does not fit "
            f"flavor={config.flavor!r} (c_hidden {stage_c.config.c_hidden[0]}, {n_blocks} ResBlocks)"
        )
    if cnet.c_in != CONTROL_KINDS[cn.kind]:
        raise ValueError(
            f"controlnet.flavor={cn.flavor!r} takes {cnet.c_in} channels, {cn.kind} gives {CONTROL_KINDS[cn.kind]}"
        )
    if cn.kind == "super_resolution":
        frozen_flavor("controlnet.effnet", cn.effnet, cn.effnet_weights, "for super_resolution")


def check_frozen_stage_c(config: TrainConfig) -> None:
    """A LoRA or ControlNet trains on a frozen Stage C: a released one needs its weights."""
    frozen_flavor("flavor", config.flavor, config.weights, "", weights_field="weights")


def _flavor(field: str, name: str) -> Any:
    try:
        return get_flavor(name)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None


_COMMON = dict(
    flavor_family="stage_c", columns=stage_c_columns, gdf=gdf, objective=objective, preview=preview
)

STAGE_C = TrainSpec(name="stage_c", mode="stage_c", command="train-c", build=build_generator, checkpoint="generator",
                    fsdp_units=UNET_UNITS, ema=True, checks=(check_previewer,), **_COMMON)  # fmt: skip
STAGE_C_LORA = TrainSpec(name="stage_c_lora", mode="lora", command="train-lora", build=build_lora,
                         checkpoint="lora", checks=(check_frozen_stage_c, check_previewer), **_COMMON)  # fmt: skip
STAGE_C_CONTROLNET = TrainSpec(name="stage_c_controlnet", mode="controlnet", command="train-controlnet",
                               build=build_controlnet, checkpoint="controlnet", images=True,
                               sections=("controlnet",), checks=(check_frozen_stage_c, check_previewer, check_controlnet), **_COMMON)  # fmt: skip
