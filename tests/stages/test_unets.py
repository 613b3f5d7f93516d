"""Stage B and Stage C: exact sizes, official keys, strict round trips and parity with diffusers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import StableCascadeUNet

from stages.diffusers_keys import diffusers_config, diffusers_to_official, official_to_diffusers
from stages.stage_b import FLAVORS as B_FLAVORS
from stages.stage_b import StageB
from stages.stage_c import FLAVORS as C_FLAVORS
from stages.stage_c import StageC
from tests.helpers import randomize_

RELEASED = {
    "stage_c/3.6b": (3_589_103_632, 1294),
    "stage_c/1b": (1_030_785_040, 654),
    "stage_b/1.5b": (1_562_941_136, 1454),
    "stage_b/700m": (699_471_248, 826),
}
C_PREFIXES = {
    "clip_txt_mapper", "clip_txt_pooled_mapper", "clip_img_mapper", "embedding", "down_blocks",
    "down_downscalers", "up_blocks", "up_upscalers", "clf",
}  # fmt: skip
B_PREFIXES = {
    "effnet_mapper", "pixels_mapper", "clip_mapper", "embedding", "down_blocks", "down_downscalers",
    "up_blocks", "up_upscalers", "up_repeat_mappers", "clf",
}  # fmt: skip
# diffusers key counts after conversion, verified against the official files (spec §8).
DIFFUSERS_KEYS = {"stage_c/3.6b": 1550, "stage_c/1b": 782, "stage_b/1.5b": 1726, "stage_b/700m": 970}


def _build(name: str, device: str = "cpu") -> torch.nn.Module:
    cfg = {**C_FLAVORS, **B_FLAVORS}[name]
    with torch.device(device):
        return (StageC if name.startswith("stage_c") else StageB)(cfg)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_sizes_and_keys(name: str) -> None:
    model = _build(name, "meta")
    params, keys = RELEASED[name]
    state = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == params
    assert sum(v.numel() for v in state.values()) == params  # no buffers
    assert len(state) == keys
    assert {k.split(".")[0] for k in state} == (C_PREFIXES if name.startswith("stage_c") else B_PREFIXES)
    assert len(official_to_diffusers(state)) == DIFFUSERS_KEYS[name]


def test_stage_c_spec_details() -> None:
    model = _build("stage_c/3.6b", "meta")
    state = model.state_dict()
    assert tuple(state["up_blocks.1.0.channelwise.0.weight"].shape) == (8192, 4096)  # the one skip
    assert tuple(state["down_blocks.0.0.channelwise.2.gamma"].shape) == (1, 1, 1, 8192)
    assert "down_downscalers.1.1.blocks.0.weight" in state and "up_upscalers.0.1.blocks.1.weight" in state
    assert [len(b) for b in model.down_blocks] == [24, 72] and [len(b) for b in model.up_blocks] == [72, 24]
    assert model.count_resblocks() == 64 and _build("stage_c/1b", "meta").count_resblocks() == 32


def test_stage_b_spec_details() -> None:
    state = _build("stage_b/1.5b", "meta").state_dict()
    assert tuple(state["up_blocks.1.0.channelwise.0.weight"].shape) == (5120, 2560)
    assert {k.rsplit(".", 1)[0] for k in state if k.startswith("up_repeat_mappers")} == {
        "up_repeat_mappers.0.0", "up_repeat_mappers.0.1", "up_repeat_mappers.1.0", "up_repeat_mappers.1.1",
        "up_repeat_mappers.2.0", "up_repeat_mappers.3.0",
    }  # fmt: skip
    assert sum(v.numel() for k, v in state.items() if k.startswith("effnet_mapper")) == 431_680


def _inputs(name: str, cfg, batch: int = 2) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(1)
    r = torch.rand(batch, generator=gen)
    if name.startswith("stage_c"):
        x = torch.randn(batch, 16, 6, 6, generator=gen)
        ct = torch.randn(batch, 77, cfg.c_clip_text, generator=gen)
        cp = torch.randn(batch, 1, cfg.c_clip_text_pooled, generator=gen)
        ci = torch.randn(batch, 1, cfg.c_clip_img, generator=gen)
        return (x, r, ct, cp, ci), {"sample": x, "timestep_ratio": r, "clip_text": ct, "clip_text_pooled": cp,
                                    "clip_img": ci}  # fmt: skip
    x = torch.randn(batch, 4, 32, 32, generator=gen)
    eff = torch.randn(batch, 16, 6, 6, generator=gen)
    cp = torch.randn(batch, 1, cfg.c_clip, generator=gen)
    return (x, r, eff, cp), {"sample": x, "timestep_ratio": r, "effnet": eff, "clip_text_pooled": cp}


def _narrow_lite(name: str):
    """Lite block structure (levels, blocks, repeats, head counts) at a small width."""
    if name == "stage_c/1b":
        return dataclasses.replace(C_FLAVORS[name], c_cond=48, c_hidden=(48, 48), c_clip_text=24,
                                   c_clip_text_pooled=24, c_clip_img=16)  # fmt: skip
    return dataclasses.replace(B_FLAVORS[name], c_cond=72, c_hidden=(8, 18, 72, 72), c_clip=24)


PARITY_CASES = {
    "stage_c/tiny": C_FLAVORS["stage_c/tiny"],
    "stage_b/tiny": B_FLAVORS["stage_b/tiny"],
    "stage_c/1b-shaped": _narrow_lite("stage_c/1b"),
    "stage_b/700m-shaped": _narrow_lite("stage_b/700m"),
}


def _check_parity(name: str, cfg) -> float:
    model = (StageC if name.startswith("stage_c") else StageB)(cfg).eval()
    randomize_(model)
    reference = StableCascadeUNet(**diffusers_config(cfg)).eval()
    reference.load_state_dict(official_to_diffusers(model.state_dict()), strict=True)
    back = diffusers_to_official(reference.state_dict(), stage=name[6])
    assert (
        all(torch.equal(back[k], v) for k, v in model.state_dict().items())
        and back.keys() == model.state_dict().keys()
    )
    args, kwargs = _inputs(name, cfg)
    with torch.no_grad():
        ours, theirs = model(*args), reference(**kwargs).sample
    assert ours.shape == args[0].shape and ours.abs().mean() > 1e-3
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("name", sorted(PARITY_CASES))
def test_parity_with_diffusers(name: str) -> None:
    assert _check_parity(name, PARITY_CASES[name]) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stage_c/1b", "stage_b/700m"])
def test_parity_with_diffusers_at_lite_size(name: str) -> None:
    cfg = {**C_FLAVORS, **B_FLAVORS}[name]
    assert _check_parity(name, cfg) <= 1e-5


def test_sca_crp_default_to_zero() -> None:
    model = _build("stage_c/tiny").eval()
    randomize_(model)
    args, _ = _inputs("stage_c/tiny", model.config)
    zeros = torch.zeros(2)
    with torch.no_grad():
        assert torch.equal(model(*args), model(*args, sca=zeros, crp=zeros))
        assert not torch.equal(model(*args), model(*args, sca=torch.ones(2)))


def test_bad_config_names_the_field() -> None:
    with pytest.raises(ValueError, match="nhead"):
        dataclasses.replace(C_FLAVORS["stage_c/tiny"], nhead=(3, 2))
    with pytest.raises(ValueError, match="blocks"):
        dataclasses.replace(B_FLAVORS["stage_b/tiny"], blocks=((1, 1), (1, 1)))
