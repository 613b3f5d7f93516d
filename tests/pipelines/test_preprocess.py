"""pipelines.core.preprocess: the official Stable Cascade crop/bucket path, frozen to deterministic center crops."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
import torch
import torchvision
from skimage import data as skdata
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F1

from pipelines.core.images import decode_rgb, to_float_chw
from pipelines.core.preprocess import (
    OFFICIAL_RATIOS,
    CropResult,
    PreprocessConfig,
    bucket_name,
    buckets,
    choose_bucket,
    crop_for_encoding,
    crop_for_stage_a,
    parse_bucket_name,
)
from schemas import preprocessing_hash
from tests.pipelines.photos import jpeg

CENTER = PreprocessConfig()
BUCKETS = PreprocessConfig(mode="buckets")

# The 21 distinct sizes at 768 from the reference (h × w as the reference lists them), plus transposes.
REFERENCE_768 = [
    (768, 768), (832, 672), (864, 640), (928, 608), (960, 576), (1024, 576),
    (1056, 512), (1184, 480), (1312, 416), (1696, 320), (1856, 288),
]  # fmt: skip


@cache
def photo(name: str) -> torch.Tensor:
    """A scikit-image photo as a (3, H, W) float32 tensor in [0, 1], through the real decode path."""
    return torch.from_numpy(to_float_chw(decode_rgb(jpeg(name), max_pixels=10**8)))


def official_sizes_and_ratios(
    size_px: int = 768, factor: int = 32
) -> tuple[list[tuple[int, int]], list[float]]:
    """The official Bucketeer's float computation, restated: ratios + reciprocals, then sizes."""
    ratios = [1 / 1, 1 / 2, 1 / 3, 2 / 3, 3 / 4, 1 / 5, 2 / 5, 3 / 5, 4 / 5, 1 / 6, 5 / 6, 9 / 16]
    for r in list(ratios):
        if 1 / r not in ratios:
            ratios.append(1 / r)
    d = size_px**2
    sizes = [(int((d / r) ** 0.5 // factor * factor), int((d * r) ** 0.5 // factor * factor)) for r in ratios]
    return sizes, ratios


def official_resize_size(orig: tuple[int, int], tgt: tuple[int, int]) -> int:
    """The official Bucketeer.get_resize_size, restated."""
    if (tgt[1] / tgt[0] - 1) * (orig[1] / orig[0] - 1) >= 0:
        return max(math.ceil(max(tgt) * min(orig) / max(orig)), min(tgt))
    return max(math.ceil(min(tgt) * max(orig) / min(orig)), max(tgt))


def ramps(h: int, w: int) -> torch.Tensor:
    """Channel 0 = (x + 0.5) / w, channel 1 = (y + 0.5) / h, channel 2 = 0.5: positions readable from pixels."""
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    return torch.stack(
        [xs.expand(h, w), ys[:, None].expand(h, w), torch.full((h, w), 0.5, dtype=torch.float64)]
    )


# ---------------------------------------------------------------------------------------------------- buckets


def test_official_buckets_at_768():
    sizes = buckets(BUCKETS)
    assert len(sizes) == 21 == len(set(sizes))
    assert set(sizes) == set(REFERENCE_768) | {(w, h) for h, w in REFERENCE_768}
    assert sizes == list(dict.fromkeys(official_sizes_and_ratios()[0]))  # same sizes, same order
    # r = w/h: ratio 1/2 is a TALL bucket, its reciprocal 2 the wide one
    assert sizes[1] == (1056, 512)
    assert choose_bucket(2000, 1000, BUCKETS) == (1056, 512)
    assert choose_bucket(1000, 2000, BUCKETS) == (512, 1056)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in sizes)
    assert buckets(CENTER) == [(768, 768)]


def test_bucket_names_are_latent_cells_width_first():
    assert bucket_name(768, 768) == "24x24"
    assert bucket_name(672, 832) == "26x21"  # h 672, w 832: 26 cells wide, 21 tall
    names = {bucket_name(h, w) for h, w in buckets(BUCKETS)}
    assert {"24x24", "58x9", "9x58", "32x18", "18x32"} <= names  # reference: latents from 24×24 to 58×9
    for size in buckets(BUCKETS):
        assert parse_bucket_name(bucket_name(*size)) == size
    for bad in [(770, 768), (0, 768)]:
        with pytest.raises(ValueError):
            bucket_name(*bad)
    for bad in ["24", "ax3", "0x24", "24x24x1"]:
        with pytest.raises(ValueError):
            parse_bucket_name(bad)


def test_choose_bucket_on_photo_sizes():
    h, w = skdata.chelsea().shape[:2]
    assert (h, w) == (300, 451)
    assert choose_bucket(h, w, BUCKETS) == (608, 928)  # w/h 1.503 -> ratio 3/2
    assert bucket_name(608, 928) == "29x19"
    assert choose_bucket(*skdata.astronaut().shape[:2], BUCKETS) == (768, 768)
    assert choose_bucket(200, 1200, BUCKETS) == (288, 1856)  # 6:1 panorama -> the widest bucket
    assert choose_bucket(1200, 200, BUCKETS) == (1856, 288)  # and the tallest
    # 1000×250 (w×h) is 4:1, exactly between ratios 3 and 5: the first in order (3, from 1/3) wins
    assert choose_bucket(250, 1000, BUCKETS) == (416, 1312)
    # tall 1:4 is closer to 1/5 than to 1/3 (|w/h − r| is not symmetric under transposition)
    assert choose_bucket(1000, 250, BUCKETS) == (1696, 320)
    assert choose_bucket(300, 451, CENTER) == (768, 768)
    with pytest.raises(ValueError):
        choose_bucket(0, 10, BUCKETS)


def test_choose_bucket_and_resize_match_official_float_code():
    from pipelines.core.preprocess import _cover_short_side

    sizes, ratios = official_sizes_and_ratios()
    for h in range(40, 4000, 53):
        for w in range(40, 4000, 61):
            official = sizes[int(np.argmin([abs(w / h - r) for r in ratios]))]
            assert choose_bucket(h, w, BUCKETS) == official, (h, w)
            assert _cover_short_side((h, w), official) == official_resize_size((h, w), official), (h, w)
    # an exact tie that the official float comparison breaks towards 5/6 (not the first ratio, 1)
    assert choose_bucket(1572, 1441, BUCKETS) == (832, 672)


# ------------------------------------------------------------------------------------------------------ crops


def test_center_mode_equals_torchvision_resize_center_crop():
    image = photo("chelsea")
    result = crop_for_encoding(image, CENTER)
    reference = T.Compose(
        [T.Resize(768, interpolation=InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(768)]
    )(image)
    assert isinstance(result, CropResult)
    assert result.pixels.shape == (3, 768, 768) and result.pixels.dtype == torch.float32
    assert torch.equal(result.pixels, reference.clamp(0, 1))
    assert (result.pixels - reference).abs().max() <= 1e-6  # the clamp only trims float rounding
    assert result.bucket == (768, 768) and result.name == "24x24"
    assert result.orig == (300, 451)
    # resized to 768×1154, crop columns 193..961 -> 193·451/1154 = 75.4, 961·451/1154 = 375.6
    assert result.crop_box == (75, 0, 376, 300)


def test_buckets_mode_equals_official_bucketeer_with_center_crop():
    for name in ("chelsea", "astronaut", "rocket", "coffee"):
        image = photo(name)
        result = crop_for_encoding(image, BUCKETS)
        size = choose_bucket(*image.shape[1:], BUCKETS)
        resized = F1.resize(
            image,
            official_resize_size(tuple(image.shape[1:]), size),
            InterpolationMode.BILINEAR,
            antialias=True,
        )
        reference = F1.center_crop(resized, list(size))
        assert result.bucket == size and result.pixels.shape == (3, *size)
        assert torch.equal(result.pixels, reference.clamp(0, 1)), name
    assert crop_for_encoding(photo("astronaut"), BUCKETS).crop_box == (0, 0, 512, 512)  # square: everything


@pytest.mark.parametrize(
    ("mode", "h", "w"),
    [
        ("center", 300, 451),
        ("center", 97, 131),  # upscale
        ("center", 1200, 1601),  # downscale
        ("buckets", 300, 451),
        ("buckets", 1000, 250),
        ("buckets", 333, 2000),
        ("buckets", 1300, 1100),
        ("buckets", 120, 190),
    ],
)
def test_crop_box_matches_the_pixels(mode: str, h: int, w: int):
    """Read the crop's position back from position-encoding ramps and check the recorded box analytically."""
    config = PreprocessConfig(mode=mode)
    result = crop_for_encoding(ramps(h, w), config)
    th, tw = result.bucket
    assert result.pixels.shape == (3, th, tw) and result.orig == (h, w)
    left, top, right, bottom = result.crop_box
    assert 0 <= left < right <= w and 0 <= top < bottom <= h
    for axis, n, size, lo, hi in ((2, w, tw, left, right), (1, h, th, top, bottom)):
        line = result.pixels[0, th // 2, :] if axis == 2 else result.pixels[1, :, tw // 2]
        line = line.double() * n  # = original pixel-centre coordinate + 0.5, linear away from borders
        # fit line[j] = start + (j + 0.5)·scale over the middle (antialiasing jitters single samples by ~0.1 px)
        j = torch.arange(size // 8, size - size // 8, dtype=torch.float64)
        design = torch.stack([torch.ones_like(j), j + 0.5], dim=1)
        start, scale = (
            torch.linalg.lstsq(design, line[size // 8 : size - size // 8, None]).solution[:, 0].tolist()
        )
        end = start + size * scale
        assert lo <= start + 0.05 and start - lo < 1 + 0.05, (axis, start, lo)
        assert end - 0.05 <= hi and hi - end < 1 + 0.05, (axis, end, hi)
        assert abs((start + end) / 2 - n / 2) <= 1.0  # centred


def test_deterministic_and_accepts_numpy():
    array = to_float_chw(decode_rgb(jpeg("coffee"), max_pixels=10**8))
    first = crop_for_encoding(array, BUCKETS)
    second = crop_for_encoding(torch.from_numpy(array.copy()), BUCKETS)
    assert torch.equal(first.pixels, second.pixels)
    assert first.bucket == second.bucket and first.crop_box == second.crop_box
    torch.manual_seed(1234)
    assert torch.equal(crop_for_encoding(array, BUCKETS).pixels, first.pixels)  # no RNG involved
    assert first.pixels.is_contiguous()


def test_stage_a_crop_is_center_1024():
    image = photo("chelsea")
    for config in (CENTER, BUCKETS):
        result = crop_for_stage_a(image, config)
        assert result.pixels.shape == (3, 1024, 1024) and result.bucket == (1024, 1024)
        reference = T.CenterCrop(1024)(T.Resize(1024, antialias=True)(image))
        assert torch.equal(result.pixels, reference.clamp(0, 1))
        assert result.crop_box[1::2] == (0, 300)
    small = PreprocessConfig(stage_a_size_px=256)
    assert crop_for_stage_a(image, small).pixels.shape == (3, 256, 256)


def test_range_dtype_and_input_checks():
    image = photo("astronaut")
    bicubic = crop_for_encoding(image.double(), PreprocessConfig(interpolation="bicubic"))
    assert bicubic.pixels.dtype == torch.float32
    assert bicubic.pixels.min() >= 0 and bicubic.pixels.max() <= 1
    nearest = crop_for_encoding(image, PreprocessConfig(interpolation="nearest"))
    assert set(torch.unique(nearest.pixels).tolist()) <= set(torch.unique(image).tolist())
    explicit = crop_for_encoding(image, BUCKETS, target=(672, 832))
    assert explicit.pixels.shape == (3, 672, 832) and explicit.crop_box == (0, 49, 512, 463)
    with pytest.raises(ValueError, match="float"):
        crop_for_encoding((image * 255).to(torch.uint8), CENTER)
    with pytest.raises(ValueError, match="shape"):
        crop_for_encoding(image[:1], CENTER)
    with pytest.raises(ValueError, match="target"):
        crop_for_encoding(image, CENTER, target=(0, 32))


# ----------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mode", "random"),
        ("image_size_px", 0),
        ("image_size_px", 770),
        ("image_size_px", 768.0),
        ("image_size_px", True),
        ("factor", 16),
        ("stage_a_size_px", 1000),
        ("antialias", "yes"),
        ("interpolation", "lanczos"),
        ("ratios", ()),
        ("ratios", "1/2"),
        ("ratios", ("0",)),
        ("ratios", ("a/b",)),
        ("ratios", ("1/0",)),
        ("ratios", (float("nan"),)),
        ("ratios", (-1.0,)),
        ("ratios", (1 / 1000,)),  # a 24×0 bucket
    ],
)
def test_config_validation_names_the_field(field: str, value: object):
    with pytest.raises(ValueError, match=field):
        PreprocessConfig(**{field: value})


def test_ratios_normalise():
    floats = PreprocessConfig(
        ratios=[1 / 1, 1 / 2, 1 / 3, 2 / 3, 3 / 4, 1 / 5, 2 / 5, 3 / 5, 4 / 5, 1 / 6, 5 / 6, 9 / 16]
    )
    assert floats == CENTER and floats.ratios == OFFICIAL_RATIOS
    assert PreprocessConfig(ratios=("1/2", " 2/4 ", 0.5, 1)).ratios == ("1/2", "1")
    with pytest.raises(AttributeError):
        CENTER.mode = "buckets"  # type: ignore[misc]
    with pytest.raises(TypeError):
        PreprocessConfig("buckets")  # type: ignore[misc]  # keyword-only


def test_spec_and_hash():
    spec = BUCKETS.spec()
    assert spec["torchvision"] == torchvision.__version__
    assert spec["ratios"] == list(OFFICIAL_RATIOS) and spec["factor"] == 32
    base = preprocessing_hash(BUCKETS.spec())
    assert preprocessing_hash(PreprocessConfig(mode="buckets").spec()) == base
    changes = [
        {"mode": "center"},
        {"image_size_px": 512},
        {"factor": 64},
        {"ratios": OFFICIAL_RATIOS[:-1]},
        {"ratios": (*OFFICIAL_RATIOS[1:], OFFICIAL_RATIOS[0])},  # order decides ties
        {"stage_a_size_px": 512},
        {"antialias": False},
        {"interpolation": "bicubic"},
    ]
    hashes = {preprocessing_hash(PreprocessConfig(**{"mode": "buckets", **c}).spec()) for c in changes}
    assert base not in hashes and len(hashes) == len(changes)
    # in center mode the bucket parameters do not touch the pixels, so they do not touch the hash
    center = preprocessing_hash(CENTER.spec())
    assert preprocessing_hash(PreprocessConfig(factor=64, ratios=("1",)).spec()) == center
    assert "ratios" not in CENTER.spec()
