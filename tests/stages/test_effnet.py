"""EfficientNetEncoder: released key layout and counts, shapes, frozen eval mode, normalisation, safetensors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchvision.models import efficientnet_v2_s

from stages.effnet import (
    FLAVORS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetEncoder,
    EffnetStage,
    imagenet_normalize,
)
from tests.helpers import randomize_bn_

MAPPER_KEYS = {
    "mapper.0.weight",
    "mapper.1.running_mean",
    "mapper.1.running_var",
    "mapper.1.num_batches_tracked",
}


def _tiny(seed: int = 1) -> EfficientNetEncoder:
    model = EfficientNetEncoder(FLAVORS["effnet/tiny"])
    randomize_bn_(model, seed)
    return model


def test_released_flavor_counts_and_keys_on_meta():
    with torch.device("meta"):
        model = EfficientNetEncoder(FLAVORS["effnet"])
        reference = efficientnet_v2_s(weights=None).features
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 20_197_968
    assert sum(p.numel() for p in model.backbone.parameters()) == 20_177_488
    assert sum(p.numel() for p in model.mapper.parameters()) == 20_480
    assert len(state) == 784
    assert {k for k in state if not k.startswith("backbone.")} == MAPPER_KEYS
    assert state["mapper.0.weight"].shape == (16, 1280, 1, 1)
    expected = {f"backbone.{k}": v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in state.items() if k.startswith("backbone.")} == expected


def test_tiny_flavor_is_small_with_the_same_top_level_layout():
    with torch.device("meta"):
        tiny = EfficientNetEncoder(FLAVORS["effnet/tiny"])
        full = EfficientNetEncoder(FLAVORS["effnet"])

    def top(model: torch.nn.Module) -> set[str]:
        return {".".join(k.split(".")[:2]) for k in model.state_dict()}

    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000
    assert top(tiny) == top(full) == {*(f"backbone.{i}" for i in range(8)), "mapper.0", "mapper.1"}


@pytest.mark.parametrize(("height", "width"), [(768, 768), (320, 192), (64, 96)])
def test_tiny_latent_shape_is_16_by_h32_by_w32(height: int, width: int):
    model = _tiny()
    with torch.no_grad():
        latents = model.encode(torch.rand(2, 3, height, width))
    assert latents.shape == (2, 16, height // 32, width // 32)
    assert torch.isfinite(latents).all()


def test_released_flavor_forward_on_small_input():
    model = EfficientNetEncoder(FLAVORS["effnet"])
    with torch.no_grad():
        latents = model.encode(torch.rand(1, 3, 64, 96))
    assert latents.shape == (1, 16, 2, 3)
    assert torch.isfinite(latents).all()


def test_released_backbone_computes_exactly_what_torchvision_computes():
    """Same weights in torchvision's efficientnet_v2_s(weights=None).features and in ours: same features."""
    reference = efficientnet_v2_s(weights=None).features.eval()
    randomize_bn_(reference, seed=3)
    ours = EfficientNetEncoder(FLAVORS["effnet"])
    ours.backbone.load_state_dict(reference.state_dict(), strict=True)
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours.backbone(x), reference(x))


def test_stays_in_eval_mode_and_keeps_bn_statistics():
    model = _tiny()
    assert not model.training
    returned = model.train()
    assert returned is model
    assert not any(m.training for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.encode(torch.rand(2, 3, 64, 64))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    wrapper = torch.nn.Sequential(model)
    wrapper.train()
    assert not model.training and not model.mapper[1].training


def test_encode_normalizes_and_forward_is_raw():
    model = _tiny()
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(images), model(imagenet_normalize(images)), rtol=0, atol=0)
        assert not torch.equal(model.encode(images), model(images))


def test_imagenet_normalize_values_and_shape_check():
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    torch.testing.assert_close(imagenet_normalize(mean), torch.zeros(1, 3, 2, 2))
    ones = imagenet_normalize(torch.ones(1, 3, 1, 1)).flatten()
    expected = [(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    torch.testing.assert_close(ones, torch.tensor(expected))
    assert imagenet_normalize(torch.ones(1, 3, 1, 1, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match="B×3×H×W"):
        imagenet_normalize(torch.ones(3, 8, 8))


def test_config_validation_names_the_field():
    stages = FLAVORS["effnet/tiny"].stages
    too_shallow = stages[:-1]  # total stride 16
    with pytest.raises(ValueError, match=r"stages.*stride"):
        dataclasses.replace(FLAVORS["effnet/tiny"], stages=too_shallow)
    broken_chain = (stages[0], dataclasses.replace(stages[1], c_in=99), *stages[2:])
    with pytest.raises(ValueError, match="c_in=99"):
        dataclasses.replace(FLAVORS["effnet/tiny"], stages=broken_chain)
    with pytest.raises(ValueError, match="last_channel"):
        dataclasses.replace(FLAVORS["effnet"], last_channel=0)
    with pytest.raises(ValueError, match="kind"):
        EffnetStage(kind="conv", expand_ratio=1, kernel=3, stride=1, c_in=8, c_out=8, layers=1)
    with pytest.raises(ValueError, match="stride"):
        dataclasses.replace(stages[0], stride=3)
