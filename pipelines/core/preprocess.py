"""Deterministic crops for latent encoding: the official Stable Cascade image path, frozen for caching.

Two modes, both on (3, H, W) float images in [0, 1] (``pipelines.core.images.to_float_chw``):

* ``"center"``: ``Resize(image_size, bilinear, antialias)`` on the short side, then a center crop of
  image_size² (the official path crops with SmartCrop; cached data uses the center crop Stage B's eval uses).
* ``"buckets"``: the official ``Bucketeer`` at density image_size², factor 32, the ratios plus their
  reciprocals: the closest bucket by |w/h − r|, a short-side resize (bilinear, antialias) to the smallest size
  that covers it, then a center crop (official: RandomCrop, and a random bucket 5% of the time; neither is
  stored, see DESIGN.md "No training-time randomness in stored data").

Conventions:

* Sizes are (h, w) in pixels; a ratio r is w/h, so r = 1/2 is a tall bucket (h > w).
* The bucket choice reproduces the official float comparison exactly, tie-breaks included (the first
  ratio in order wins). Bucket sizes use exact integer arithmetic; at the official settings they equal the
  official float computation's 21 sizes.
* The crop box is ``(left, top, right, bottom)`` in *original* pixels, as ints rounded outward
  (floor left/top, ceil right/bottom): the smallest integer box that contains the exact crop region.
* Bucket names are in effnet latent cells (32 px), width first: ``"WxH"`` as ``schemas.columns.BUCKET``
  documents, e.g. 768² -> ``"24x24"``, h 672 × w 832 -> ``"26x21"``.
* Output pixels are float32, clamped to [0, 1] (a no-op for bilinear up to float rounding; bicubic
  overshoots).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

#: Effnet downsampling: one latent cell is 32×32 px. Every output size is a multiple of it.
LATENT_CELL_PX = 32
#: The 12 ratios (w/h) of the official multi-aspect training configs; reciprocals are appended.
OFFICIAL_RATIOS: tuple[str, ...] = (
    "1",
    "1/2",
    "1/3",
    "2/3",
    "3/4",
    "1/5",
    "2/5",
    "3/5",
    "4/5",
    "1/6",
    "5/6",
    "9/16",
)
#: Bumped whenever this module's pixel output changes for the same config.
SPEC_VERSION = 1

Mode = Literal["center", "buckets"]
_INTERPOLATIONS = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _parse_ratio(value: Any) -> Fraction:
    """A positive w/h ratio from a float, int, Fraction or "w/h" string (floats snap to denominators ≤ 10⁴)."""
    try:
        if isinstance(value, bool):
            raise TypeError("bool")
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError("not finite")
            ratio = Fraction(value).limit_denominator(10_000)
        elif isinstance(value, int | Fraction | str):
            ratio = Fraction(value.strip() if isinstance(value, str) else value)
        else:
            raise TypeError(type(value).__name__)
    except (TypeError, ValueError, ZeroDivisionError) as err:
        raise ValueError(f"ratios: {value!r} is not a ratio (float or 'w/h' string): {err}") from err
    if ratio <= 0:
        raise ValueError(f"ratios: {value!r} must be positive")
    return ratio


def _check_size(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % LATENT_CELL_PX:
        raise ValueError(f"{name} must be a positive multiple of {LATENT_CELL_PX}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class PreprocessConfig:
    """How images become encoder inputs. ``ratios`` is normalised to canonical "w/h" strings, deduplicated."""

    mode: Mode = "center"
    image_size_px: int = 768  # effnet input side (center) or √density (buckets)
    factor: int = 32  # bucket sides are multiples of this
    ratios: tuple[float | str, ...] = OFFICIAL_RATIOS
    stage_a_size_px: int = 1024  # Stage A input side (always center mode)
    antialias: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.mode not in ("center", "buckets"):
            raise ValueError(f"mode must be 'center' or 'buckets', got {self.mode!r}")
        for name in ("image_size_px", "factor", "stage_a_size_px"):
            _check_size(name, getattr(self, name))
        if not isinstance(self.antialias, bool):
            raise ValueError(f"antialias must be a bool, got {self.antialias!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}"
            )
        if isinstance(self.ratios, str | bytes) or not hasattr(self.ratios, "__iter__"):
            raise ValueError(f"ratios must be a sequence of ratios, got {self.ratios!r}")
        canonical = tuple(dict.fromkeys(str(_parse_ratio(r)) for r in self.ratios))
        if not canonical:
            raise ValueError("ratios must not be empty")
        object.__setattr__(self, "ratios", canonical)
        for r, (h, w) in _ratio_table(self.image_size_px, self.factor, canonical):
            if h <= 0 or w <= 0:
                raise ValueError(
                    f"ratios: {r} gives an empty bucket {h}x{w} at this image_size_px and factor"
                )

    def spec(self) -> dict[str, Any]:
        """Everything that affects the pixels, as JSON types (for ``schemas.preprocessing_hash``).

        Bucket parameters (factor, ratios) are included only in "buckets" mode, where they matter.
        """
        spec: dict[str, Any] = {
            "preprocess_version": SPEC_VERSION,
            "mode": self.mode,
            "image_size_px": self.image_size_px,
            "stage_a_size_px": self.stage_a_size_px,
            "interpolation": self.interpolation,
            "antialias": self.antialias and self.interpolation != "nearest",  # torchvision ignores it there
            "crop": "center",
            "clamp": [0.0, 1.0],
            "dtype": "float32",
            "torchvision": torchvision.__version__,
        }
        if self.mode == "buckets":
            spec["factor"] = self.factor
            spec["ratios"] = list(self.ratios)
            spec["reciprocals"] = True
        return spec


@lru_cache(maxsize=64)
def _ratio_table(
    size_px: int, factor: int, ratios: tuple[str, ...]
) -> tuple[tuple[float, tuple[int, int]], ...]:
    """(ratio, (h, w)) for the ratios plus missing reciprocals, in the official order.

    Ratios stay Python floats as in the official code (its reciprocal test and bucket choice compare floats);
    sizes use exact arithmetic, (⌊√(d/r)/f⌋·f, ⌊√(d·r)/f⌋·f), so they cannot depend on a libm's pow.
    """
    exact = [Fraction(r) for r in ratios]
    floats = [float(r) for r in exact]
    for r, rf in zip(list(exact), list(floats), strict=True):
        if 1 / rf not in floats:
            exact.append(1 / r)
            floats.append(1 / rf)
    density = size_px * size_px
    table = []
    for r, rf in zip(exact, floats, strict=True):
        # ⌊√x⌋ = isqrt(⌊x⌋) for real x ≥ 0
        h = math.isqrt(math.floor(density / r)) // factor * factor
        w = math.isqrt(math.floor(density * r)) // factor * factor
        table.append((rf, (h, w)))
    return tuple(table)


def buckets(config: PreprocessConfig) -> list[tuple[int, int]]:
    """Distinct output sizes (h, w) this config can produce, in ratio order ([(s, s)] in center mode)."""
    if config.mode == "center":
        return [(config.image_size_px, config.image_size_px)]
    table = _ratio_table(config.image_size_px, config.factor, config.ratios)
    return list(dict.fromkeys(size for _, size in table))


def choose_bucket(height: int, width: int, config: PreprocessConfig) -> tuple[int, int]:
    """The (h, w) bucket whose ratio is closest by |width/height − r| (official float comparison, first on ties)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width} (h x w)")
    if config.mode == "center":
        return (config.image_size_px, config.image_size_px)
    aspect = width / height
    table = _ratio_table(config.image_size_px, config.factor, config.ratios)
    return min(table, key=lambda entry: abs(aspect - entry[0]))[1]  # min keeps the first of equal keys


def bucket_name(h: int, w: int) -> str:
    """Latent-cell name of an (h, w) pixel size, width first: (672, 832) -> "26x21"."""
    if h <= 0 or w <= 0 or h % LATENT_CELL_PX or w % LATENT_CELL_PX:
        raise ValueError(f"bucket sides must be positive multiples of {LATENT_CELL_PX}, got h={h} w={w}")
    return f"{w // LATENT_CELL_PX}x{h // LATENT_CELL_PX}"


def parse_bucket_name(name: str) -> tuple[int, int]:
    """Inverse of :func:`bucket_name`: "26x21" -> (h, w) = (672, 832) pixels."""
    try:
        cells_w, cells_h = (int(part) for part in name.split("x"))
    except ValueError as err:
        raise ValueError(f"not a bucket name: {name!r}") from err
    if cells_w <= 0 or cells_h <= 0:
        raise ValueError(f"not a bucket name: {name!r}")
    return (cells_h * LATENT_CELL_PX, cells_w * LATENT_CELL_PX)


class CropResult(NamedTuple):
    """An encoder input and where it came from."""

    pixels: torch.Tensor  # (3, h, w) float32 in [0, 1]
    bucket: tuple[int, int]  # (h, w) pixels
    crop_box: tuple[int, int, int, int]  # (left, top, right, bottom) in original pixels, rounded outward
    orig: tuple[int, int]  # (h, w) of the input

    @property
    def name(self) -> str:
        """The bucket's latent-cell name ("WxH")."""
        return bucket_name(*self.bucket)


def _as_chw_float32(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor or numpy array, got {type(image).__name__}")
    if tensor.ndim != 3 or tensor.shape[0] != 3 or tensor.shape[1] < 1 or tensor.shape[2] < 1:
        raise ValueError(f"expected a (3, H, W) image, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(
            f"expected a float image in [0, 1] (pipelines.core.images.to_float_chw), got {tensor.dtype}"
        )
    return tensor.to(torch.float32)


def _cover_short_side(orig: tuple[int, int], target: tuple[int, int]) -> int:
    """The smallest short-side size whose torchvision resize covers ``target`` (official get_resize_size).

    torchvision's short side is the width when w <= h; its long side becomes int(s·long/short) ≥ the target.
    Equal to the official formula whenever the image and target orientations agree, which is always
    true for the closest bucket; for an explicit opposite-orientation target this is the minimal cover.
    """
    (h, w), (th, tw) = orig, target
    short, long, t_short, t_long = (w, h, tw, th) if w <= h else (h, w, th, tw)
    return max(t_short, -(-t_long * short // long))


def crop_for_encoding(
    image: torch.Tensor | np.ndarray, config: PreprocessConfig, *, target: tuple[int, int] | None = None
) -> CropResult:
    """Resize and center-crop a (3, H, W) float [0, 1] image to its bucket (or to an explicit (h, w) target).

    Center mode equals ``Compose([Resize(image_size, bilinear, antialias), CenterCrop(image_size)])``.
    """
    pixels = _as_chw_float32(image)
    orig = (int(pixels.shape[1]), int(pixels.shape[2]))
    if target is None:
        target = choose_bucket(*orig, config)
    th, tw = (int(v) for v in target)
    if th <= 0 or tw <= 0:
        raise ValueError(f"target must be a positive (h, w), got {target!r}")
    resized = TF.resize(
        pixels,
        [_cover_short_side(orig, (th, tw))],
        interpolation=_INTERPOLATIONS[config.interpolation],
        antialias=config.antialias,
    )
    rh, rw = int(resized.shape[1]), int(resized.shape[2])
    if rh < th or rw < tw:  # cannot happen (see _cover_short_side); never pad silently
        raise AssertionError(f"resize of {orig} gave {(rh, rw)}, smaller than the target {(th, tw)}")
    top, left = round((rh - th) / 2.0), round((rw - tw) / 2.0)  # torchvision's center_crop anchor
    out = resized[:, top : top + th, left : left + tw].clamp(0.0, 1.0).contiguous()
    (h, w) = orig
    box = (
        left * w // rw,  # floor: exact integer arithmetic for edge·(orig/resized)
        top * h // rh,
        -(-(left + tw) * w // rw),  # ceil
        -(-(top + th) * h // rh),
    )
    return CropResult(out, (th, tw), box, orig)


def crop_for_stage_a(image: torch.Tensor | np.ndarray, config: PreprocessConfig) -> CropResult:
    """Stage A input: center mode at ``stage_a_size_px`` (the official Stage B training data at 1024)."""
    side = config.stage_a_size_px
    return crop_for_encoding(image, config, target=(side, side))
