"""pipelines.core.images: safe probing/decoding of untrusted bytes, on generated bad inputs and real web images."""

from __future__ import annotations

import io
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFile, ImageOps

from pipelines.core.images import (
    DEFAULT_FORMATS,
    IMAGE_EXTENSIONS,
    SIDECAR_EXTENSIONS,
    SUPPORTED_FORMATS,
    UNSUPPORTED_FORMATS,
    ImageError,
    ImageInfo,
    check_formats,
    check_geometry,
    decode_rgb,
    member_extension,
    probe_image,
    to_float_chw,
)
from tests.pipelines import corrupt
from tests.pipelines.photos import jpeg

MAX_PIXELS = 89_478_485


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: b"", "empty file"),
        (corrupt.html_named_jpg, "not an image"),
        (lambda: b"\x89PNG\r\n\x1a\n", "not an image"),  # a signature and nothing else
        (corrupt.bomb_png_header, "decompression bomb"),
        (corrupt.bomb_png_1bit, "decompression bomb"),
    ],
)
def test_header_failures_are_refused_by_probe_and_decode(make, reason):
    data = make()
    for fn in (probe_image, decode_rgb):
        with pytest.raises(ImageError) as err:
            fn(data, max_pixels=MAX_PIXELS)
        assert err.value.reason == reason, err.value


@pytest.mark.parametrize("make", [corrupt.truncated_jpeg, corrupt.truncated_png])
def test_truncated_files_probe_fine_but_do_not_decode(make):
    data = make()
    assert probe_image(data, max_pixels=MAX_PIXELS).width == 64  # the header is intact
    with pytest.raises(ImageError) as err:
        decode_rgb(data, max_pixels=MAX_PIXELS)
    assert err.value.reason == "truncated image"
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


@pytest.mark.parametrize("make", [corrupt.bomb_png_header, corrupt.bomb_png_1bit])
def test_bombs_are_refused_quickly_without_decoding(make, monkeypatch):
    data = make()

    def no_load(self):
        raise AssertionError("a bomb reached Image.load")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    start = time.perf_counter()
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_rgb(data, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - start < 1.0
    assert len(data) < 20_000


def test_own_pixel_limit_applies_before_pillows(monkeypatch):
    data = _encode(Image.new("RGB", (200, 100), corrupt.RED))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded"))
    for fn in (probe_image, decode_rgb):
        with pytest.raises(ImageError) as err:
            fn(data, max_pixels=19_999)
        assert err.value.reason == "decompression bomb"
        assert "200x100" in err.value.detail


def test_good_jpeg():
    data = corrupt.good_jpeg()
    assert probe_image(data, max_pixels=MAX_PIXELS) == ImageInfo("jpeg", 32, 24)
    rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
    assert rgb.shape == (24, 32, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), corrupt.RED, atol=3)


def test_cmyk_jpeg_becomes_rgb():
    data = corrupt.cmyk_jpeg()
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
    assert rgb.shape == (16, 16, 3)
    np.testing.assert_allclose(rgb.reshape(-1, 3).mean(0), corrupt.RED, atol=3)


@pytest.mark.parametrize("make", [corrupt.png_16bit_gray, corrupt.png_16bit_rgb])
def test_16_bit_pngs_are_scaled_to_8_bit(make):
    rgb = decode_rgb(make(), max_pixels=MAX_PIXELS)
    assert rgb.shape == (8, 24, 3)
    assert rgb[0, ::8].tolist() == [[0, 0, 0], [128, 128, 128], [255, 255, 255]]


def test_16_bit_gray_png_opens_in_a_16_bit_mode():
    assert Image.open(io.BytesIO(corrupt.png_16bit_gray())).mode == "I;16"


def test_int32_mode_is_read_as_16_bit_range():
    im = Image.fromarray(np.array([[0, 32896, 65535, 70000]] * 8, dtype=np.int32).repeat(2, axis=1))
    assert im.mode == "I"
    rgb = decode_rgb(_encode(im, "TIFF"), max_pixels=MAX_PIXELS)
    assert rgb[0, ::2, 0].tolist() == [0, 128, 255, 255]


def test_palette_transparency_is_composited_on_white():
    data = corrupt.palette_png_transparency()
    assert Image.open(io.BytesIO(data)).mode == "P"
    rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
    assert rgb[0, ::8].tolist() == [[255, 255, 255], [255, 0, 0], [127, 127, 255]]


@pytest.mark.parametrize(
    ("im", "expected"),
    [
        (Image.new("RGBA", (8, 8), (255, 0, 0, 0)), (255, 255, 255)),
        (Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),
        (Image.new("LA", (8, 8), (0, 255)), (0, 0, 0)),
        (Image.new("L", (8, 8), 77), (77, 77, 77)),
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
    ],
)
def test_modes_become_rgb(im, expected):
    rgb = decode_rgb(_encode(im), max_pixels=MAX_PIXELS)
    assert rgb.shape == (8, 8, 3)
    assert rgb[3, 3].tolist() == list(expected)


def test_exif_rotated_jpeg_swaps_sides_and_turns_upright():
    data = corrupt.exif_rotated_jpeg()
    assert Image.open(io.BytesIO(data)).size == (32, 16)
    assert probe_image(data, max_pixels=MAX_PIXELS) == ImageInfo("jpeg", 16, 32)
    rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
    assert rgb.shape == (32, 16, 3)
    np.testing.assert_allclose(rgb[:14].reshape(-1, 3).mean(0), corrupt.RED, atol=4)
    np.testing.assert_allclose(rgb[18:].reshape(-1, 3).mean(0), corrupt.BLUE, atol=4)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_imageops(orientation):
    pixels = np.arange(12 * 20 * 3, dtype=np.uint8).reshape(12, 20, 3)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(Image.fromarray(pixels), "PNG", exif=exif.tobytes())
    reference = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
    np.testing.assert_array_equal(rgb, reference)
    info = probe_image(data, max_pixels=MAX_PIXELS)
    assert (info.height, info.width) == rgb.shape[:2]


def test_animated_gif_gives_the_first_frame():
    data = corrupt.animated_gif()
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert probe_image(data, max_pixels=MAX_PIXELS) == ImageInfo("gif", 16, 16)
    rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
    assert (rgb == corrupt.RED).all()


def test_degenerate_sizes_decode_but_fail_geometry():
    for data, size in ((corrupt.one_by_one_png(), (1, 1)), (corrupt.wide_png(), (10000, 10))):
        info = probe_image(data, max_pixels=MAX_PIXELS)
        assert (info.width, info.height) == size
        assert decode_rgb(data, max_pixels=MAX_PIXELS).shape == (size[1], size[0], 3)
    with pytest.raises(ImageError, match="too small"):
        check_geometry(1, 1, min_side_px=8, max_aspect_ratio=20)
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        check_geometry(10000, 10, min_side_px=8, max_aspect_ratio=20)
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        check_geometry(10, 10000, min_side_px=8, max_aspect_ratio=20)
    check_geometry(8, 160, min_side_px=8, max_aspect_ratio=20)


def test_formats_outside_the_allow_list_get_a_true_reason():
    ppm = _encode(Image.new("RGB", (8, 8)), "PPM")
    assert probe_image(ppm, max_pixels=MAX_PIXELS) == ImageInfo("ppm", 8, 8)  # PPM is a default format
    with pytest.raises(ImageError) as err:
        probe_image(ppm, max_pixels=MAX_PIXELS, formats=("JPEG", "PNG"))
    assert err.value.reason == "format PPM not allowed (validate.formats)"
    assert "JPEG, PNG" in err.value.detail
    with pytest.raises(ImageError, match=r"format JPEG not allowed \(validate\.formats\)"):
        decode_rgb(corrupt.good_jpeg(), max_pixels=MAX_PIXELS, formats=("PNG",))
    pcx = _encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PCX")  # supported, not a default format
    with pytest.raises(ImageError, match=r"^format PCX not allowed \(validate\.formats\)"):
        decode_rgb(pcx, max_pixels=MAX_PIXELS, formats=DEFAULT_FORMATS)
    assert decode_rgb(pcx, max_pixels=MAX_PIXELS)[0, 0].tolist() == [
        255,
        0,
        0,
    ]  # later steps: every supported
    eps = _encode(Image.new("RGB", (8, 8)), "EPS")
    for formats in (DEFAULT_FORMATS, SUPPORTED_FORMATS):
        with pytest.raises(ImageError) as err:
            probe_image(eps, max_pixels=MAX_PIXELS, formats=formats)
        assert (err.value.reason, err.value.detail) == (
            "format EPS not supported",
            UNSUPPORTED_FORMATS["EPS"],
        )
    pdf = _encode(Image.new("RGB", (8, 8)), "PDF")  # Pillow writes PDFs but reads none
    with pytest.raises(ImageError, match="not an image"):
        probe_image(pdf, max_pixels=MAX_PIXELS)


def test_the_bytes_decide_the_format_not_the_name():
    png = _encode(Image.new("RGB", (8, 8)), "PNG")
    assert probe_image(png, max_pixels=MAX_PIXELS).format == "png"  # whatever the member was called
    assert member_extension("png") == "png" and member_extension("JPEG") == member_extension("mpo") == "jpg"
    assert (member_extension("tiff"), member_extension("jpeg2000"), member_extension("ppm")) == (
        "tif",
        "jp2",
        "pnm",
    )


def test_every_supported_format_pillow_writes_decodes():
    """What Pillow writes it reads back through the policy (the project's own decoder, any mode)."""
    photo = Image.open(io.BytesIO(jpeg("astronaut"))).resize((48, 32))
    decoded = set()
    for fmt in sorted(set(Image.SAVE) & set(SUPPORTED_FORMATS)):
        for mode in ("RGB", "L", "1", "P"):
            try:
                data = _encode(photo.convert(mode), fmt)
            except (OSError, ValueError, KeyError):  # Pillow cannot write this mode in this format
                continue
            info = probe_image(data, max_pixels=MAX_PIXELS)
            rgb = decode_rgb(data, max_pixels=MAX_PIXELS)
            assert rgb.shape == (info.height, info.width, 3), (fmt, mode)
            assert member_extension(info.format) in IMAGE_EXTENSIONS, fmt
            decoded.add(fmt)
    assert set(DEFAULT_FORMATS) <= decoded | {"MPO"}


def test_format_lists_are_checked():
    assert check_formats(["jpeg", "png"]) == ("JPEG", "PNG")
    with pytest.raises(ValueError, match="EPS is never decoded"):
        check_formats(["JPEG", "EPS"])
    with pytest.raises(ValueError, match="unknown format 'HEIC'"):
        check_formats(["HEIC"])
    with pytest.raises(ValueError, match="non-empty"):
        check_formats("JPEG")
    assert set(DEFAULT_FORMATS) <= set(SUPPORTED_FORMATS)
    assert {"pgm", "ppm", "tga", "ico", "avif", "jp2"} <= set(IMAGE_EXTENSIONS)
    assert not set(SIDECAR_EXTENSIONS) & set(IMAGE_EXTENSIONS) and IMAGE_EXTENSIONS[0] == "jpg"


def test_warns_when_truncated_loading_was_enabled(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.warns(RuntimeWarning, match="LOAD_TRUNCATED_IMAGES"):
        probe_image(corrupt.good_jpeg(), max_pixels=MAX_PIXELS)


def test_to_float_chw():
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[1, 2] = (0, 51, 102)
    chw = to_float_chw(rgb)
    assert chw.shape == (3, 2, 3) and chw.dtype == np.float32
    assert chw[0, 0, 0] == 1.0 and chw[:, 1, 2].tolist() == pytest.approx([0.0, 0.2, 0.4])
    assert chw.min() >= 0.0 and chw.max() <= 1.0
    with pytest.raises(ValueError, match="uint8"):
        to_float_chw(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="H, W, 3"):
        to_float_chw(rgb[..., :2])


def test_real_web_images_decode_to_their_recorded_size(test_data):
    table = pq.read_table(test_data / "fondant_cc_web_sample.parquet").to_pylist()
    assert len(table) == 40
    for row in table:
        info = probe_image(row["data"], max_pixels=MAX_PIXELS)
        rgb = decode_rgb(row["data"], max_pixels=MAX_PIXELS)
        assert info.format == "jpeg"
        assert (info.width, info.height) == (row["width"], row["height"]), row["id"]
        assert rgb.shape == (row["height"], row["width"], 3), row["id"]
        if Image.open(io.BytesIO(row["data"])).mode == "L":
            assert (rgb[..., 0] == rgb[..., 2]).all()
