"""GDF: Stable Cascade's diffusion maths (schedules, scalers, targets, noise conds, loss weights, samplers).

Pure torch; see `reference/stable-cascade.md` §2.
"""

from stages.gdf.gdf import GDF, Diffused, stage_gdf
from stages.gdf.guidance import cfg_at, concat_inputs, guide, zeros_like_inputs
from stages.gdf.loss_weights import AdaptiveLossWeight, LossWeight, P2LossWeight, loss_shift_logsnr
from stages.gdf.noise_conds import CosineTNoiseCond
from stages.gdf.pyramid import pyramid_noise
from stages.gdf.samplers import DDIMSampler, DDPMSampler, LCMSampler, Sampler
from stages.gdf.scalers import VPScaler
from stages.gdf.schedules import CosineSchedule, cosine_t_from_logsnr, sample_t, shift_logsnr
from stages.gdf.targets import EpsilonTarget, Target, VTarget, X0Target

__all__ = [
    "GDF",
    "AdaptiveLossWeight",
    "CosineSchedule",
    "CosineTNoiseCond",
    "DDIMSampler",
    "DDPMSampler",
    "Diffused",
    "EpsilonTarget",
    "LCMSampler",
    "LossWeight",
    "P2LossWeight",
    "Sampler",
    "Target",
    "VPScaler",
    "VTarget",
    "X0Target",
    "cfg_at",
    "concat_inputs",
    "cosine_t_from_logsnr",
    "guide",
    "loss_shift_logsnr",
    "pyramid_noise",
    "sample_t",
    "shift_logsnr",
    "stage_gdf",
    "zeros_like_inputs",
]
