"""``cascade sample``: images from Stable Cascade with the official inference settings (``stages.sampling``).

The library API, shared with the web app, is three calls: :func:`jobs.sample_models.load_models` (cached),
a :class:`SampleRequest` (checked when built) and :func:`run_sample`, which returns PIL images and a dict of
every setting. The CLI writes them with :func:`write_samples`: ``sample_000.png``, ... (each with the settings
in a PNG text chunk) and ``sample.json``.

Modes (spec §5): ``text-to-image``; ``image-variation`` (the image's CLIP-L embedding, empty caption);
``image-to-image`` (the image's effnet latent noised to t = ``strength``); ``reconstruct`` (Stage A + B as an
autoencoder); ``controlnet`` with ``canny`` (the image's edges), ``inpainting`` (the image with a mask, an
uploaded one or the centre of the image) or ``super_resolution`` (the image at half the output size through
the effnet). Defaults are the notebooks': Stage C 20 steps, cfg 4, shift 2; Stage B 10 steps, cfg 1.1,
shift 1.

Sizes are the output's. An input image is resized to cover it and centre-cropped (super-resolution: to half of
it); image variation gives the whole image to CLIP, which crops its centre itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from jobs.sample_models import (
    PRESETS,
    CheckpointInfo,
    ModelSource,
    SampleModels,
    load_models,
    random_banner,
    read_checkpoints,
)
from pipelines.core.images import PILLOW_MAX_PIXELS, decode_rgb, to_float_chw
from stages import sampling
from stages.control_inputs import CONTROL_KINDS, centre_mask, control_input

MODES = ("text-to-image", "image-variation", "image-to-image", "reconstruct", "controlnet")
IMAGE_MODES = frozenset(MODES[1:])
SIZE_RANGE = (64, 4096)
JSON_NAME = "sample.json"
PNG_KEY = "cascade.sample"  # PNG text chunk with the settings; "cascade.random_weights" says "true"/"false"


@dataclass(frozen=True, kw_only=True)
class SampleRequest:
    """One sampling call; checked when built. Defaults are the official notebooks'.

    Attributes:
        mode: one of :data:`MODES`.
        prompt: the caption (``image-variation`` takes none: the official empty caption).
        image: path of the input image (every mode but ``text-to-image``).
        mask: inpainting only: path of a mask image, white (> 50% grey) where to paint, the image's size; None
            paints the centre (half of each side).
        control: ``controlnet`` mode: ``canny``, ``inpainting`` or ``super_resolution``.
        seed: the RNG seed; the same seed gives the same images (bit-identical on CPU).
        batch: images per call (one caption and image, different noise).
        height, width: the output size in pixels: a multiple of :meth:`size_multiple`, 64 to 4096.
        c_steps, c_cfg, c_shift: Stage C sampler; b_steps, b_cfg, b_shift: Stage B sampler.
        strength: image-to-image: how far the image is noised (t_start; Stage C runs ``c_steps × strength``
            steps from there).
    """

    mode: str = "text-to-image"
    prompt: str = ""
    image: str | None = None
    mask: str | None = None
    control: str | None = None
    seed: int = 42
    batch: int = 1
    height: int = 1024
    width: int = 1024
    c_steps: int = sampling.STAGE_C.timesteps
    c_cfg: float = sampling.STAGE_C.cfg
    c_shift: float = sampling.STAGE_C.shift
    b_steps: int = sampling.STAGE_B.timesteps
    b_cfg: float = sampling.STAGE_B.cfg
    b_shift: float = sampling.STAGE_B.shift
    strength: float = 0.8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; modes: {', '.join(MODES)}")
        if (self.mode in IMAGE_MODES) != (self.image is not None):
            need = "needs an input image (--image)" if self.mode in IMAGE_MODES else "takes no input image"
            raise ValueError(f"mode {self.mode} {need}")
        if (self.mode == "controlnet") != (self.control is not None):
            raise ValueError(
                f"--control ({', '.join(CONTROL_KINDS)}) goes with mode controlnet, and only there"
            )
        if self.control is not None and self.control not in CONTROL_KINDS:
            raise ValueError(f"unknown control {self.control!r}; allowed: {', '.join(CONTROL_KINDS)}")
        if self.mask is not None and self.control != "inpainting":
            raise ValueError("--mask goes with --mode controlnet --control inpainting only")
        if self.mode == "image-variation" and self.prompt:
            raise ValueError(
                "image-variation takes no prompt (the image's CLIP embedding with an empty caption)"
            )
        if not 0 <= self.seed < 2**63 or not 1 <= self.batch <= 64:
            raise ValueError(f"seed={self.seed} must be in [0, 2^63) and batch={self.batch} in [1, 64]")
        step, (low, high) = self.size_multiple(), SIZE_RANGE
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % step or not low <= value <= high:
                why = {128: " for image-to-image", 64: " for super-resolution"}.get(step, "")
                raise ValueError(f"{name}={value} must be a multiple of {step} from {low} to {high} px{why}")
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength={self.strength} must be in (0, 1]")
        if self.mode == "image-to-image" and int(self.c_steps * self.strength) < 1:
            raise ValueError(f"c_steps={self.c_steps} × strength={self.strength} leaves no Stage C step")
        _ = (self.stage_c, self.stage_b)  # SamplerSettings checks steps and shifts

    def size_multiple(self) -> int:
        """The output size's step: 128 for image-to-image (encoded at 3/4 to a whole effnet latent that
        Stage B decodes back at 4/3), 64 for super-resolution (its input is half of it, a multiple of 32),
        else 32."""
        if self.mode == "image-to-image":
            return 128
        return 64 if self.control == "super_resolution" else 32

    @property
    def stage_c(self) -> sampling.SamplerSettings:
        return sampling.SamplerSettings(timesteps=self.c_steps, cfg=self.c_cfg, shift=self.c_shift)

    @property
    def stage_b(self) -> sampling.SamplerSettings:
        return sampling.SamplerSettings(timesteps=self.b_steps, cfg=self.b_cfg, shift=self.b_shift)


@dataclass(frozen=True)
class SampleInputs:
    """A request's decoded inputs: the image (1,3,H,W) in [0, 1] and the inpainting mask (1,1,H,W) bool, with
    where each came from (a file's path and sha256, or ``centre``)."""

    image: torch.Tensor | None
    mask: torch.Tensor | None
    described: dict[str, Any]


def read_image(path: str) -> tuple[torch.Tensor, str]:
    """An image file → ((1,3,H,W) float in [0, 1], sha256 of its bytes). Anything but a decodable image
    raises ``ValueError`` naming the file (``pipelines.core.images``' checks: format, bombs, truncation)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = file.read_bytes()
    try:
        rgb = decode_rgb(data, max_pixels=PILLOW_MAX_PIXELS)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return torch.from_numpy(to_float_chw(rgb)).unsqueeze(0), hashlib.sha256(data).hexdigest()


def read_inputs(request: SampleRequest) -> SampleInputs:
    """Decode the request's image and mask (a mask must have the image's size; > 50% grey paints)."""
    if request.image is None:
        return SampleInputs(None, None, {"image": None, "mask": None})
    image, image_sha = read_image(request.image)
    described: dict[str, Any] = {"image": {"path": request.image, "sha256": image_sha}, "mask": None}
    mask = None
    if request.control == "inpainting":
        if request.mask is None:
            described["mask"] = "centre"
        else:
            pixels, mask_sha = read_image(request.mask)
            if pixels.shape[-2:] != image.shape[-2:]:
                raise ValueError(
                    f"{request.mask}: the mask is {pixels.shape[-1]}×{pixels.shape[-2]} px, the image "
                    f"{image.shape[-1]}×{image.shape[-2]}"
                )
            mask = pixels.mean(dim=1, keepdim=True) > 0.5
            described["mask"] = {"path": request.mask, "sha256": mask_sha}
    return SampleInputs(image, mask, described)


def _control(
    models: SampleModels, request: SampleRequest, image: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """The ControlNet input of the request's image (1,3,H,W) (and mask), one per image of the batch."""
    size = (request.height, request.width)
    kind = request.control
    assert kind is not None
    if kind == "super_resolution":
        # the image at half the output size, nearest ×2: sr_effnet_input encodes it at half size again
        low = sampling.fit_to_size(image, (size[0] // 2, size[1] // 2))
        control = control_input(
            kind, F.interpolate(low, scale_factor=2, mode="nearest"), effnet=models.cascade.effnet
        )
    else:
        if kind == "inpainting":
            mask = (
                centre_mask(1, size)
                if mask is None
                else sampling.fit_to_size(mask.float(), size, nearest=True) > 0.5
            )
        control = control_input(kind, sampling.fit_to_size(image, size), mask=mask)
    return control.expand(request.batch, *control.shape[1:])


def _sample(models: SampleModels, request: SampleRequest, inputs: SampleInputs) -> torch.Tensor:
    """The request's images (B,3,H,W) in [0, 1] from ``stages.sampling``."""
    captions = [request.prompt] * request.batch
    size = (request.height, request.width)
    settings = {"seed": request.seed, "stage_b": request.stage_b}
    if request.mode == "reconstruct":
        images = inputs.image.expand(request.batch, -1, -1, -1)
        return sampling.reconstruct(models.cascade, sampling.fit_to_size(images, size), captions, **settings)
    settings["stage_c"] = request.stage_c
    if request.mode == "image-to-image":
        images = sampling.fit_to_size(inputs.image.expand(request.batch, -1, -1, -1), size)
        return sampling.image_to_image(
            models.cascade,
            images,
            captions,
            strength=request.strength,
            image_size_px=min(size) * 3 // 4,
            **settings,
        )
    settings |= {"height": size[0], "width": size[1]}
    if request.mode == "image-variation":
        images = inputs.image.expand(request.batch, -1, -1, -1)  # CLIP crops the centre itself
        return sampling.image_variation(models.with_vision(), images, **settings)
    if request.mode == "controlnet":
        assert request.control is not None
        control = _control(models, request, inputs.image, inputs.mask)
        return sampling.controlnet_to_image(
            models.cascade, models.controlnet(request.control), control, captions, **settings
        )
    return sampling.text_to_image(models.cascade, captions, **settings)


def prepare_models(models: SampleModels, request: SampleRequest) -> dict[str, Any]:
    """Load what the request needs beyond the base models (the CLIP vision tower, a ControlNet); returns
    ``models.describe`` of the models it runs (``random_models`` for a banner)."""
    if request.mode == "image-variation":
        models.with_vision()
    if request.control is not None:
        models.controlnet(request.control)
    return models.describe(_roles(request))


def _roles(request: SampleRequest) -> list[str]:
    """The models a request runs."""
    roles = ["stage_c", "stage_b", "stage_a", "clip_text"]
    if request.mode in ("image-to-image", "reconstruct") or request.control == "super_resolution":
        roles.append("effnet")
    if request.mode == "image-variation":
        roles.append("clip_vision")
    if request.control is not None:
        roles.append(f"controlnet/{request.control}")
    return roles


def _sampler_settings(request: SampleRequest) -> dict[str, Any]:
    stage_c = dataclasses.asdict(request.stage_c)
    if request.mode == "image-to-image":  # stages.sampling.image_to_image runs the tail of the schedule
        stage_c |= {"t_start": request.strength, "steps_run": int(request.c_steps * request.strength)}
    stage_c = None if request.mode == "reconstruct" else stage_c  # Stage B + A only
    return {"stage_c": stage_c, "stage_b": dataclasses.asdict(request.stage_b)}


def check_checkpoints(checkpoints: Iterable[CheckpointInfo], request: SampleRequest) -> None:
    """A ControlNet checkpoint samples in controlnet mode only (its training would be ignored otherwise)."""
    for ckpt in checkpoints:
        if ckpt.mode == "controlnet" and request.mode != "controlnet":
            raise ValueError(
                f"--checkpoint {ckpt.path} holds a ControlNet: sample it with --mode controlnet and its "
                "--control"
            )


def run_sample(
    models: SampleModels, request: SampleRequest, inputs: SampleInputs | None = None
) -> tuple[list[Image.Image], dict[str, Any]]:
    """Sample ``request`` with ``models``: (PIL images, every setting as a JSON-ready dict).

    The settings hold the request, the sampler settings, the input files (path, sha256; the mask or
    ``centre``), every model used (flavor, weights file, sha256 or ``"random"``), ``random_weights`` and
    ``random_models``, device, dtype and durations. ``inputs`` are :func:`read_inputs`' (read here if None).
    """
    check_checkpoints(models.checkpoints.values(), request)
    inputs = inputs if inputs is not None else read_inputs(request)
    start = time.perf_counter()
    described = prepare_models(models, request)
    autocast = (
        torch.autocast(models.device.type, dtype=models.dtype)
        if models.dtype != torch.float32
        else nullcontext()
    )
    with torch.no_grad(), autocast:
        images = _sample(models, request, inputs)
    pixels = sampling.to_uint8(images)
    settings = {
        "command": "cascade sample",
        **{k: v for k, v in dataclasses.asdict(request).items() if not k.startswith(("c_", "b_"))},
        **inputs.described,  # image and mask: path and sha256
        **_sampler_settings(request),
        "output_size": [int(images.shape[-2]), int(images.shape[-1])],
        **described,
        "durations": {"load_s": round(models.load_s, 3), "sample_s": round(time.perf_counter() - start, 3)},
    }
    if request.mode != "image-to-image":
        settings["strength"] = None
    return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels], settings


def check_output(output_dir: str | Path) -> Path:
    """The output folder, refused when it is a file."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--output {out}: is a file, not a folder")
    return out


def write_samples(images: list[Image.Image], settings: dict[str, Any], output_dir: str | Path) -> list[Path]:
    """``sample_000.png``, ... and ``sample.json`` (the settings plus the file names) in ``output_dir``.

    Each PNG carries the settings (without durations, so the same seed gives the same bytes) in the text chunk
    ``cascade.sample``, with its index in the batch, and ``cascade.random_weights`` ("true"/"false")."""
    out = check_output(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"sample_{i:03d}.png" for i in range(len(images))]
    stable = {k: v for k, v in settings.items() if k != "durations"}
    for i, (image, name) in enumerate(zip(images, names, strict=True)):
        info = PngInfo()
        info.add_text(PNG_KEY, json.dumps(stable | {"file": name, "batch_index": i}))
        info.add_text("cascade.random_weights", "true" if settings["random_weights"] else "false")
        image.save(out / name, pnginfo=info)
    (out / JSON_NAME).write_text(json.dumps(settings | {"files": names}, indent=2) + "\n")
    return [out / name for name in names]


# --- the command ----------------------------------------------------------------------------------------
def request_from_args(args: argparse.Namespace) -> SampleRequest:
    fields = {f.name for f in dataclasses.fields(SampleRequest)}
    return SampleRequest(**{k: v for k, v in vars(args).items() if k in fields and v is not None})


def source_from_args(args: argparse.Namespace) -> ModelSource:
    return ModelSource(
        weights=args.weights,
        checkpoints=tuple(args.checkpoint or ()),
        flavors=args.flavors,
        stage_c=args.stage_c,
        stage_b=args.stage_b,
        device=args.device,
        dtype=args.dtype,
    )


def cmd_sample(args: argparse.Namespace) -> int:
    """Check the request and read its inputs, load the models, sample, write (mistakes raise early)."""
    request = request_from_args(args)
    check_output(args.output)
    inputs = read_inputs(request)
    source = source_from_args(args)
    check_checkpoints(read_checkpoints(source.checkpoints).values(), request)
    models = load_models(source)
    banner = random_banner(prepare_models(models, request)["random_models"])
    if banner:
        print(f"cascade sample: {banner}", file=sys.stderr, flush=True)
    images, settings = run_sample(models, request, inputs)
    files = write_samples(images, settings, args.output)
    took, (height, width) = settings["durations"], settings["output_size"]
    names = ", ".join(f.name for f in files)
    print(
        f"cascade sample: {len(files)} image(s) of {width}×{height} in {took['sample_s']:.1f} s (models "
        f"{took['load_s']:.1f} s): {names} and {JSON_NAME} in {args.output}"
        + (" (RANDOM WEIGHTS)" if banner else "")
    )
    return 0


def add_sample_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``cascade sample``."""
    d = SampleRequest()
    help_text = "sample images: text-to-image, image variation, image-to-image, reconstruction, ControlNet"
    p = sub.add_parser(
        "sample", help=help_text, description=help_text + ". Defaults are the official notebooks'."
    )
    p.add_argument("--mode", choices=MODES, default=d.mode, help=f"default: {d.mode}")
    p.add_argument("--prompt", default=None, help="the caption (none for image-variation)")
    p.add_argument(
        "--image", default=None, metavar="PATH", help="the input image (every mode but text-to-image)"
    )
    p.add_argument(
        "--control", choices=tuple(CONTROL_KINDS), default=None, help="the ControlNet (--mode controlnet)"
    )
    p.add_argument(
        "--mask", default=None, metavar="PATH", help="inpainting: white where to paint (default: the centre)"
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"default: {d.seed}")
    p.add_argument("--batch", type=int, default=d.batch, help=f"images per run (default: {d.batch})")
    p.add_argument("--height", type=int, default=d.height, help=f"output pixels (default: {d.height})")
    p.add_argument("--width", type=int, default=d.width, help=f"output pixels (default: {d.width})")
    for prefix, stage in (("c", "Stage C"), ("b", "Stage B")):
        for name, kind in (("steps", int), ("cfg", float), ("shift", float)):
            field = f"{prefix}_{name}"
            default = getattr(d, field)
            p.add_argument(
                f"--{prefix}-{name}",
                dest=field,
                type=kind,
                default=default,
                help=f"{stage} {name} ({default})",
            )
    p.add_argument(
        "--strength", type=float, default=d.strength, help=f"image-to-image noise (default: {d.strength})"
    )
    p.add_argument(
        "--weights", default=None, metavar="DIR", help="released weights under their official file names"
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        metavar="DIR",
        help="a checkpoint_<step>/ of train-c, train-lora, train-controlnet or train-b (one of each)",
    )
    p.add_argument(
        "--flavors",
        choices=tuple(PRESETS),
        default="released",
        help="released (default; needs --weights) or tiny (random weights, for tests)",
    )
    p.add_argument(
        "--stage-c", default=None, metavar="FLAVOR", help="e.g. stage_c/1b (default: stage_c/3.6b)"
    )
    p.add_argument(
        "--stage-b", default=None, metavar="FLAVOR", help="e.g. stage_b/700m (default: stage_b/1.5b)"
    )
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="default: float32")
    p.add_argument("--output", default="cascade-sample", metavar="DIR", help="default: ./cascade-sample")
    p.set_defaults(func=cmd_sample)
