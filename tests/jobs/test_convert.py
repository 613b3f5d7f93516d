"""``cascade convert``: official Stage B/C files ↔ diffusers folders that diffusers loads in one call."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from diffusers import StableCascadeUNet
from safetensors.torch import load_file

from jobs.convert import add_convert_parser, convert_checkpoint, match_flavors
from stages.flavors import build_model, get_flavor
from stages.weights import save_weights
from tests.helpers import randomize_

TINY = ["stage_c/tiny", "stage_b/tiny"]


def _official_file(
    tmp_path: Path, name: str, dtype: torch.dtype | None = None
) -> tuple[torch.nn.Module, Path]:
    """A tiny model with non-trivial random weights, saved as an official flat safetensors file."""
    model = randomize_(get_flavor(name).build(), seed=3).eval()
    path = tmp_path / "official" / "generator.safetensors"
    path.parent.mkdir()
    save_weights(model.state_dict(), path, dtype=dtype)
    return model, path


def _inputs(name: str) -> tuple[tuple, dict]:
    """The same inputs for our forward (positional) and diffusers' (keywords)."""
    cfg, gen = get_flavor(name).config, torch.Generator().manual_seed(1)
    r = torch.rand(2, generator=gen)
    if name.startswith("stage_c"):
        x = torch.randn(2, 16, 6, 6, generator=gen)
        ct = torch.randn(2, 77, cfg.c_clip_text, generator=gen)
        cp = torch.randn(2, 1, cfg.c_clip_text_pooled, generator=gen)
        ci = torch.randn(2, 1, cfg.c_clip_img, generator=gen)
        kwargs = {"clip_text": ct, "clip_text_pooled": cp, "clip_img": ci}
        return (x, r, ct, cp, ci), {"sample": x, "timestep_ratio": r, **kwargs}
    x = torch.randn(2, 4, 32, 32, generator=gen)
    eff = torch.randn(2, 16, 6, 6, generator=gen)
    cp = torch.randn(2, 1, cfg.c_clip, generator=gen)
    return (x, r, eff, cp), {"sample": x, "timestep_ratio": r, "effnet": eff, "clip_text_pooled": cp}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", TINY)
def test_from_pretrained_matches_ours_and_converts_back_exactly(name: str, tmp_path: Path) -> None:
    model, src = _official_file(tmp_path, name)
    done = convert_checkpoint(src, tmp_path / "diffusers")  # flavor inferred from the shapes
    assert done.flavor == name and done.direction == "diffusers" and done.dtypes == ("float32",)
    assert sorted(p.name for p in done.path.iterdir()) == [
        "config.json",
        "diffusion_pytorch_model.safetensors",
    ]
    assert json.loads((done.path / "config.json").read_text())["_class_name"] == "StableCascadeUNet"

    unet = StableCascadeUNet.from_pretrained(done.path).eval()  # one call, offline, no project code
    args, kwargs = _inputs(name)
    with torch.no_grad():
        ours, theirs = model(*args), unet(**kwargs).sample
    assert ours.abs().mean() > 1e-3
    assert (ours - theirs).abs().max().item() <= 1e-5  # as tests/stages/test_unets.py

    back = convert_checkpoint(done.path, tmp_path / "back" / "stage.safetensors")  # direction inferred
    assert back.direction == "official" and back.flavor == name
    original, again = load_file(src), load_file(back.path)
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], v) and again[k].dtype == v.dtype for k, v in original.items())
    assert _sha(back.path) == _sha(src)  # same tensors, same file bytes

    ours_again, _ = build_model(name, weights=back.path)  # the project's reader
    with torch.no_grad():
        assert torch.equal(ours_again(*args), ours)


def test_bf16_stays_bf16_and_from_single_file_finds_its_config(tmp_path: Path) -> None:
    _, src = _official_file(tmp_path, "stage_c/tiny", dtype=torch.bfloat16)
    done = convert_checkpoint(src, tmp_path / "diffusers", flavor="stage_c/tiny")
    assert done.dtypes == ("bfloat16",)
    assert {v.dtype for v in load_file(done.path / "diffusion_pytorch_model.safetensors").values()} == {
        torch.bfloat16
    }
    loaded = StableCascadeUNet.from_pretrained(done.path, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # The folder is also the config that from_single_file otherwise fetches from the hub.
    single = StableCascadeUNet.from_single_file(str(src), config=str(done.path), torch_dtype=torch.bfloat16)
    assert all(torch.equal(single.state_dict()[k], v) for k, v in loaded.state_dict().items())

    back = convert_checkpoint(done.path, tmp_path / "back.safetensors", direction="official")
    assert back.dtypes == ("bfloat16",) and _sha(back.path) == _sha(src)


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="cascade")
    add_convert_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *argv])
    return args.func(args)


def test_cli_converts_a_training_checkpoint_folder_both_ways(tmp_path: Path, capsys) -> None:
    model, src = _official_file(tmp_path, "stage_b/tiny")
    out = tmp_path / "decoder"
    assert _cli(str(src.parent), str(out)) == 0  # the folder holds one checkpoint: generator.safetensors
    assert "stage_b/tiny → diffusers" in capsys.readouterr().out
    unet = StableCascadeUNet.from_pretrained(out)
    assert unet.config.effnet_in_channels == 16 and unet.config.block_out_channels == [16, 32, 64, 64]

    back = tmp_path / "stage_b_tiny.safetensors"
    assert _cli(str(out), str(back), "--to", "official", "--flavor", "stage_b/tiny") == 0
    assert _sha(back) == _sha(src)

    save_weights(model.state_dict(), src.parent / "generator_ema.safetensors")
    with pytest.raises(ValueError, match=r"several checkpoints .*generator_ema"):
        _cli(str(src.parent), str(out))
    with pytest.raises(SystemExit):
        _cli(str(src), str(out), "--to", "onnx")


def test_errors_name_the_file_and_the_flavor_option(tmp_path: Path) -> None:
    model, src = _official_file(tmp_path, "stage_c/tiny")
    state = model.state_dict()
    state.pop("clf.1.bias")
    odd = tmp_path / "odd.safetensors"
    save_weights(state, odd)
    with pytest.raises(ValueError, match=r"odd\.safetensors.*match no stage_c flavor.*--flavor"):
        convert_checkpoint(odd, tmp_path / "x")
    with pytest.raises(ValueError, match=r"1 missing keys: clf\.1\.bias"):
        convert_checkpoint(odd, tmp_path / "x", flavor="stage_c/tiny")
    with pytest.raises(ValueError, match="wrong shapes"):
        convert_checkpoint(src, tmp_path / "x", flavor="stage_c/1b")
    with pytest.raises(ValueError, match="not a Stage B/C flavor"):
        convert_checkpoint(src, tmp_path / "x", flavor="stage_a/tiny")

    not_cascade = tmp_path / "effnet.safetensors"
    save_weights(get_flavor("effnet/tiny").build().state_dict(), not_cascade)
    with pytest.raises(ValueError, match="not a Stage B/C checkpoint"):
        convert_checkpoint(not_cascade, tmp_path / "x")
    pickle = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(1)}, pickle)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        convert_checkpoint(pickle, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert_checkpoint(tmp_path / "missing.safetensors", tmp_path / "x")

    folder = convert_checkpoint(src, tmp_path / "diffusers").path
    with pytest.raises(ValueError, match="one file; name it like"):
        convert_checkpoint(folder, tmp_path / "official_dir")
    with pytest.raises(ValueError, match="not a diffusers folder"):
        convert_checkpoint(src, tmp_path / "y.safetensors", direction="official")


def test_a_sharded_diffusers_folder_converts_back(tmp_path: Path) -> None:
    _, src = _official_file(tmp_path, "stage_c/tiny")
    unet = StableCascadeUNet.from_pretrained(convert_checkpoint(src, tmp_path / "diffusers").path)
    unet.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")  # diffusers' own writer
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    back = convert_checkpoint(tmp_path / "sharded", tmp_path / "back.safetensors")
    assert back.flavor == "stage_c/tiny" and _sha(back.path) == _sha(src)


def test_every_stage_b_c_flavor_is_inferred_from_its_shapes_alone() -> None:
    names = ["stage_c/3.6b", "stage_c/1b", "stage_c/tiny", "stage_b/1.5b", "stage_b/700m", "stage_b/tiny"]
    for name in names:  # meta tensors: shapes without memory, released sizes included
        assert match_flavors(get_flavor(name).build(device="meta").state_dict()) == [name]
