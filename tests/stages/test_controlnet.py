"""ControlNet: released sizes and keys, and delivery into Stage C before the listed ResBlocks."""

from __future__ import annotations

import pytest
import torch
import torchvision

from stages.common import ControlNetDeliverer, ResBlock
from stages.controlnet import FLAVORS, ControlNet
from stages.stage_c import FLAVORS as C_FLAVORS
from stages.stage_c import StageC

RELEASED = {
    "controlnet/canny": 54_255_776,
    "controlnet/inpainting": 54_256_424,
    "controlnet/super_resolution": 203_491_584,
    "controlnet/identity": 102_763_008,
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_counts_and_keys(name: str) -> None:
    with torch.device("meta"):
        model = ControlNet(FLAVORS[name])
    assert sum(p.numel() for p in model.parameters()) == RELEASED[name]
    state = model.state_dict()
    assert {k.split(".")[0] for k in state} == {"backbone", "projections"}
    n_proj = len(FLAVORS[name].proj_blocks)
    assert {k for k in state if k.startswith("projections")} == {
        f"projections.{i}.{j}.weight" for i in range(n_proj) for j in (0, 2)
    }
    assert sum(state[f"projections.{i}.2.weight"].numel() for i in range(n_proj)) > 0


def test_effnet_backbone_matches_torchvision_layout() -> None:
    with torch.device("meta"):
        ours = ControlNet(FLAVORS["controlnet/canny"]).backbone.state_dict()
        reference = torchvision.models.efficientnet_v2_s(weights=None).features.state_dict()
    assert ours.keys() == reference.keys()
    stem = ours["0.0.weight"]
    assert tuple(stem.shape) == (24, 1, 3, 3)
    assert all(ours[k].shape == v.shape for k, v in reference.items() if k != "0.0.weight")


def test_stem_conv_has_no_padding_and_copies_weights() -> None:
    model = ControlNet(FLAVORS["controlnet/inpainting/tiny"])
    stem = model.backbone[0][0]
    assert stem.padding == (0, 0) and stem.in_channels == 4
    assert torch.count_nonzero(stem.weight[:, 3]) == 0 and torch.count_nonzero(stem.weight[:, :3]) > 0


def _stage_c_inputs(model: StageC, gen: torch.Generator) -> tuple:
    cfg = model.config
    return (
        torch.randn(1, 16, 8, 8, generator=gen),
        torch.rand(1, generator=gen),
        torch.randn(1, 77, cfg.c_clip_text, generator=gen),
        torch.randn(1, 1, cfg.c_clip_text_pooled, generator=gen),
        torch.randn(1, 1, cfg.c_clip_img, generator=gen),
    )


@pytest.mark.parametrize("name", ["controlnet/canny/tiny", "controlnet/super_resolution/tiny"])
def test_zero_init_then_delivery(name: str) -> None:
    gen = torch.Generator().manual_seed(0)
    stage_c = StageC(C_FLAVORS["stage_c/tiny"]).eval()
    with torch.no_grad():
        for p in stage_c.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    cnet = ControlNet(FLAVORS[name]).eval()
    c_in = FLAVORS[name].c_in
    control_input = (
        torch.rand(1, c_in, 64, 64, generator=gen) if "canny" in name else torch.rand(1, c_in, 8, 8)
    )
    args = _stage_c_inputs(stage_c, gen)
    with torch.no_grad():
        signals = cnet(control_input)
        assert len(signals) == max(FLAVORS[name].proj_blocks) + 1
        assert [i for i, s in enumerate(signals) if s is not None] == list(FLAVORS[name].proj_blocks)
        plain = stage_c(*args)
        assert torch.equal(plain, stage_c(*args, cnet=signals))  # zero-initialised projections
        for projection in cnet.projections:
            projection[-1].weight.normal_(0, 0.05, generator=gen)
        assert not torch.allclose(plain, stage_c(*args, cnet=cnet(control_input)))


def test_deliverer_called_once_before_every_resblock() -> None:
    stage_c = StageC(C_FLAVORS["stage_c/tiny"]).eval()
    order: list[str] = []
    for name, module in stage_c.named_modules():
        if isinstance(module, ResBlock):
            module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
    marker = [torch.zeros(1, 64, 1, 1) for _ in range(stage_c.count_resblocks())]
    deliverer = ControlNetDeliverer(marker)
    stage_c._down_encode(torch.zeros(1, 64, 4, 4), torch.zeros(1, 192), torch.zeros(1, 85, 64), deliverer)
    assert deliverer.position == len(order) == 3  # the down path of the tiny model: 1 + 2 ResBlocks


def test_backbone_bn_stays_in_eval() -> None:
    model = ControlNet(FLAVORS["controlnet/canny/tiny"]).train()
    assert not model.backbone.training and model.projections.training


def test_bad_config() -> None:
    from stages.controlnet import ControlNetConfig

    with pytest.raises(ValueError, match="bottleneck_mode"):
        ControlNetConfig(bottleneck_mode="huge")
    with pytest.raises(ValueError, match="proj_blocks"):
        ControlNetConfig(proj_blocks=(1, 1))
