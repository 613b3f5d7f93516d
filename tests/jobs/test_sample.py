"""``cascade sample`` end to end on the tiny flavors, in-process through ``jobs.cli.main``.

Every mode writes its PNGs and ``sample.json``, and its pixels equal what ``stages.sampling`` gives when called
directly with models built by ``stages.flavors`` (converted by the same ``to_uint8``). The same seed gives the
same PNG bytes, also after a fresh load. Our training checkpoints (full fine-tunes of Stage C and B, LoRA,
ControlNet of each kind), written here with ``write_checkpoint``, sample like the models they hold. Mistakes are
one line on stderr and exit 2.

The seeded init of Stage B and C zeroes their output layers, so random ones ignore their conditions: every
comparison that must see the conditions' work samples with (perturbed) full fine-tunes of both, ``TRAINED``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from skimage import data as skdata

from jobs.cli import main
from jobs.sample_models import load_models
from jobs.train_checkpoint import write_checkpoint
from stages import sampling
from stages.control_inputs import canny_edges, centre_mask, inpaint_input, sr_effnet_input
from stages.flavors import build_model
from stages.lora import build_lora, load_lora, merge_lora
from stages.weights import sha256_of

SEED = 3
FAST = [
    "--flavors",
    "tiny",
    "--c-steps",
    "2",
    "--b-steps",
    "2",
    "--seed",
    str(SEED),
    "--height",
    "64",
    "--width",
    "64",
]
KW = {
    "seed": SEED,
    "stage_c": sampling.SamplerSettings(timesteps=2, cfg=4.0, shift=2.0),
    "stage_b": sampling.SamplerSettings(timesteps=2, cfg=1.1, shift=1.0),
}
SIZE = {"height": 64, "width": 64}
TRAINED = ["--checkpoint", "{ckpt_stage_c}", "--checkpoint", "{ckpt_stage_b}"]
CONTROL = ["--mode", "controlnet", "--image", "{photo}", "--prompt", "an astronaut", "--control"]
MODES = {
    "text-to-image": ["--prompt", "a red cube", "--batch", "2"],
    "image-variation": ["--mode", "image-variation", "--image", "{photo}"],
    "image-to-image": ["--mode", "image-to-image", "--image", "{photo}", "--prompt", "an astronaut",
                       "--height", "128", "--width", "128"],
    "reconstruct": ["--mode", "reconstruct", "--image", "{photo}"],
    "canny": [*CONTROL, "canny"],
    "inpainting": [*CONTROL, "inpainting"],
    "inpainting-mask": [*CONTROL, "inpainting", "--mask", "{mask}"],
    "super_resolution": [*CONTROL, "super_resolution"],
}  # fmt: skip


def _png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(pixels).save(path)
    return path


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Weights moved off their init (whose zeroed output layers would hide whether a file was used)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.is_floating_point() and v.numel() else v
            for k, v in state.items()}  # fmt: skip


def _checkpoint(root: Path, name: str, mode: str, flavor: str, weights: dict) -> Path:
    path = root / name / "checkpoint_00000005"
    state = {"step": 5, "mode": mode, "flavor": flavor}
    write_checkpoint(path, weights, {"state": {}, "param_groups": []}, state)
    return path


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    """Inputs (an 80×96 photo, a mask, a non-image) and training checkpoints of every kind."""
    root = tmp_path_factory.mktemp("sample")
    photo = torch.from_numpy(np.ascontiguousarray(skdata.astronaut())).permute(2, 0, 1)[None].float()
    photo = F.interpolate(photo, size=(80, 96), mode="bilinear", antialias=True)[0].permute(1, 2, 0)
    mask = np.zeros((80, 96), np.uint8)
    mask[10:50, 30:90] = 255
    out = {"root": root, "notes": root / "notes.png", "empty": root / "empty",
           "photo": _png(root / "photo.png", photo.round().clamp(0, 255).byte().numpy()),
           "mask": _png(root / "mask.png", mask), "small_mask": _png(root / "small_mask.png", mask[:40])}  # fmt: skip
    out["notes"].write_text("not an image, whatever the name says")
    out["empty"].mkdir()
    stage_c = build_model("stage_c/tiny")[0].state_dict()
    trained_c = {"generator": _perturbed(stage_c, 1), "generator_ema": _perturbed(stage_c, 2)}
    out["ckpt_stage_c"] = _checkpoint(root, "c", "stage_c", "stage_c/tiny", trained_c)
    stage_b = build_model("stage_b/tiny")[0].state_dict()
    out["ckpt_stage_b"] = _checkpoint(
        root, "b", "stage_b", "stage_b/tiny", {"generator": _perturbed(stage_b, 3)}
    )
    lora = build_lora(build_model("stage_c/tiny")[0], rank=2).state_dict()
    out["ckpt_lora"] = _checkpoint(root, "lora", "lora", "stage_c/tiny", {"lora": _perturbed(lora, 4)})
    for i, kind in enumerate(("canny", "inpainting", "super_resolution")):
        cnet = {"controlnet": _perturbed(build_model(f"controlnet/{kind}/tiny")[0].state_dict(), 5 + i)}
        out[f"ckpt_{kind}"] = _checkpoint(root, kind, "controlnet", "stage_c/tiny", cnet)
    out["ckpt_wrong"] = _checkpoint(root, "wrong", "stage_c", "stage_c/tiny", {"generator": stage_b})
    out["ckpt_incomplete"] = _checkpoint(
        root, "incomplete", "stage_c", "stage_c/tiny", {"generator": stage_c}
    )
    (out["ckpt_incomplete"] / "trainer_state.json").unlink()
    return out


@pytest.fixture(scope="module")
def direct() -> sampling.CascadeModels:
    """The tiny models built with ``stages.flavors`` alone (the same seeded random weights as the CLI's)."""
    roles = {"stage_c": "stage_c/tiny", "stage_b": "stage_b/tiny", "stage_a": "stage_a/tiny",
             "effnet": "effnet/tiny", "text": "clip_text/tiny", "vision": "clip_vision/tiny"}  # fmt: skip
    return sampling.CascadeModels(**{role: build_model(flavor)[0] for role, flavor in roles.items()})


@pytest.fixture(scope="module")
def trained(direct, paths) -> sampling.CascadeModels:
    """``direct`` with the Stage C (EMA) and Stage B of the ``TRAINED`` checkpoints."""
    stage_c = build_model("stage_c/tiny", weights=paths["ckpt_stage_c"] / "generator_ema.safetensors")[0]
    stage_b = build_model("stage_b/tiny", weights=paths["ckpt_stage_b"] / "generator.safetensors")[0]
    return dataclasses.replace(direct, stage_c=stage_c, stage_b=stage_b)


def _image(path: Path) -> torch.Tensor:
    """A PNG as (1,3,H,W) in [0, 1], read with PIL (not through the CLI's decoder)."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


def _run(argv: list[str], paths: dict, out: Path, capsys) -> tuple[dict, list[np.ndarray], list[dict]]:
    """``cascade sample`` → (sample.json, the PNGs' pixels, their text chunks); it must succeed."""
    argv = [a.format(**paths) for a in argv]
    assert main(["sample", *argv, "--output", str(out)]) == 0, capsys.readouterr().err
    captured = capsys.readouterr()
    settings = json.loads((out / "sample.json").read_text())
    assert ("RANDOM WEIGHTS" in captured.err) == settings["random_weights"]
    pngs = [Image.open(out / name) for name in settings["files"]]
    return settings, [np.asarray(p) for p in pngs], [dict(p.text) for p in pngs]


def _expected(mode: str, models: sampling.CascadeModels, paths: dict, cnet=None) -> np.ndarray:
    """The same sample through ``stages.sampling`` directly, as 8-bit pixels."""
    photo, fit = _image(paths["photo"]), sampling.fit_to_size
    if mode == "text-to-image":
        return sampling.to_uint8(sampling.text_to_image(models, ["a red cube"] * 2, **SIZE, **KW))
    if mode == "image-variation":
        return sampling.to_uint8(sampling.image_variation(models, photo, **SIZE, **KW))
    if mode == "image-to-image":
        images = fit(photo, (128, 128))
        return sampling.to_uint8(
            sampling.image_to_image(models, images, ["an astronaut"], image_size_px=96, **KW)
        )
    if mode == "reconstruct":
        return sampling.to_uint8(
            sampling.reconstruct(models, fit(photo, (64, 64)), [""], seed=SEED, stage_b=KW["stage_b"])
        )
    kind = mode.removesuffix("-mask")
    if kind == "canny":
        control = canny_edges(fit(photo, (64, 64)))
    elif kind == "inpainting":
        mask = centre_mask(1, (64, 64))
        if mode != kind:
            mask = fit(_image(paths["mask"])[:, :1], (64, 64), nearest=True) > 0.5
        control = inpaint_input(fit(photo, (64, 64)), mask)
    else:
        control = sr_effnet_input(F.interpolate(fit(photo, (32, 32)), scale_factor=2), models.effnet)[0]
    cnet = cnet if cnet is not None else build_model(f"controlnet/{kind}/tiny")[0]
    return sampling.to_uint8(
        sampling.controlnet_to_image(models, cnet, control, ["an astronaut"], **SIZE, **KW)
    )


def _equal(pixels: list[np.ndarray], expected: np.ndarray) -> bool:
    return len(pixels) == len(expected) and all(
        np.array_equal(p, e) for p, e in zip(pixels, expected, strict=True)
    )


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_writes_pngs_equal_to_stages_sampling(mode, paths, trained, tmp_path, capsys) -> None:
    settings, pixels, texts = _run([*FAST, *TRAINED, *MODES[mode]], paths, tmp_path, capsys)
    assert _equal(pixels, _expected(mode, trained, paths))
    assert settings["random_weights"] and "stage_a=stage_a/tiny" in settings["random_models"]
    assert settings["seed"] == SEED and settings["stage_b"] == {
        "timesteps": 2,
        "cfg": 1.1,
        "shift": 1.0,
        "cfg_rho": 0.7,
    }
    assert settings["output_size"] == list(pixels[0].shape[:2]) and settings["device"] == "cpu"
    assert set(settings["durations"]) == {"load_s", "sample_s"}
    for role, file in (
        ("stage_c", "generator_ema"),
        ("stage_b", "generator"),
    ):  # a run's EMA when it kept one
        path = paths[f"ckpt_{role}"] / f"{file}.safetensors"
        assert settings["models"][role] == {
            "flavor": f"{role}/tiny",
            "weights": str(path),
            "sha256": sha256_of(path),
        }
    assert settings["checkpoints"] == [{"path": str(paths[f"ckpt_{m}"]), "mode": m, "flavor": f"{m}/tiny", "step": 5}
                                       for m in ("stage_c", "stage_b")]  # fmt: skip
    if settings["control"]:
        assert settings["models"][f"controlnet/{settings['control']}"]["sha256"] == "random"
    if mode.startswith("inpainting"):
        mask = paths["mask"]
        assert settings["mask"] == (
            "centre" if mode == "inpainting" else {"path": str(mask), "sha256": sha256_of(mask)}
        )
    for i, text in enumerate(texts):  # each PNG carries the settings, less the durations
        stable = {k: v for k, v in settings.items() if k not in ("durations", "files")}
        assert json.loads(text["cascade.sample"]) == stable | {"file": settings["files"][i], "batch_index": i}
        assert text["cascade.random_weights"] == "true"


def test_same_seed_same_png_bytes(paths, direct, tmp_path, capsys) -> None:
    argv = [*FAST, "--height", "64", "--width", "96", "--prompt", "a cat"]  # every model random
    settings, pixels, _ = _run(argv, paths, tmp_path / "a", capsys)
    load_models.cache_clear()  # a fresh load gives the same weights
    _run(argv, paths, tmp_path / "b", capsys)
    _, other, _ = _run([*argv, "--seed", "4"], paths, tmp_path / "c", capsys)
    assert (tmp_path / "a" / "sample_000.png").read_bytes() == (
        tmp_path / "b" / "sample_000.png"
    ).read_bytes()
    assert not np.array_equal(pixels[0], other[0])
    expected = sampling.text_to_image(direct, ["a cat"], height=64, width=96, **KW)
    assert _equal(pixels, sampling.to_uint8(expected))
    assert settings["models"]["stage_b"]["sha256"] == "random" and settings["checkpoints"] == []


ERRORS = [
    (["--weights", "{root}/nowhere"], "--weights {root}/nowhere: no such folder"),
    (["--weights", "{empty}"], "--weights {empty}: missing stage_c_bf16.safetensors or stage_c.safetensors "
     "(stage_c/3.6b); stage_b_bf16.safetensors or stage_b.safetensors (stage_b/1.5b)"),
    ([], "--weights DIR is required: the released flavors (stage_c/3.6b,"),
    (["--stage-c", "stage_b/tiny"], "stage_c='stage_b/tiny' is not a stage_c flavor"),
    ([*FAST, "--mode", "reconstruct", "--image", "{notes}"], "{notes}: not an image: "),
    ([*FAST, "--mode", "reconstruct", "--image", "{root}/missing.png"], "{root}/missing.png: no such file"),
    ([*FAST, "--mode", "reconstruct"], "mode reconstruct needs an input image (--image)"),
    ([*FAST, "--image", "{photo}"], "mode text-to-image takes no input image"),
    ([*FAST, "--height", "100"], "height=100 must be a multiple of 32 from 64 to 4096 px"),
    ([*FAST, *MODES["image-to-image"], "--width", "64"], "width=64 must be a multiple of 128"),
    ([*FAST, *CONTROL, "inpainting", "--mask", "{small_mask}"], "{small_mask}: the mask is 96×40 px, the image 96×80"),
    ([*FAST, "--checkpoint", "{root}/nowhere"], "--checkpoint {root}/nowhere: no such folder"),
    ([*FAST, "--checkpoint", "{ckpt_incomplete}"], "--checkpoint {ckpt_incomplete}: not a complete training checkpoint"),
    (["--checkpoint", "{ckpt_stage_c}"], "--checkpoint {ckpt_stage_c} holds stage_c/tiny; tiny flavors "
     "(stage_c=stage_c/tiny) do not fit released ones"),
    ([*FAST, "--checkpoint", "{ckpt_stage_c}", "--stage-c", "stage_c/1b"],
     "--checkpoint {ckpt_stage_c} was trained on stage_c/tiny, not --stage-c stage_c/1b"),
    ([*FAST, "--checkpoint", "{ckpt_lora}", "--checkpoint", "{ckpt_lora}"],
     "--checkpoint {ckpt_lora} and --checkpoint {ckpt_lora} are both lora checkpoints: give one"),
    ([*FAST, "--checkpoint", "{ckpt_wrong}"], "{ckpt_wrong}/generator.safetensors does not fit StageC: "),
    ([*FAST, "--checkpoint", "{ckpt_canny}"], "--checkpoint {ckpt_canny} holds a ControlNet: sample it with --mode "
     "controlnet"),
    ([*FAST, "--checkpoint", "{ckpt_canny}", *CONTROL, "inpainting"],
     "--checkpoint {ckpt_canny} holds no inpainting ControlNet (controlnet/inpainting/tiny): "),
    ([*FAST, "--output", "{notes}"], "--output {notes}: is a file, not a folder"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), ERRORS, ids=[m.split(":")[0][:40] for _, m in ERRORS])
def test_bad_input_is_one_line_and_exit_2(argv, message, paths, tmp_path, capsys) -> None:
    argv = [a.format(**paths) for a in argv]
    output = [] if "--output" in argv else ["--output", str(tmp_path / "out")]
    assert main(["sample", *argv, *output]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cascade sample: error: "), err
    assert message.format(**paths) in err
    assert not (tmp_path / "out").exists()


def test_unknown_mode_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["sample", "--mode", "paint"])
    assert exit_.value.code == 2 and "invalid choice: 'paint'" in capsys.readouterr().err


def test_lora_checkpoint_is_merged_into_stage_c(paths, trained, tmp_path, capsys) -> None:
    ckpt = paths["ckpt_lora"]
    argv = [*FAST, *TRAINED, *MODES["text-to-image"], "--checkpoint", str(ckpt)]  # on the fine-tuned Stage C
    settings, pixels, _ = _run(argv, paths, tmp_path, capsys)
    stage_c = build_model("stage_c/tiny", weights=paths["ckpt_stage_c"] / "generator_ema.safetensors")[0]
    sha = load_lora(build_lora(stage_c, rank=2), ckpt / "lora.safetensors")
    merge_lora(stage_c)
    assert settings["models"]["stage_c"]["lora"] == str(ckpt / "lora.safetensors")
    assert settings["models"]["stage_c"]["lora_sha256"] == sha
    assert settings["checkpoints"][2] == {
        "path": str(ckpt),
        "mode": "lora",
        "flavor": "stage_c/tiny",
        "step": 5,
    }
    assert _equal(pixels, _expected("text-to-image", dataclasses.replace(trained, stage_c=stage_c), paths))
    assert not np.array_equal(
        pixels[0], _expected("text-to-image", trained, paths)[0]
    )  # the LoRA changed them


@pytest.mark.parametrize("kind", ["canny", "inpainting", "super_resolution"])
def test_controlnet_checkpoint_steers_stage_c(kind, paths, trained, tmp_path, capsys) -> None:
    ckpt = paths[f"ckpt_{kind}"]
    settings, pixels, _ = _run(
        [*FAST, *TRAINED, *MODES[kind], "--checkpoint", str(ckpt)], paths, tmp_path, capsys
    )
    cnet, sha = build_model(f"controlnet/{kind}/tiny", weights=ckpt / "controlnet.safetensors")
    assert settings["models"][f"controlnet/{kind}"]["sha256"] == sha
    assert _equal(pixels, _expected(kind, trained, paths, cnet=cnet))
    plain = sampling.text_to_image(trained, ["an astronaut"], **SIZE, **KW)
    assert not np.array_equal(
        pixels[0], sampling.to_uint8(plain)[0]
    )  # the trained ControlNet reaches Stage C
