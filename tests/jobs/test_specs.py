"""Every training spec declares what the generic loop needs; a spec missing a piece fails, naming it."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from jobs.specs import SPECS, get_spec
from jobs.specs.spec import REQUIRED, check_spec
from jobs.train_config import TrainConfig
from pipelines.train_data.batches import TrainDataConfig
from stages.flavors import get_flavor


@pytest.mark.parametrize("mode", sorted(SPECS))
def test_a_spec_declares_every_piece_and_each_one_missing_is_named(mode) -> None:
    spec = get_spec(mode)
    assert check_spec(spec) is spec and spec.mode == mode
    assert get_flavor(f"{spec.flavor_family}/tiny").family == spec.flavor_family
    for piece in REQUIRED:
        name = "?" if piece == "name" else spec.name
        with pytest.raises(ValueError, match=rf"training spec '{re.escape(name)}' declares no '{piece}'"):
            check_spec(dataclasses.replace(spec, **{piece: None}))


@pytest.mark.parametrize("mode", sorted(SPECS))
def test_a_spec_builds_its_modules_and_names_its_checkpoint_files(mode, tmp_path) -> None:
    spec = get_spec(mode)
    extra = {}
    if "controlnet" in spec.sections:
        from jobs.train_config import ControlNetTrainConfig

        extra["controlnet"] = ControlNetTrainConfig(flavor="controlnet/canny/tiny")
    config = TrainConfig(data=TrainDataConfig(path=str(tmp_path)), output_dir=str(tmp_path), mode=mode,
                         flavor=f"{spec.flavor_family}/tiny", **extra)  # fmt: skip
    built = spec.build(config, torch.device("cpu"))
    trainable = {id(p) for p in built.trainable.parameters() if p.requires_grad}
    called = {id(p) for p in built.module.parameters()}
    assert trainable and trainable <= called | {id(p) for m in built.saved.values() for p in m.parameters()}
    assert spec.checkpoint in built.saved and spec.checkpoint_files[0] == spec.checkpoint
    assert ("generator_ema" in spec.checkpoint_files) == spec.ema
    if spec.fsdp_units:
        assert any(isinstance(m, spec.fsdp_units) for m in built.module.modules())


def test_the_config_refuses_what_the_spec_does_not_allow(tmp_path) -> None:
    data = TrainDataConfig(path=str(tmp_path))
    with pytest.raises(ValueError, match="mode='stage_d'; allowed: stage_c, lora, controlnet, stage_b"):
        TrainConfig(data=data, output_dir="x", mode="stage_d", flavor="stage_c/tiny")
    with pytest.raises(ValueError, match="flavor='stage_c/tiny' is not a stage_b flavor"):
        TrainConfig(data=data, output_dir="x", mode="stage_b", flavor="stage_c/tiny")
    with pytest.raises(TypeError, match="flavor"):
        TrainConfig(data=data, output_dir="x", mode="stage_b")  # no model field defaults to a flavor
    from jobs.train_config import EmaConfig, ScalingSpec

    with pytest.raises(ValueError, match=r"scaling\.strategy='fsdp' trains the full models"):
        TrainConfig(
            data=data, output_dir="x", mode="lora", flavor="stage_c/tiny",
            scaling=ScalingSpec(num_workers=2, strategy="fsdp"),
        )  # fmt: skip
    with pytest.raises(ValueError, match="ema: the official EMA is of a full generator"):
        TrainConfig(data=data, output_dir="x", mode="lora", flavor="stage_c/tiny", ema=EmaConfig())
    TrainConfig(data=data, output_dir="x", mode="stage_b", flavor="stage_b/tiny", ema=EmaConfig())
