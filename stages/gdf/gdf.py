"""GDF: generic diffusion framework tying schedule, scaler, target, noise conditioning and loss weight."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from stages.gdf._tensor import expand_as_batch, work_dtype
from stages.gdf.guidance import CfgSpec, cfg_at, concat_inputs, guide, zeros_like_inputs
from stages.gdf.loss_weights import AdaptiveLossWeight, LossWeight, P2LossWeight
from stages.gdf.noise_conds import CosineTNoiseCond
from stages.gdf.samplers import DDPMSampler, Sampler
from stages.gdf.scalers import VPScaler
from stages.gdf.schedules import CosineSchedule
from stages.gdf.targets import EpsilonTarget, Target


class Diffused(NamedTuple):
    """Result of `GDF.diffuse`; tensors of x0's shape/dtype, per-sample values `[B]` float32."""

    noised: torch.Tensor
    epsilon: torch.Tensor
    target: torch.Tensor
    logSNR: torch.Tensor  # the paper's name, kept for parity with Stable Cascade
    noise_cond: torch.Tensor
    loss_weight: torch.Tensor


class GDF:
    """Forward noising x_t = a·x0 + b·ε and guided reverse sampling.

    Args:
        schedule: t → logSNR (e.g. `CosineSchedule`).
        input_scaler: logSNR → (a, b) (e.g. `VPScaler`).
        target: Training target and its inverse (e.g. `EpsilonTarget`).
        noise_cond: logSNR → model time input (e.g. `CosineTNoiseCond`).
        loss_weight: logSNR → per-sample loss weight.
        offset_noise: Std of per-(sample, channel) constant noise added to ε (Guttenberg 2023), 0 = off.
    """

    def __init__(
        self,
        schedule: CosineSchedule,
        input_scaler: VPScaler,
        target: Target,
        noise_cond: CosineTNoiseCond,
        loss_weight: LossWeight,
        offset_noise: float = 0.0,
    ) -> None:
        if offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {offset_noise!r}")
        self.schedule, self.input_scaler, self.target = schedule, input_scaler, target
        self.noise_cond, self.loss_weight, self.offset_noise = noise_cond, loss_weight, float(offset_noise)

    def __repr__(self) -> str:
        return (
            f"GDF(schedule={self.schedule!r}, input_scaler={self.input_scaler!r}, target={self.target!r}, "
            f"noise_cond={self.noise_cond!r}, loss_weight={self.loss_weight!r}, "
            f"offset_noise={self.offset_noise})"
        )

    def _scales(self, logsnr: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) computed in `work_dtype(like)`, shaped `[B, 1, ...]` and cast to `like`'s dtype."""
        a, b = self.input_scaler(logsnr.to(device=like.device, dtype=work_dtype(like)))
        return expand_as_batch(a, like), expand_as_batch(b, like)

    def diffuse(
        self,
        x0: torch.Tensor,
        epsilon: torch.Tensor | None = None,
        t: torch.Tensor | float | None = None,
        shift: float = 1.0,
        loss_shift: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> Diffused:
        """Noise a clean batch: x_t = a·x0 + b·ε with λ = schedule(t, shift) and (a, b) = scaler(λ).

        Computed in at least float32 and returned in x0's dtype; logSNR, noise cond and weight are float32.

        Draws from `generator`, in order: ε (if not given), offset noise (if enabled), t (if not given).

        Args:
            x0: Clean batch `[B, ...]`.
            epsilon: Noise like `x0`; drawn from N(0, I) if None (pass pyramid noise for Stage B).
            t: Times, a float or `[B]` tensor in [0, 1]; sampled per sample if None.
            shift: Schedule shift (see `CosineSchedule`).
            loss_shift: Loss-weight shift, λ + 2·ln(loss_shift) before the loss weight only (the official sign,
                opposite to the schedule's `shift`).
            generator: RNG for all draws.
        """
        batch = x0.shape[0]
        if epsilon is None:
            epsilon = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        elif epsilon.shape != x0.shape:
            raise ValueError(f"epsilon shape {tuple(epsilon.shape)} differs from x0 shape {tuple(x0.shape)}")
        if self.offset_noise > 0:
            offset_shape = tuple(x0.shape[:2]) + (1,) * (x0.ndim - 2)
            offset = torch.randn(offset_shape, generator=generator, device=x0.device, dtype=x0.dtype)
            epsilon = epsilon + offset * self.offset_noise
        if t is None:
            logsnr = self.schedule(batch, shift, generator=generator, device=x0.device)
        else:
            t_b = torch.as_tensor(t, dtype=torch.float32, device=x0.device).expand(batch)
            logsnr = self.schedule(t_b, shift)
        logsnr = logsnr.float()
        x0w, epsw = x0.to(work_dtype(x0)), epsilon.to(work_dtype(x0))
        a, b = self._scales(logsnr, x0w)
        return Diffused(
            noised=(a * x0w + b * epsw).to(x0.dtype),
            epsilon=epsilon,
            target=self.target(x0w, epsw, a, b).to(x0.dtype),
            logSNR=logsnr,
            noise_cond=self.noise_cond(logsnr),
            loss_weight=self.loss_weight(logsnr, shift=loss_shift),
        )

    def undiffuse(
        self, x: torch.Tensor, logSNR: torch.Tensor, pred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Recover (x0, ε) from noised `x`, its logSNR (`[B]` or scalar) and a model prediction.

        The maths runs in at least float32; results are cast back to `x`'s dtype.
        """
        x0, eps = self._undiffuse_work(x, logSNR, pred)
        return x0.to(x.dtype), eps.to(x.dtype)

    def _undiffuse_work(
        self, x: torch.Tensor, logsnr: torch.Tensor, pred: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`undiffuse` in `work_dtype(x)` (at least float32), without casting back."""
        xw = x.to(work_dtype(x))
        a, b = self._scales(logsnr, xw)
        return self.target.undiffuse(xw, pred.to(xw.dtype), a, b)

    def sample(
        self,
        model: Callable[..., torch.Tensor],
        model_inputs: Mapping[str, Any],
        shape: Sequence[int],
        unconditional_inputs: Mapping[str, Any] | None = None,
        sampler: Sampler | None = None,
        t_start: float = 1.0,
        t_end: float = 0.0,
        timesteps: int = 20,
        x_init: torch.Tensor | None = None,
        cfg: CfgSpec = 3.0,
        cfg_t_stop: float | None = None,
        cfg_t_start: float | None = None,
        cfg_rho: float = 0.7,
        shift: float = 1.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Reverse diffusion from t_start to t_end; yields (x̂0, x_next, pred) after every step.

        r = linspace(t_start, t_end, timesteps+1), λ = schedule(r, shift). The model is called as
        `model(x, noise_cond, **inputs)`. With guidance the conditional and unconditional inputs are batched
        into one call (see `guidance`). Callers usually keep the x̂0 of the last step.

        Args:
            model: Denoiser predicting `self.target`.
            model_inputs: Conditional keyword inputs (batch-first tensors, lists such as `cnet`, flags).
            shape: Shape of the sample `[B, C, H, W]`.
            unconditional_inputs: Inputs for the unconditional branch; zeros_like(model_inputs) if None.
            sampler: Reverse step (`DDPMSampler`, `DDIMSampler`, `LCMSampler`); `DDPMSampler()` if None.
            t_start, t_end: Time range (t_start < 1 with `x_init` is image-to-image).
            timesteps: Number of model calls.
            x_init: Starting x (e.g. `diffuse(x0, t=t_start).noised`); randn(shape) if None.
            cfg: Guidance scale, a (start, end) pair interpolated over r, or None (no guidance).
            cfg_t_stop, cfg_t_start: Guidance only while cfg_t_stop <= r <= cfg_t_start.
            cfg_rho: Std-rescale mix (see `guidance.guide`), 0 = plain CFG.
            shift: Schedule shift for sampling.
            generator: RNG for the initial noise and sampler noise.
            device, dtype: Of x; default to `x_init`'s, else the first input tensor's device and float32.
        """
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps!r}")
        sampler = DDPMSampler() if sampler is None else sampler
        x = self._initial_x(shape, x_init, model_inputs, generator, device, dtype)
        if unconditional_inputs is None:
            unconditional_inputs = zeros_like_inputs(dict(model_inputs))
        r = torch.linspace(t_start, t_end, timesteps + 1, device=x.device, dtype=torch.float32)
        logsnr = self.schedule(r, shift)
        for i in range(timesteps):
            scale = cfg_at(cfg, r[i].item(), cfg_t_stop, cfg_t_start)
            with torch.no_grad():
                pred = self._predict(model, x, logsnr[i], model_inputs, unconditional_inputs, scale, cfg_rho)
                x0, x = self._step(sampler, x, pred, logsnr[i], logsnr[i + 1], generator)
            yield x0, x, pred

    def _step(
        self,
        sampler: Sampler,
        x: torch.Tensor,
        pred: torch.Tensor,
        logsnr: torch.Tensor,
        logsnr_prev: torch.Tensor,
        generator: torch.Generator | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Undiffuse `pred` and take one sampler step; returns (x̂0, x_prev) in x's dtype."""
        x0, eps = self._undiffuse_work(x, logsnr, pred)
        xw = x.to(x0.dtype)
        a, b = self._scales(logsnr, xw)
        a_prev, b_prev = self._scales(logsnr_prev, xw)
        x_prev = sampler.step(xw, x0, eps, a, b, a_prev, b_prev, generator=generator)
        return x0.to(x.dtype), x_prev.to(x.dtype)

    def _initial_x(
        self,
        shape: Sequence[int],
        x_init: torch.Tensor | None,
        model_inputs: Mapping[str, Any],
        generator: torch.Generator | None,
        device: torch.device | str | None,
        dtype: torch.dtype | None,
    ) -> torch.Tensor:
        """x_init (moved to device/dtype) if given, else randn(shape)."""
        if x_init is not None:
            if tuple(x_init.shape) != tuple(shape):
                raise ValueError(f"x_init shape {tuple(x_init.shape)} differs from shape {tuple(shape)}")
            return x_init.to(device=device or x_init.device, dtype=dtype or x_init.dtype).clone()
        if device is None:
            tensors = [v for v in model_inputs.values() if isinstance(v, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype or torch.float32)

    def _predict(
        self,
        model: Callable[..., torch.Tensor],
        x: torch.Tensor,
        logsnr: torch.Tensor,
        cond: Mapping[str, Any],
        uncond: Mapping[str, Any],
        scale: float | None,
        rho: float,
    ) -> torch.Tensor:
        """One model evaluation, with batched classifier-free guidance unless `scale` is None or 1."""
        noise_cond = self.noise_cond(logsnr).expand(x.shape[0])
        if scale is None or scale == 1:
            return model(x, noise_cond, **cond)
        inputs = concat_inputs(dict(cond), dict(uncond))
        out = model(torch.cat([x, x]), torch.cat([noise_cond, noise_cond]), **inputs)
        pred_cond, pred_uncond = out.chunk(2)
        return guide(pred_cond, pred_uncond, scale, rho)


def stage_gdf(
    adaptive: bool = False, offset_noise: float = 0.0, *, precision: torch.dtype = torch.float32
) -> GDF:
    """The GDF used by every Stable Cascade trainer and sampler.

    Cosine schedule (s=0.008, ᾱ ∈ [1e-4, 0.9999]), VP scaler, ε target, CosineT noise cond, and the adaptive
    loss weight if `adaptive` else P2 (k=1, γ=1 → sigmoid(−λ)).

    Args:
        adaptive: Use `AdaptiveLossWeight` instead of `P2LossWeight`.
        offset_noise: Std of the offset noise (ControlNet inpainting / SR configs use 0.1).
        precision: Dtype of the schedule and noise-cond maths: float32 (default, bit-identical to the official
            GDF) or float64.
    """
    return GDF(
        schedule=CosineSchedule(s=0.008, clamp_range=(1e-4, 0.9999), precision=precision),
        input_scaler=VPScaler(),
        target=EpsilonTarget(),
        noise_cond=CosineTNoiseCond(s=0.008, clamp_range=(0.0, 1.0), precision=precision),
        loss_weight=AdaptiveLossWeight() if adaptive else P2LossWeight(),
        offset_noise=offset_noise,
    )
