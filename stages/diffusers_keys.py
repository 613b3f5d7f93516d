"""Key conversion between the official Stage B/C layout and diffusers' ``StableCascadeUNet``.

The conversion is a pure rename (spec §8): each fused ``attention.attn.in_proj_{weight,bias}`` splits
into ``attention.to_q``/``to_k``/``to_v``, ``attention.attn.out_proj`` becomes ``attention.to_out.0``, and Stage B's ``clip_mapper``
becomes ``clip_txt_pooled_mapper``. Both directions are lossless.
"""

from __future__ import annotations

from typing import Any

import torch

from stages.stage_b import StageBConfig
from stages.stage_c import StageCConfig

_QKV = ("to_q", "to_k", "to_v")


def official_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official Stage B or Stage C state dict into diffusers' layout.

    The q/k/v parts are copies, not views of the fused tensor: safetensors refuses tensors that share memory.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            stem, kind = key.rsplit(".attn.in_proj_", 1)
            for name, part in zip(_QKV, value.chunk(3, dim=0), strict=True):
                out[f"{stem}.{name}.{kind}"] = part.clone()
        elif ".attn.out_proj." in key:
            out[key.replace(".attn.out_proj.", ".to_out.0.")] = value
        elif key.startswith("clip_mapper."):
            out["clip_txt_pooled_mapper." + key.removeprefix("clip_mapper.")] = value
        else:
            out[key] = value
    return out


def diffusers_to_official(state: dict[str, torch.Tensor], *, stage: str) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``StableCascadeUNet`` state dict back to the official layout.

    Args:
        state: diffusers keys.
        stage: ``"b"`` or ``"c"`` (Stage B's pooled mapper is called ``clip_mapper`` officially).
    """
    if stage not in ("b", "c"):
        raise ValueError(f"stage must be 'b' or 'c', got {stage!r}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if any(f".attention.{name}." in key for name in _QKV):
            stem, rest = key.split(".attention.", 1)
            if rest.startswith("to_q."):
                kind = rest.removeprefix("to_q.")
                parts = [state[f"{stem}.attention.{name}.{kind}"] for name in _QKV]
                out[f"{stem}.attention.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
        elif ".attention.to_out.0." in key:
            out[key.replace(".attention.to_out.0.", ".attention.attn.out_proj.")] = value
        elif stage == "b" and key.startswith("clip_txt_pooled_mapper."):
            out["clip_mapper." + key.removeprefix("clip_txt_pooled_mapper.")] = value
        else:
            out[key] = value
    return out


def diffusers_stage(config: dict[str, Any]) -> str:
    """``"b"`` or ``"c"`` for a ``StableCascadeUNet`` config (Stage B is the one with an effnet input)."""
    return "b" if config.get("effnet_in_channels") else "c"


def _block_types(level_config: tuple[str, ...]) -> tuple[tuple[str, ...], ...]:
    names = {"C": "SDCascadeResBlock", "T": "SDCascadeTimestepBlock", "A": "SDCascadeAttnBlock"}
    unsupported = {letter for cfg in level_config for letter in cfg} - set(names)
    if unsupported:
        raise ValueError(f"diffusers has no block for level_config letters {sorted(unsupported)}")
    return tuple(tuple(names[letter] for letter in cfg) for cfg in level_config)


def diffusers_config(config: StageBConfig | StageCConfig) -> dict[str, Any]:
    """The ``StableCascadeUNet`` constructor arguments equivalent to an official config."""
    common: dict[str, Any] = {
        "in_channels": config.c_in,
        "out_channels": config.c_out,
        "timestep_ratio_embedding_dim": config.c_r,
        "patch_size": config.patch_size,
        "conditioning_dim": config.c_cond,
        "block_out_channels": tuple(config.c_hidden),
        "num_attention_heads": tuple(config.nhead),
        "down_num_layers_per_block": tuple(config.blocks[0]),
        "up_num_layers_per_block": tuple(config.blocks[1]),
        "down_blocks_repeat_mappers": tuple(config.block_repeat[0]),
        "up_blocks_repeat_mappers": tuple(config.block_repeat[1]),
        "block_types_per_layer": _block_types(config.level_config),
        "clip_seq": config.c_clip_seq,
        "kernel_size": config.kernel_size,
        "dropout": tuple(config.dropout),
        "self_attn": config.self_attn,
        "timestep_conditioning_type": tuple(config.t_conds),
        "switch_level": None if config.switch_level is None else tuple(config.switch_level),
    }
    if isinstance(config, StageCConfig):
        common |= {
            "clip_text_in_channels": config.c_clip_text,
            "clip_text_pooled_in_channels": config.c_clip_text_pooled,
            "clip_image_in_channels": config.c_clip_img,
        }
    else:
        common |= {
            "clip_text_pooled_in_channels": config.c_clip,
            "effnet_in_channels": config.c_effnet,
            "pixel_mapper_in_channels": config.c_pixels,
        }
    return common
