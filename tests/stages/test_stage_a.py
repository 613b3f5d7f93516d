"""Stage A (VQGAN): released key layout and counts, latent contract, scaling, diffusers parity, safetensors."""

from __future__ import annotations

import dataclasses

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel

from stages.stage_a import COMMITMENT_BETA, FLAVORS, ResBlockA, StageA, StageAConfig, StageAEncoding

BN_BUFFERS = {f"down_blocks.3.1.{n}" for n in ("running_mean", "running_var", "num_batches_tracked")}


def _paella(config: StageAConfig) -> PaellaVQModel:
    return PaellaVQModel(
        up_down_scale_factor=2,
        levels=config.levels,
        bottleneck_blocks=config.bottleneck_blocks,
        embed_dim=config.c_hidden,
        latent_channels=config.c_latent,
        num_vq_embeddings=config.codebook_size,
        scale_factor=config.scale_factor,
    )


def _to_official(diffusers_key: str) -> str:
    return diffusers_key.replace("vquantizer.embedding.", "vquantizer.codebook.")


def _randomize_(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every parameter and BN statistic non-trivial values (gammas included), reproducibly.

    Weights are fan-in scaled so activations stay O(1) and a 1e-5 tolerance is a meaningful check.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=gen)

    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
            elif name.endswith("gammas"):
                tensor.copy_(randn(tensor.shape) * 0.5)
            elif tensor.ndim >= 2:
                tensor.copy_(randn(tensor.shape) * (tensor[0].numel() ** -0.5))
            elif name.endswith("weight"):  # 1-D weight: the latent BatchNorm's scale
                tensor.copy_(1 + 0.1 * randn(tensor.shape))
            else:
                tensor.copy_(randn(tensor.shape) * 0.1)


def _astronaut(size_px: int) -> torch.Tensor:
    image = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return F.interpolate(image, size=(size_px, size_px), mode="bilinear", antialias=True).clamp(0, 1)


def _tiny(seed: int = 1) -> StageA:
    model = StageA(FLAVORS["stage_a/tiny"]).eval()
    _randomize_(model, seed)
    return model


def test_released_flavor_counts_and_keys_on_meta():
    with torch.device("meta"):
        model = StageA(FLAVORS["stage_a"])
        tiny = StageA(FLAVORS["stage_a/tiny"])
        paella = _paella(FLAVORS["stage_a"])
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 18_406_894
    assert len(list(model.parameters())) == 119
    assert len(state) == 122
    assert set(state) - {n for n, _ in model.named_parameters()} == BN_BUFFERS
    assert state["vquantizer.codebook.weight"].shape == (8192, 4)
    assert state["down_blocks.3.0.weight"].shape == (4, 384, 1, 1)
    assert "down_blocks.3.0.bias" not in state
    assert {k.split(".")[1] for k in state if k.startswith("up_blocks.")} == {str(i) for i in range(15)}
    assert state["up_blocks.13.weight"].shape == (384, 192, 4, 4)  # ConvTranspose 384→192
    expected = {_to_official(k): v.shape for k, v in paella.state_dict().items()}
    assert {k: v.shape for k, v in state.items()} == expected
    assert set(tiny.state_dict()) == set(state)
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000


def test_tiny_encode_decode_shapes():
    model = _tiny()
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        latents = model.encode(images)
        assert latents.shape == (2, 4, 16, 24)
        assert model.decode(latents).shape == (2, 3, 64, 96)
        assert model(images).shape == (2, 3, 64, 96)


def test_scale_factor_round_trip():
    model = _tiny()
    images = _astronaut(64)
    with torch.no_grad():
        raw = model.encode_unscaled(images)
        scaled = model.encode(images)
        torch.testing.assert_close(scaled, raw / 0.43, rtol=0, atol=0)
        assert not torch.allclose(scaled, raw)
        via_scaled = model.decode(scaled)
        torch.testing.assert_close(via_scaled, model.decode_unscaled(raw), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model(images), via_scaled, rtol=0, atol=0)
        # decode multiplies by the scale factor before the decoder, and that matters
        z = torch.randn(1, 4, 16, 16)
        torch.testing.assert_close(model.decode(z), model.decode_unscaled(z * 0.43), rtol=0, atol=0)
        assert (model.decode(z) - model.decode_unscaled(z)).abs().max() > 1e-3


def test_fresh_resblock_is_identity_and_gammas_modulate():
    block = ResBlockA(8, 32)
    x = torch.randn(2, 8, 5, 7)
    torch.testing.assert_close(block(x), x, rtol=0, atol=0)
    with torch.no_grad():
        block.gammas.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]))
    assert (block(x) - x).abs().max() > 1e-3


def test_quantize_snaps_to_nearest_codebook_row():
    model = _tiny()
    codebook = model.vquantizer.codebook.weight.detach()
    raw = codebook[torch.tensor([[3, 17], [5, 63]])].permute(2, 0, 1)[None] + 1e-4  # 1×4×2×2
    quantized, indices = model.quantize(raw)
    assert indices.tolist() == [[[3, 17], [5, 63]]]
    torch.testing.assert_close(quantized, codebook[indices].permute(0, 3, 1, 2))
    z = torch.randn(1, 4, 3, 3)
    _, idx = model.quantize(z)
    brute = ((z.permute(0, 2, 3, 1)[..., None, :] - codebook) ** 2).sum(-1).argmin(-1)
    assert torch.equal(idx, brute)


def test_encode_quantize_returns_official_tuple():
    model = _tiny()
    images = _astronaut(64)[:, :, :, :48].repeat(2, 1, 1, 1)
    images[1] = images[1].flip(-1)
    codebook = model.vquantizer.codebook.weight.detach()
    with torch.no_grad():
        default = model.encode(images)
        out = model.encode(images, quantize=True)
    assert isinstance(default, torch.Tensor) and isinstance(out, StageAEncoding)
    latent, raw, indices, vq_loss = out  # tuple-compatible, official order
    assert (
        latent.shape == raw.shape == (2, 4, 16, 12) and indices.shape == (2, 16, 12) and vq_loss.shape == ()
    )
    assert indices.dtype == torch.long
    # The unquantized member is exactly the default encode (which is unchanged: raw bottleneck / 0.43).
    torch.testing.assert_close(raw, default, rtol=0, atol=0)
    torch.testing.assert_close(default, model.encode_unscaled(images) / 0.43, rtol=0, atol=0)
    # The quantized latent is exactly a codebook row per pixel, scaled.
    rows = codebook[indices].permute(0, 3, 1, 2)
    torch.testing.assert_close(latent, rows / 0.43, rtol=0, atol=0)
    # Indices minimise the squared distance of the unscaled latent to the codebook (brute force in float64).
    z = (raw * 0.43).double().permute(0, 2, 3, 1)
    dist = ((z[..., None, :] - codebook.double()) ** 2).sum(-1)
    assert torch.equal(indices, dist.argmin(-1))
    assert len(indices.unique()) > 1
    # VQ loss = ‖sg[z] − e‖² + β‖z − sg[e]‖² = (1 + β)·mse(e, z) in value, β = 0.25 by default.
    mse = F.mse_loss(rows, raw * 0.43)
    assert COMMITMENT_BETA == 0.25
    torch.testing.assert_close(vq_loss, 1.25 * mse, rtol=1e-5, atol=0)
    with torch.no_grad():
        beta1 = model.encode(images, quantize=True, commitment_beta=1.0).vq_loss
    torch.testing.assert_close(beta1, 2 * mse, rtol=1e-5, atol=0)
    assert model.encode(images, quantize=False).shape == default.shape


def test_vq_loss_gradients_split_between_codebook_and_encoder():
    model = _tiny()
    z = torch.randn(1, 4, 3, 5, requires_grad=True)
    quantized, indices = model.quantize(z)
    # Straight-through: the quantized output passes gradients to z unchanged, none to the codebook.
    quantized.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    assert model.vquantizer.codebook.weight.grad is None
    z.grad = None
    loss = model.vquantizer.loss(z, indices, beta=0.25)
    loss.backward()
    rows = model.vquantizer.codebook.weight.detach()[indices].permute(0, 3, 1, 2)
    n = z.numel()
    # d/dz of β‖z − sg[e]‖² and d/de of ‖sg[z] − e‖² (each a mean over all elements).
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z.detach() - rows) / n)
    grad_rows = model.vquantizer.codebook.weight.grad[indices].permute(0, 3, 1, 2)
    used = torch.zeros(model.config.codebook_size, dtype=torch.bool)
    used[indices.flatten()] = True
    assert bool((model.vquantizer.codebook.weight.grad[~used] == 0).all())
    if len(indices.unique()) == indices.numel():  # no shared rows: per-pixel gradient is exact
        torch.testing.assert_close(grad_rows, 2 * (rows - z.detach()) / n)


def test_quantize_matches_diffusers_vector_quantizer():
    config = FLAVORS["stage_a/tiny"]
    paella = _paella(config).eval()
    _randomize_(paella, seed=5)
    model = StageA(config).eval()
    model.load_state_dict({_to_official(k): v for k, v in paella.state_dict().items()}, strict=True)
    z = torch.randn(2, 4, 6, 7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs_q, theirs_loss, (_, _, theirs_idx) = paella.vquantizer(z)
        ours_q, ours_idx = model.quantize(z)
        ours_loss = model.vquantizer.loss(z, ours_idx)
    assert torch.equal(ours_idx.flatten(), theirs_idx.flatten())
    torch.testing.assert_close(ours_q, theirs_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize(("flavor", "size_px"), [("stage_a/tiny", 128), ("stage_a", 64)])
def test_parity_with_diffusers_paella(flavor: str, size_px: int):
    config = FLAVORS[flavor]
    paella = _paella(config).eval()
    _randomize_(paella, seed=3)
    model = StageA(config).eval()
    model.load_state_dict({_to_official(k): v for k, v in paella.state_dict().items()}, strict=True)
    images = _astronaut(size_px)
    with torch.no_grad():
        ours_raw = model.encode_unscaled(images)
        theirs_raw = paella.encode(images).latents
        assert ours_raw.std() > 0.1
        assert (ours_raw - theirs_raw).abs().max() <= 1e-5
        torch.testing.assert_close(model.encode(images), theirs_raw / config.scale_factor)
        ours_img = model.decode_unscaled(theirs_raw)
        theirs_img = paella.decode(theirs_raw, force_not_quantize=True).sample
        assert ours_img.std() > 0.1
        assert (ours_img - theirs_img).abs().max() <= 1e-5
        # diffusers' pipeline convention: decode(latents · scale_factor) with our scaled latents
        scaled = model.encode(images)
        theirs_pipeline = paella.decode(scaled * config.scale_factor, force_not_quantize=True).sample
        assert (model.decode(scaled) - theirs_pipeline).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("field", "value"),
    [("levels", 0), ("c_hidden", 31), ("codebook_size", -1), ("scale_factor", 0.0), ("c_latent", 2.5)],
)
def test_config_validation_names_the_field(field: str, value: object):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(FLAVORS["stage_a"], **{field: value})
