"""Tests for stages.gdf: schedule, inverses, loss weights, samplers, pyramid noise and GDF.sample."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stages.gdf import (
    GDF,
    AdaptiveLossWeight,
    CosineSchedule,
    CosineTNoiseCond,
    DDIMSampler,
    DDPMSampler,
    EpsilonTarget,
    LCMSampler,
    P2LossWeight,
    VPScaler,
    VTarget,
    X0Target,
    concat_inputs,
    pyramid_noise,
    stage_gdf,
)

LIMIT = math.log(0.9999 / 0.0001)  # ≈ 9.2102
# In float32 (the official precision) 1 − 0.9999 loses digits: the upper limit is 9.210074, not 9.210240.
LIMIT_TOL = 2e-4


def _gen(seed: int, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _eps_oracle(gdf: GDF, x0: torch.Tensor, calls: list | None = None):
    """Toy model: the true ε of a known x0, recovered from x_t and the noise cond r."""

    def model(x: torch.Tensor, r: torch.Tensor, **inputs) -> torch.Tensor:
        if calls is not None:
            calls.append((x.shape[0], r.clone(), inputs))
        half = x.shape[0] // x0.shape[0]
        logsnr = gdf.noise_cond.logsnr(r.double())
        a, b = (v.view(-1, 1, 1, 1) for v in gdf.input_scaler(logsnr))
        return ((x.double() - a * x0.double().repeat(half, 1, 1, 1)) / b).to(x.dtype)

    return model


def _linear_model(
    x: torch.Tensor, r: torch.Tensor, clip: torch.Tensor, cnet: list | None = None
) -> torch.Tensor:
    """Toy conditional model: depends on x, r and a per-sample embedding."""
    out = 0.5 * x + clip.view(-1, 1, 1, 1) * r.view(-1, 1, 1, 1)
    if cnet is not None:
        out = out + sum(c for c in cnet if c is not None)
    return out


# ---------------------------------------------------------------- schedule / noise cond / scaler


def test_cosine_schedule_limits_are_plus_minus_9_2102():
    schedule = CosineSchedule()
    lo, hi = schedule.limits
    assert lo == pytest.approx(-9.2102, abs=1e-4) and hi == pytest.approx(9.2102, abs=LIMIT_TOL)
    ends = schedule(torch.tensor([0.0, 1.0]))
    assert torch.allclose(ends, torch.tensor([LIMIT, -LIMIT]), atol=LIMIT_TOL)
    assert ends.dtype == torch.float32
    lo64, hi64 = CosineSchedule(precision=torch.float64).limits
    assert lo64 == pytest.approx(-LIMIT, abs=1e-12) and hi64 == pytest.approx(LIMIT, abs=1e-12)


def test_cosine_schedule_training_draws_are_in_range_and_seeded():
    schedule = CosineSchedule()
    a, b = schedule(64, generator=_gen(1)), schedule(64, generator=_gen(1))
    assert a.shape == (64,) and torch.equal(a, b)
    assert bool((a >= -LIMIT - 1e-5).all()) and bool((a <= schedule(torch.tensor(0.001)) + 1e-5).all())


def test_shift_adds_two_log_inverse_shift_away_from_clamp():
    schedule = CosineSchedule()
    t = torch.linspace(0.2, 0.8, 7, dtype=torch.float64)
    for shift in (2.0, 0.5, 4.0):
        delta = schedule(t, shift) - schedule(t)
        assert torch.allclose(delta, torch.full_like(t, 2 * math.log(1 / shift)), atol=1e-9)
    # Near the ends the shifted value is clamped to the limits.
    assert schedule(torch.tensor([1.0]), 2.0).item() == pytest.approx(-LIMIT, abs=1e-5)
    assert schedule(torch.tensor([0.0]), 0.5).item() == schedule.limits[1]
    assert torch.allclose(schedule.t_from_logsnr(schedule(t, 2.0), 2.0), t, atol=1e-9)


def test_cosine_t_noise_cond_round_trips():
    cond = CosineTNoiseCond()
    logsnr = torch.linspace(-9.0, 9.0, 101, dtype=torch.float64)
    assert torch.allclose(cond.logsnr(cond(logsnr)), logsnr, atol=1e-5)
    r = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    assert torch.allclose(cond(cond.logsnr(r)), r, atol=1e-5)
    # The noise cond inverts the schedule: the model receives t itself (away from the clamps).
    schedule = CosineSchedule()
    t = torch.linspace(0.05, 0.95, 19)
    assert torch.allclose(cond(schedule(t)), t, atol=1e-5)


def test_vp_scaler_is_variance_preserving():
    logsnr = torch.linspace(-10, 10, 41)
    a, b = VPScaler()(logsnr)
    assert torch.allclose(a**2 + b**2, torch.ones_like(a), atol=1e-6)
    assert torch.allclose(torch.log(a**2 / b**2), logsnr, atol=1e-4)


# ---------------------------------------------------------------- loss weights


def test_p2_weight_equals_sigmoid_of_minus_logsnr():
    logsnr = torch.linspace(-9.2, 9.2, 57)
    weight = P2LossWeight()
    assert torch.allclose(weight(logsnr), torch.sigmoid(-logsnr), rtol=1e-5, atol=1e-7)
    # loss_shift adds 2·ln(shift) (the opposite sign of the schedule's shift).
    shifted = weight(logsnr, shift=2.0)
    assert torch.allclose(shifted, torch.sigmoid(-(logsnr + 2 * math.log(2.0))), rtol=1e-5, atol=1e-7)
    # s scales the logSNR: w = (k + e^(s·λ))^(−γ).
    general = P2LossWeight(k=0.5, gamma=2.0, s=3.0)(logsnr.double())
    assert torch.allclose(general, (0.5 + (3.0 * logsnr.double()).exp()) ** -2.0, rtol=1e-9)


def test_adaptive_loss_weight_update_and_state_round_trip():
    weight = AdaptiveLossWeight()
    assert len(weight.bucket_ranges) == 299 and len(weight.bucket_losses) == 300
    logsnr = torch.tensor([0.01, 0.02, -5.0, 8.0])
    assert torch.equal(weight(logsnr), torch.ones(4))
    weight.update_buckets(logsnr, torch.tensor([2.0, 4.0, 0.5, 1.0]), beta=0.9)
    # 0.01 and 0.02 share a bucket: EMA with their mean (3.0).
    expected = torch.tensor([1 / (0.9 + 0.1 * 3.0), 1 / (0.9 + 0.1 * 3.0), 1 / (0.9 + 0.1 * 0.5), 1.0])
    assert torch.allclose(weight(logsnr), expected, rtol=1e-6)
    for _ in range(5):
        weight.update_buckets(torch.randn(32) * 4, torch.rand(32) * 3)

    state = json.loads(json.dumps(weight.state_dict()))
    assert set(state) == {"bucket_ranges", "bucket_losses"}
    restored = AdaptiveLossWeight()
    restored.load_state_dict(state)
    probe = torch.linspace(-12, 12, 1001)
    assert torch.equal(restored(probe), weight(probe))
    assert torch.equal(restored.bucket_losses, weight.bucket_losses)
    with pytest.raises(ValueError, match="bucket_losses"):
        restored.load_state_dict({"bucket_ranges": [0.0, 1.0], "bucket_losses": [1.0]})


def test_adaptive_weight_is_clamped():
    weight = AdaptiveLossWeight(weight_range=(0.5, 2.0))
    weight.bucket_losses[:] = 1e-3
    assert torch.equal(weight(torch.tensor([0.0])), torch.tensor([2.0]))


# ---------------------------------------------------------------- samplers


def _scales(logsnr: float) -> tuple[torch.Tensor, torch.Tensor]:
    return VPScaler()(torch.tensor(logsnr, dtype=torch.float64))


def test_ddim_eta_one_is_the_ddpm_posterior():
    x0, eps, z = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=_gen(s)) for s in (1, 2, 3))
    a, b = _scales(-1.0)
    a_prev, b_prev = _scales(0.5)
    x = a * x0 + b * eps
    ddim = DDIMSampler(eta=1.0).step(x, x0, eps, a, b, a_prev, b_prev, noise=z)
    ddpm = DDPMSampler().step(x, x0, eps, a, b, a_prev, b_prev, noise=z)
    assert torch.equal(ddim, ddpm)
    # Closed-form q(x_prev | x_t, x0) (Ho et al. 2020, eq. 6-7): a_ts = a/a_prev, b_ts² = b² − a_ts²·b_prev².
    a_ts = a / a_prev
    b_ts2 = b**2 - a_ts**2 * b_prev**2
    mean = a_prev * b_ts2 / b**2 * x0 + a_ts * b_prev**2 / b**2 * x
    std = torch.sqrt(b_ts2 * b_prev**2 / b**2)
    assert torch.allclose(ddpm, mean + std * z, atol=1e-12)
    # Same generator seed gives the same draw.
    g1 = DDPMSampler().step(x, x0, eps, a, b, a_prev, b_prev, generator=_gen(7))
    g2 = DDPMSampler().step(x, x0, eps, a, b, a_prev, b_prev, generator=_gen(7))
    assert torch.equal(g1, g2) and not torch.allclose(g1, ddpm)


def test_ddim_eta_zero_is_deterministic_and_exact_with_perfect_eps():
    gdf = stage_gdf()
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=_gen(0))
    eps = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=_gen(1))
    x_init = gdf.diffuse(x0, epsilon=eps, t=1.0).noised

    def run(seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        torch.manual_seed(seed)
        steps = gdf.sample(
            lambda x, r: eps, {}, x0.shape, sampler=DDIMSampler(0.0), x_init=x_init, cfg=None, timesteps=10
        )
        return list(steps)

    first, second = run(0), run(123)
    r = torch.linspace(1.0, 0.0, 11)
    logsnr = gdf.schedule(r).double()
    for i, ((x0_hat, x, _), (x0_b, x_b, _)) in enumerate(zip(first, second, strict=True)):
        assert torch.equal(x, x_b) and torch.equal(x0_hat, x0_b)
        assert torch.allclose(x0_hat, x0, atol=1e-9)
        a, b = _scales(logsnr[i + 1].item())
        assert torch.allclose(x, a * x0 + b * eps, atol=1e-9)


def test_lcm_step_renoises_x0_with_fresh_noise():
    x0, eps, x, z = (torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=_gen(s)) for s in (1, 2, 3, 4))
    a, b = _scales(-1.0)
    a_prev, b_prev = _scales(0.5)
    lcm = LCMSampler()
    # x_prev = a_prev·x̂0 + b_prev·z: x_t and ε̂ play no part.
    step = lcm.step(x, x0, eps, a, b, a_prev, b_prev, noise=z)
    assert torch.equal(step, a_prev * x0 + b_prev * z)
    assert torch.equal(lcm.step(x * 3, x0, eps * 5, a, b, a_prev, b_prev, noise=z), step)
    # Drawn noise: seeded, and (x_prev − a_prev·x̂0)/b_prev ~ N(0, 1).
    big_x0 = torch.randn(4, 4, 64, 64, generator=_gen(5))
    g1 = lcm.step(big_x0, big_x0, big_x0, a, b, a_prev, b_prev, generator=_gen(7))
    g2 = lcm.step(big_x0, big_x0, big_x0, a, b, a_prev, b_prev, generator=_gen(7))
    assert torch.equal(g1, g2) and g1.dtype == torch.float32
    noise = (g1.double() - a_prev * big_x0.double()) / b_prev
    assert abs(noise.mean().item()) < 0.02 and noise.std().item() == pytest.approx(1.0, abs=0.02)
    assert abs(torch.corrcoef(torch.stack([noise.flatten(), big_x0.double().flatten()]))[0, 1].item()) < 0.02


def test_lcm_sampling_with_perfect_x0_predictor_returns_x0():
    gdf = GDF(stage_gdf().schedule, VPScaler(), X0Target(), CosineTNoiseCond(), P2LossWeight())
    x0 = torch.randn(2, 4, 8, 8, generator=_gen(0))
    steps = list(
        gdf.sample(
            lambda x, r: x0, {}, x0.shape, sampler=LCMSampler(), timesteps=4, cfg=None, generator=_gen(1)
        )
    )
    assert len(steps) == 4
    for x0_hat, _, _ in steps:
        assert torch.allclose(x0_hat, x0, atol=1e-5)
    # Every step re-noises, the last one too: t = 0 has b_prev = √σ(−λ_max) ≈ 0.01 with the clamped schedule.
    a_end, b_end = gdf.input_scaler(gdf.schedule(torch.tensor(0.0)))
    residual = (steps[-1][1] - a_end * x0) / b_end
    assert residual.std().item() == pytest.approx(1.0, abs=0.2)
    assert torch.allclose(steps[-1][1], x0, atol=0.06)
    # Intermediate states are a_prev·x0 + b_prev·z at the next logSNR.
    logsnr = gdf.schedule(torch.linspace(1.0, 0.0, 5))
    for i, (_, x, _) in enumerate(steps):
        a, b = gdf.input_scaler(logsnr[i + 1])
        z = (x - a * x0) / b
        assert z.std().item() == pytest.approx(1.0, abs=0.2)


# ---------------------------------------------------------------- diffuse / undiffuse / pyramid


@pytest.mark.parametrize("target", [EpsilonTarget(), X0Target(), VTarget()], ids=["eps", "x0", "v"])
def test_diffuse_undiffuse_round_trip(target):
    gdf = GDF(CosineSchedule(), VPScaler(), target, CosineTNoiseCond(), P2LossWeight())
    x0 = torch.randn(8, 4, 6, 6, dtype=torch.float64, generator=_gen(0))
    d = gdf.diffuse(x0, generator=_gen(1))
    assert d.noised.shape == x0.shape and d.logSNR.shape == (8,) and d.loss_weight.shape == (8,)
    assert torch.allclose(d.loss_weight, torch.sigmoid(-d.logSNR), rtol=1e-5)
    x0_hat, eps_hat = gdf.undiffuse(d.noised, d.logSNR, d.target)
    assert torch.allclose(x0_hat, x0, atol=1e-6) and torch.allclose(eps_hat, d.epsilon, atol=1e-6)
    again = gdf.diffuse(x0, generator=_gen(1))
    assert torch.equal(again.noised, d.noised) and torch.equal(again.logSNR, d.logSNR)


def test_diffuse_offset_noise_is_constant_per_channel():
    gdf = stage_gdf(offset_noise=0.1)
    d = gdf.diffuse(torch.zeros(3, 4, 5, 5), epsilon=torch.zeros(3, 4, 5, 5), t=0.5, generator=_gen(0))
    assert torch.equal(d.epsilon, d.epsilon[..., :1, :1].expand_as(d.epsilon))
    assert d.epsilon.abs().max() > 0
    assert torch.allclose(d.noise_cond, torch.full((3,), 0.5), atol=1e-5)


def test_pyramid_noise_shape_std_and_determinism():
    eps = torch.randn(2, 4, 256, 256, generator=_gen(0))
    noise = pyramid_noise(eps, generator=_gen(1))
    assert noise.shape == eps.shape and noise.dtype == eps.dtype
    assert noise.std().item() == pytest.approx(1.0, abs=0.1)
    assert torch.equal(noise, pyramid_noise(eps, generator=_gen(1)))
    assert not torch.equal(noise, pyramid_noise(eps, generator=_gen(2)))
    # Octave sizes 128..2 with levels=10: none lies in (1000, 2000), so only the base remains.
    assert torch.equal(pyramid_noise(eps, size_range=(1000, 2000), generator=_gen(1)), eps)
    # One octave (size 16 = 256 / 2^4, weight 0.75^4) is constant on 16×16 tiles.
    only16 = pyramid_noise(eps, size_range=(16, 16), generator=_gen(1))
    m = 0.75**4
    octave = (only16 * math.sqrt(1 + m * m) - eps) / m
    assert torch.allclose(octave[..., :16, :16], octave[..., :1, :1].expand(2, 4, 16, 16), atol=1e-4)


# ---------------------------------------------------------------- sample()


def test_sample_with_true_eps_model_recovers_x0():
    gdf = stage_gdf()
    x0 = torch.randn(2, 4, 8, 8, generator=_gen(0))
    steps = list(gdf.sample(_eps_oracle(gdf, x0), {}, x0.shape, timesteps=20, cfg=None, generator=_gen(1)))
    assert len(steps) == 20
    x0_hat, x, _ = steps[-1]
    assert torch.allclose(x0_hat, x0, atol=1e-3)
    assert torch.allclose(x, x0, atol=0.05)


def test_sample_cfg_one_ignores_unconditional_inputs():
    gdf = stage_gdf()
    cond = {"clip": torch.tensor([1.0, -2.0])}
    kwargs = {"timesteps": 4, "cfg_rho": 0.7}
    plain = list(gdf.sample(_linear_model, cond, (2, 3, 4, 4), cfg=None, generator=_gen(0), **kwargs))
    uncond = {"clip": torch.tensor([5.0, 6.0])}
    one = list(gdf.sample(_linear_model, cond, (2, 3, 4, 4), uncond, cfg=1.0, generator=_gen(0), **kwargs))
    for (a0, ax, ap), (b0, bx, bp) in zip(plain, one, strict=True):
        assert torch.equal(a0, b0) and torch.equal(ax, bx) and torch.equal(ap, bp)


def test_sample_cfg_rho_zero_is_plain_lerp_and_rho_rescales():
    gdf = stage_gdf()
    cond, uncond = {"clip": torch.tensor([1.0, -2.0])}, {"clip": torch.tensor([0.3, 0.1])}
    x_init = torch.randn(2, 3, 4, 4, generator=_gen(0))
    r = gdf.noise_cond(gdf.schedule(torch.tensor([1.0]))).expand(2)
    pred_c, pred_u = _linear_model(x_init, r, **cond), _linear_model(x_init, r, **uncond)
    lerp = pred_u + 4.0 * (pred_c - pred_u)
    for rho in (0.0, 0.7):
        steps = gdf.sample(
            _linear_model, cond, x_init.shape, uncond, timesteps=1, x_init=x_init, cfg=4.0, cfg_rho=rho
        )
        _, _, pred = next(iter(steps))
        expected = lerp if rho == 0 else rho * lerp * pred_c.std() / lerp.std() + (1 - rho) * lerp
        assert torch.allclose(pred, expected, atol=1e-5)


def test_sample_batches_cfg_with_list_inputs_and_respects_window():
    gdf = stage_gdf()
    calls: list = []
    x0 = torch.randn(2, 3, 4, 4, generator=_gen(0))
    cnet = [torch.ones(2, 3, 4, 4), None]
    steps = gdf.sample(
        _eps_oracle(gdf, x0, calls), {"cnet": cnet}, x0.shape, timesteps=10, cfg=(5.0, 1.5), cfg_t_stop=0.45
    )
    list(steps)
    assert [c[0] for c in calls] == [4] * 6 + [2] * 4  # r = 1.0 … 0.5 guided, 0.4 … 0.1 not
    batched = calls[0][2]["cnet"]
    assert batched[1] is None and torch.equal(
        batched[0], torch.cat([torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)])
    )
    assert calls[-1][2]["cnet"] is cnet
    with pytest.raises(ValueError, match="cannot batch"):
        concat_inputs({"x": torch.ones(1)}, {"x": None})


def test_sample_is_deterministic_under_a_seed():
    gdf = stage_gdf()
    cond = {"clip": torch.tensor([1.0, -2.0])}

    def final(seed: int) -> torch.Tensor:
        return list(gdf.sample(_linear_model, cond, (2, 3, 4, 4), timesteps=5, generator=_gen(seed)))[-1][0]

    assert torch.equal(final(3), final(3))
    assert not torch.equal(final(3), final(4))


def test_sample_img2img_from_t_0_8_with_16_steps():
    gdf = stage_gdf()
    calls: list = []
    x0 = torch.randn(2, 4, 8, 8, generator=_gen(0))
    x_init = gdf.diffuse(x0, t=0.8, generator=_gen(1)).noised
    model = _eps_oracle(gdf, x0, calls)
    steps = list(
        gdf.sample(model, {}, x0.shape, t_start=0.8, timesteps=16, x_init=x_init, cfg=4.0, shift=2.0)
    )
    assert len(steps) == 16 and len(calls) == 16
    # With shift 2 the model receives the t of the shifted logSNR, which is noisier than 0.8.
    shifted_r = gdf.noise_cond(gdf.schedule(torch.tensor([0.8]), 2.0))
    assert torch.allclose(calls[0][1], shifted_r.expand(4), atol=1e-6) and shifted_r.item() > 0.8
    assert torch.allclose(steps[-1][0], x0, atol=1e-3)
    with pytest.raises(ValueError, match="x_init shape"):
        next(iter(gdf.sample(model, {}, (1, 4, 8, 8), x_init=x_init)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gdf_on_cuda_matches_cpu_in_bfloat16():
    gdf = stage_gdf()
    x0 = torch.randn(2, 4, 8, 8, generator=_gen(0))
    eps = torch.randn(2, 4, 8, 8, generator=_gen(1))
    cpu = gdf.diffuse(x0, epsilon=eps, t=torch.tensor([0.3, 0.7]))
    gpu = gdf.diffuse(x0.cuda().bfloat16(), epsilon=eps.cuda().bfloat16(), t=torch.tensor([0.3, 0.7]).cuda())
    assert gpu.noised.dtype == torch.bfloat16 and gpu.logSNR.dtype == torch.float32
    assert torch.allclose(gpu.noised.float().cpu(), cpu.noised, atol=5e-2)
    model = _eps_oracle(gdf, x0.cuda())
    steps = list(gdf.sample(model, {}, x0.shape, cfg=None, generator=_gen(2, "cuda"), device="cuda"))
    assert steps[-1][0].device.type == "cuda"
    assert torch.allclose(steps[-1][0].cpu(), x0, atol=1e-3)
    pyr = pyramid_noise(eps.cuda().bfloat16(), generator=_gen(3, "cuda"))
    assert pyr.shape == eps.shape and pyr.dtype == torch.bfloat16
