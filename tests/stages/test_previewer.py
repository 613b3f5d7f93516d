"""Previewer: released key layout and count, ×8 upsampling contract, safetensors round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from stages.previewer import FLAVORS, Previewer
from tests.helpers import randomize_bn_

KEY_INDICES = {0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24}
BN_INDICES = {2, 5, 8, 11, 14, 17, 20, 23}
# Official weight shapes of the released previewer (ConvTranspose weights are in×out×k×k).
RELEASED_WEIGHT_SHAPES = {
    0: (512, 16, 1, 1),
    3: (512, 512, 3, 3),
    6: (512, 256, 2, 2),
    9: (256, 256, 3, 3),
    12: (256, 128, 2, 2),
    15: (128, 128, 3, 3),
    18: (128, 128, 2, 2),
    21: (128, 128, 3, 3),
    24: (3, 128, 1, 1),
}


def _tiny(seed: int = 1) -> Previewer:
    return randomize_bn_(Previewer(FLAVORS["previewer/tiny"]).eval(), seed)


def test_released_flavor_count_and_keys_on_meta():
    with torch.device("meta"):
        model = Previewer(FLAVORS["previewer"])
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 3_979_651
    assert len(state) == 58
    assert {int(k.split(".")[1]) for k in state} == KEY_INDICES
    buffer_indices = {int(k.split(".")[1]) for k, _ in model.named_buffers()}
    assert buffer_indices == BN_INDICES
    assert {
        i: tuple(state[f"blocks.{i}.weight"].shape) for i in RELEASED_WEIGHT_SHAPES
    } == RELEASED_WEIGHT_SHAPES
    for i in BN_INDICES:
        c = state[f"blocks.{i - 2}.weight"].shape[1 if i - 2 in {6, 12, 18} else 0]
        assert state[f"blocks.{i}.running_var"].shape == (c,)


def test_tiny_flavor_has_the_same_keys_and_is_small():
    with torch.device("meta"):
        tiny = Previewer(FLAVORS["previewer/tiny"])
        full = Previewer(FLAVORS["previewer"])
    assert set(tiny.state_dict()) == set(full.state_dict())
    assert sum(p.numel() for p in tiny.parameters()) < 1_000_000


@pytest.mark.parametrize(("height", "width"), [(24, 24), (16, 28)])
def test_upsamples_by_8(height: int, width: int):
    model = _tiny()
    with torch.no_grad():
        images = model(torch.randn(2, 16, height, width))
    assert images.shape == (2, 3, 8 * height, 8 * width)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize(("field", "value"), [("c_in", 0), ("c_hidden", 30), ("c_out", True)])
def test_config_validation_names_the_field(field: str, value: object):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(FLAVORS["previewer"], **{field: value})
