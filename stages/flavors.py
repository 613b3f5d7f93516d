"""Every model is built from a named flavor: the released configs and a ``*/tiny`` twin of each.

A flavor knows its config, its class and the official file names of its released weights. Building
never downloads: weights come from a path or fsspec URL the user gives (``build_model(..., weights=)``).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from torch import nn

from stages import conditioners, controlnet, effnet, previewer, stage_a, stage_b, stage_c
from stages.weights import StorageOptions, load_weights

# Official file names (spec §6), preferred first. Conditioners are HF-format folders.
_FILES: dict[str, tuple[str, ...]] = {
    "stage_c/3.6b": ("stage_c_bf16.safetensors", "stage_c.safetensors"),
    "stage_c/1b": ("stage_c_lite_bf16.safetensors", "stage_c_lite.safetensors"),
    "stage_b/1.5b": ("stage_b_bf16.safetensors", "stage_b.safetensors"),
    "stage_b/700m": ("stage_b_lite_bf16.safetensors", "stage_b_lite.safetensors"),
    "stage_a": ("stage_a.safetensors",),
    "effnet": ("effnet_encoder.safetensors",),
    "previewer": ("previewer.safetensors",),
    "controlnet/canny": ("canny.safetensors", "controlnet/canny.safetensors"),
    "controlnet/inpainting": ("inpainting.safetensors", "controlnet/inpainting.safetensors"),
    "controlnet/super_resolution": (
        "super_resolution.safetensors",
        "controlnet/super_resolution.safetensors",
    ),
    "clip_text/bigg": ("text_encoder",),
    "clip_vision/l14": ("image_encoder",),
}


@dataclass(frozen=True)
class Flavor:
    """A named model configuration."""

    name: str
    family: str
    config: Any
    model_cls: type[nn.Module]
    files: tuple[str, ...]

    @property
    def tiny(self) -> bool:
        return self.name.endswith("/tiny")

    @property
    def seed(self) -> int:
        """The seed of this flavor's random init: every process builds the same random weights."""
        return zlib.crc32(self.name.encode())

    def build(
        self, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> nn.Module:
        """Instantiate with the official init, seeded by the flavor name; ``device="meta"`` allocates nothing.

        Seeding matters for random-weight (tiny) flavors: two Ray actors must hold identical models.
        The global RNG state is left untouched.
        """
        with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
            torch.manual_seed(self.seed)
            model = self.model_cls(self.config)
        return model.to(dtype=dtype) if dtype is not None else model

    def num_params(self) -> int:
        """Exact parameter count, built on the meta device (instant for every size)."""
        return sum(p.numel() for p in self.build(device="meta").parameters())


def _collect() -> dict[str, Flavor]:
    sources = [
        ("stage_c", stage_c.FLAVORS, stage_c.StageC),
        ("stage_b", stage_b.FLAVORS, stage_b.StageB),
        ("stage_a", stage_a.FLAVORS, stage_a.StageA),
        ("effnet", effnet.FLAVORS, effnet.EfficientNetEncoder),
        ("previewer", previewer.FLAVORS, previewer.Previewer),
        ("controlnet", controlnet.FLAVORS, controlnet.ControlNet),
        ("clip_text", conditioners.TEXT_FLAVORS, conditioners.ClipTextConditioner),
        ("clip_vision", conditioners.VISION_FLAVORS, conditioners.ClipVisionConditioner),
    ]
    out: dict[str, Flavor] = {}
    for family, configs, cls in sources:
        for name, config in configs.items():
            out[name] = Flavor(name, family, config, cls, _FILES.get(name, ()))
    return out


FLAVORS: dict[str, Flavor] = _collect()


def get_flavor(name: str) -> Flavor:
    """Look up a flavor; an unknown name lists the known ones."""
    try:
        return FLAVORS[name]
    except KeyError:
        raise ValueError(f"unknown flavor {name!r}; known flavors: {', '.join(sorted(FLAVORS))}") from None


def find_weights(
    flavor: Flavor, weights_dir: str | os.PathLike, storage_options: StorageOptions = None
) -> str:
    """The first official file of ``flavor`` present in ``weights_dir`` (local or fsspec URL)."""
    if not flavor.files:
        raise ValueError(
            f"flavor {flavor.name!r} has no released weights (tiny flavors are random-init only)"
        )
    base = os.fspath(weights_dir).rstrip("/")
    fs, root = fsspec.core.url_to_fs(base, **(storage_options or {}))
    for name in flavor.files:
        if fs.exists(f"{root}/{name}"):
            return f"{base}/{name}"
    raise FileNotFoundError(f"none of {', '.join(flavor.files)} found in {base} for flavor {flavor.name!r}")


def build_model(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    storage_options: StorageOptions = None,
) -> tuple[nn.Module, str | None]:
    """Build a flavor in eval mode, optionally loading weights strictly; returns (model, weights sha256).

    Args:
        name: flavor name, e.g. ``"stage_c/1b"`` or ``"effnet/tiny"``.
        weights: a safetensors file (local path or fsspec URL) in the official key layout, or for the CLIP
            conditioners a local HF-format folder. None keeps the seeded random init.
        device: where the model lives.
        dtype: cast after loading (e.g. ``torch.bfloat16``); None keeps fp32.
        storage_options: fsspec options for a URL (``endpoint_url``, credentials, ...).
    """
    flavor = get_flavor(name)
    sha = None
    if weights is None:
        model = flavor.build(device="cpu")
    elif flavor.family in ("clip_text", "clip_vision"):
        model = flavor.model_cls.from_local_dir(flavor.config, os.fspath(weights))
        sha = model.weights_sha256
    else:
        model = flavor.build(device="meta")
        sha = load_weights(model, weights, assign=True, storage_options=storage_options)
        model = model.float()
    model = model.to(device=device, dtype=dtype).eval()
    return model, sha
