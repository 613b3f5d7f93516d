"""Classifier-free guidance helpers for `GDF.sample` (Ho & Salimans 2022, "Classifier-Free Guidance")."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

CfgSpec = float | tuple[float, float] | None


def zeros_like_inputs(value: Any) -> Any:
    """Unconditional stand-in: tensors become zeros, lists/tuples/dicts are mapped, anything else is kept."""
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, Mapping):
        return {k: zeros_like_inputs(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(zeros_like_inputs(v) for v in value)
    return value


def concat_inputs(cond: Any, uncond: Any) -> Any:
    """Batch conditional and unconditional inputs for one model call.

    Tensors are concatenated along dim 0; lists/tuples (e.g. ControlNet `cnet`) and dicts element-wise;
    None stays None; other values (flags, ints) must be equal in both and are passed through.
    """
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        return torch.cat([cond, uncond], dim=0)
    if cond is None and uncond is None:
        return None
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping):
        if set(cond) != set(uncond):
            raise ValueError(f"input keys differ: {sorted(cond)} vs {sorted(uncond)}")
        return {k: concat_inputs(cond[k], uncond[k]) for k in cond}
    if isinstance(cond, list | tuple) and isinstance(uncond, list | tuple):
        if len(cond) != len(uncond):
            raise ValueError(f"list inputs differ in length: {len(cond)} vs {len(uncond)}")
        return type(cond)(concat_inputs(c, u) for c, u in zip(cond, uncond, strict=True))
    if isinstance(cond, torch.Tensor) or isinstance(uncond, torch.Tensor) or cond != uncond:
        raise ValueError(
            f"cannot batch conditional {type(cond).__name__} with unconditional {type(uncond).__name__}"
        )
    return cond


def cfg_at(
    cfg: CfgSpec, r: float, cfg_t_stop: float | None = None, cfg_t_start: float | None = None
) -> float | None:
    """Guidance scale at time r, or None for no guidance.

    A (start, end) pair is interpolated over r as start·r + end·(1−r). Guidance is off when r < `cfg_t_stop`
    or r > `cfg_t_start`.
    """
    if cfg is None:
        return None
    if (cfg_t_stop is not None and r < cfg_t_stop) or (cfg_t_start is not None and r > cfg_t_start):
        return None
    if isinstance(cfg, tuple | list):
        if len(cfg) != 2:
            raise ValueError(f"cfg must be a float or a (start, end) pair, got {cfg!r}")
        return float(cfg[0]) * r + float(cfg[1]) * (1 - r)
    return float(cfg)


def guide(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, cfg: float, rho: float) -> torch.Tensor:
    """CFG with std rescaling (Lin et al. 2024, "Common Diffusion Noise Schedules…", eq. 15-16).

    pred_cfg = lerp(uncond, cond, cfg); if rho > 0, pred = rho·pred_cfg·std(cond)/std(pred_cfg) +
    (1 − rho)·pred_cfg, with std over the whole tensor.
    """
    pred_cfg = torch.lerp(pred_uncond, pred_cond, cfg)
    if rho <= 0:
        return pred_cfg
    ratio = pred_cond.std() / pred_cfg.std().clamp_min(torch.finfo(pred_cfg.dtype).tiny)
    return rho * pred_cfg * ratio + (1 - rho) * pred_cfg
