"""Bit-level fidelity of stages.gdf to the official GDF (reference/stable-cascade.md §2).

The official formulas are written out below operation by operation, in the precision the official code runs in
(float32: torch's default dtype; `s` is held as a float32 tensor, the shift constants come from numpy in float64).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.gdf import (
    AdaptiveLossWeight,
    CosineSchedule,
    CosineTNoiseCond,
    P2LossWeight,
    loss_shift_logsnr,
    sample_t,
    shift_logsnr,
    stage_gdf,
)
from stages.gdf.schedules import cosine_constants, cosine_min_var

S = 0.008
CLAMP = (1e-4, 0.9999)


def _official_logsnr(t: torch.Tensor, shift: float = 1.0, limits: list[float] | None = None) -> torch.Tensor:
    """Official CosineSchedule + BaseSchedule.__call__, float32 torch ops in the official order."""
    s = torch.tensor([S])  # float32 tensor
    min_var = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    t = t.clamp(0, 1)
    var = torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var
    var = var.clamp(*CLAMP)
    logsnr = (var / (1 - var)).log()
    if shift != 1:
        logsnr += 2 * np.log(1 / shift)
    if limits is not None:
        logsnr = logsnr.clamp(*limits)
    return logsnr


def _official_limits() -> list[float]:
    """Official `reset_limits()`: the unclamped schedule at t = [1, 0] as Python floats."""
    return _official_logsnr(torch.tensor([1.0, 0.0])).tolist()


def _official_noise_cond(logsnr: torch.Tensor) -> torch.Tensor:
    """Official CosineTNoiseCond(s=0.008, clamp_range=[0, 1]) in float32."""
    s = torch.tensor([S])
    min_var = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    var = logsnr.sigmoid().clamp(0, 1)
    t = (((var * min_var) ** 0.5).acos() / (torch.pi * 0.5)) * (1 + s) - s
    return t.clamp(0, 1)


def _official_loss_shift(logsnr: torch.Tensor, shift: float) -> torch.Tensor:
    """Official BaseLossWeight.__call__ shift: logSNR + 2·ln(shift)."""
    return logsnr if shift == 1 else logsnr.clone() + 2 * np.log(shift)


def _t_grid() -> torch.Tensor:
    fine = torch.linspace(0, 1, 100_001)
    draws = sample_t(4096, generator=torch.Generator().manual_seed(0))
    return torch.cat([fine, draws, torch.linspace(1.0, 0.0, 21)])


# ---------------------------------------------------------------- schedule


def test_min_var_normaliser_is_the_official_float32_value():
    official = torch.cos(torch.tensor([S]) / (1 + torch.tensor([S])) * torch.pi * 0.5) ** 2
    as_briefed = torch.cos(torch.tensor(S / (1 + S) * math.pi / 2)) ** 2  # Python-float argument, float32 cos
    s32, one_plus_s32, min_var32 = cosine_constants(S)
    assert s32.dtype == one_plus_s32.dtype == min_var32.dtype == torch.float32
    assert min_var32.item() == official.item() == as_briefed.item() == cosine_min_var(S)
    assert s32.item() == torch.tensor(S).item() and one_plus_s32.item() == (1 + torch.tensor(S)).item()
    _, _, min_var64 = cosine_constants(S, torch.float64)
    assert min_var64.item() == pytest.approx(math.cos(S / (1 + S) * math.pi / 2) ** 2, abs=1e-16)


def test_limits_equal_official_float32_limits():
    official = _official_limits()
    schedule = CosineSchedule()
    assert list(schedule.limits) == official
    assert official[0] == pytest.approx(-9.21024, abs=1e-5) and official[1] == pytest.approx(
        9.21007, abs=1e-5
    )


@pytest.mark.parametrize("shift", [1.0, 2.0, 0.5, 4.0])
def test_schedule_is_bit_identical_to_official_float32(shift: float):
    t = _t_grid()
    official = _official_logsnr(t, shift, _official_limits())
    ours = CosineSchedule()(t, shift)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, official), (ours - official).abs().max()


def test_training_draws_and_gdf_logsnr_match_official():
    gdf = stage_gdf()
    limits = _official_limits()
    drawn = gdf.schedule(512, generator=torch.Generator().manual_seed(3))
    t = sample_t(512, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, _official_logsnr(t, 1.0, limits))
    x0 = torch.randn(6, 4, 2, 2)
    t6 = torch.tensor([0.001, 0.1, 0.37, 0.5, 0.93, 1.0])
    d = gdf.diffuse(x0, t=t6, shift=2.0)
    assert torch.equal(d.logSNR, _official_logsnr(t6, 2.0, limits))
    assert torch.equal(d.noise_cond, _official_noise_cond(d.logSNR))


def test_float64_option_is_close_to_official():
    t = _t_grid().double()
    official = _official_logsnr(t.float(), 1.0, _official_limits()).double()
    schedule64 = CosineSchedule(precision=torch.float64)
    ours64 = schedule64(t)
    assert ours64.dtype == torch.float64 and not torch.equal(ours64, official)
    diff = (ours64 - official).abs()
    # Away from t ≈ 0 the two agree to < 2e-4 (float32 rounding of the cosine, amplified by logit) …
    assert diff[t >= 0.01].max() < 2e-4
    assert diff[t >= 0.05].max() < 5e-5
    # … near t = 0 float32 loses digits in 1 − ᾱ (ᾱ ≈ 0.9999): up to ~1e-3 (t ≈ 0.0023).
    assert 2e-4 < diff.max() < 1.5e-3
    # A float32 t through the float64 schedule gets the float64 result rounded to float32.
    assert torch.equal(schedule64(t.float()), schedule64(t.float().double()).float())
    with pytest.raises(ValueError, match="precision"):
        CosineSchedule(precision=torch.float16)


def test_float64_input_promotes_like_official():
    """Official float32 constants meet a float64 t: the maths runs in float64 with those constants."""
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    s = torch.tensor([S])
    min_var = torch.cos(s / (1 + s) * torch.pi * 0.5) ** 2
    var = (torch.cos((s + t) / (1 + s) * torch.pi * 0.5).clamp(0, 1) ** 2 / min_var).clamp(*CLAMP)
    official = (var / (1 - var)).log().clamp(*_official_limits())
    ours = CosineSchedule()(t)
    assert ours.dtype == torch.float64
    assert torch.equal(ours, official)


# ---------------------------------------------------------------- noise cond


def test_noise_cond_is_bit_identical_to_official_float32():
    logsnr = torch.cat([_official_logsnr(_t_grid(), 1.0, _official_limits()), torch.linspace(-15, 15, 3001)])
    ours = CosineTNoiseCond()(logsnr)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, _official_noise_cond(logsnr))
    ours64 = CosineTNoiseCond(precision=torch.float64)(logsnr.double())
    assert (ours64 - _official_noise_cond(logsnr).double()).abs().max() < 5e-6


def test_stage_gdf_precision_argument():
    default = stage_gdf()
    assert default.schedule.precision == default.noise_cond.precision == torch.float32
    precise = stage_gdf(True, 0.1, precision=torch.float64)
    assert precise.schedule.precision == precise.noise_cond.precision == torch.float64
    assert isinstance(precise.loss_weight, AdaptiveLossWeight) and precise.offset_noise == 0.1
    assert "precision=torch.float64" in repr(precise.schedule) and "precision" not in repr(default.schedule)


# ---------------------------------------------------------------- loss-weight shift


@pytest.mark.parametrize("shift", [2.0, 0.5])
def test_p2_loss_shift_matches_official(shift: float):
    logsnr = torch.linspace(-10, 10, 2001)
    ours = P2LossWeight()(logsnr, shift=shift)
    official = (1.0 + (_official_loss_shift(logsnr, shift) * 1.0).exp()) ** -1.0
    assert torch.equal(ours, official)
    # w = sigmoid(−(λ + 2·ln shift)) for the P2 defaults.
    assert torch.allclose(ours, torch.sigmoid(-(logsnr + 2 * math.log(shift))), rtol=1e-5, atol=1e-7)
    # The loss shift is the opposite of the schedule's shift (the bug this guards against differed by 0.6).
    wrong = torch.sigmoid(-shift_logsnr(logsnr, shift))
    assert (ours - wrong).abs().max() > 0.5
    general = P2LossWeight(k=0.5, gamma=2.0, s=3.0)(logsnr, shift=shift)
    assert torch.equal(general, (0.5 + (_official_loss_shift(logsnr, shift) * 3.0).exp()) ** -2.0)


@pytest.mark.parametrize("shift", [2.0, 0.5])
def test_adaptive_loss_shift_uses_bucket_of_shifted_logsnr(shift: float):
    weight = AdaptiveLossWeight()
    weight.bucket_losses = torch.linspace(0.2, 5.0, 300)
    logsnr = torch.linspace(-12, 12, 4001)
    shifted = _official_loss_shift(logsnr, shift)
    official = (1 / weight.bucket_losses[torch.searchsorted(weight.bucket_ranges, shifted)]).clamp(1e-7, 1e7)
    assert torch.equal(weight(logsnr, shift=shift), official)
    assert not torch.equal(weight(logsnr, shift=shift), weight(logsnr))


def test_loss_shift_helper_and_diffuse_loss_weight():
    logsnr = torch.tensor([-3.0, 0.0, 4.5])
    assert torch.equal(loss_shift_logsnr(logsnr, 1.0), logsnr)
    assert torch.allclose(loss_shift_logsnr(logsnr, 2.0), logsnr + 2 * math.log(2.0))
    assert torch.allclose(loss_shift_logsnr(logsnr, 2.0), shift_logsnr(logsnr, 0.5))
    with pytest.raises(ValueError, match="shift"):
        loss_shift_logsnr(logsnr, 0.0)
    gdf = stage_gdf()
    t = torch.tensor([0.2, 0.5, 0.8])
    d = gdf.diffuse(torch.zeros(3, 4, 2, 2), t=t, shift=1.0, loss_shift=2.0)
    expected = (1.0 + _official_loss_shift(_official_logsnr(t, 1.0, _official_limits()), 2.0).exp()) ** -1.0
    assert torch.equal(d.loss_weight, expected)
