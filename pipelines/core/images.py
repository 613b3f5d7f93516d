"""Safe image probing and decoding for untrusted web bytes (pure functions; no Ray).

Every failure raises one exception type, :class:`ImageError`, whose ``reason`` is a short machine-friendly
string that steps store as a reject reason: ``"empty file"``, ``"not an image"``, ``"decompression bomb"``,
``"truncated image"``, ``"corrupt image"``, ``"unsupported mode"``, ``"too small"``,
``"extreme aspect ratio"``.

Sizes are checked from the header *before* any pixel is decoded. Truncated files are refused: this module
never relies on ``ImageFile.LOAD_TRUNCATED_IMAGES`` (and warns if something in the process enabled it).
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFile

Image.init()

#: Formats Pillow may open: the web's raster formats. Exotic plugins (EPS runs Ghostscript, ...) stay off.
DEFAULT_FORMATS: tuple[str, ...] = tuple(
    f for f in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF") if f in Image.OPEN
)
#: Pillow's own default limit (~9459² px, 256 MiB as RGB); above it Pillow itself warns of a bomb.
PILLOW_MAX_PIXELS = 89_478_485

# EXIF orientation -> transposition that displays the image upright (the table of ImageOps.exif_transpose).
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_SIDES = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


class ImageError(ValueError):
    """An image that cannot be used. ``reason`` is short and stable; ``detail`` is free-form."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ImageInfo(NamedTuple):
    """Header facts of an image. ``width``/``height`` are after EXIF orientation."""

    format: str  # lower case: "jpeg", "png", "webp", ...
    width: int
    height: int


@contextmanager
def _pillow_guard() -> Iterator[None]:
    """Turn Pillow's decompression-bomb warning into an error for the duration of a call."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        warnings.warn(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated images will be "
            "padded silently instead of rejected",
            RuntimeWarning,
            stacklevel=3,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError("decompression bomb", str(e)) from e


def _open(data: bytes, max_pixels: int, formats: Sequence[str]) -> Image.Image:
    """Open lazily (header only) and refuse images larger than ``max_pixels`` before decoding."""
    if data is None or len(data) == 0:
        raise ImageError("empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=[f for f in formats if f in Image.OPEN])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct.error, ... from header parsing
        # drop object reprs ("<_io.BytesIO object at 0x...>") so the same input gives the same detail
        detail = re.sub(r"<[^>]* at 0x[0-9a-f]+>", "<bytes>", f"{type(e).__name__}: {e}")
        raise ImageError("not an image", detail) from e
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageError("not an image", f"header claims {width}x{height} px")
    if width * height > max_pixels:
        raise ImageError(
            "decompression bomb", f"header claims {width}x{height} = {width * height} px > {max_pixels}"
        )
    return im


def _orientation(im: Image.Image, *, loaded: bool) -> int:
    """EXIF orientation 1..8; 1 when absent or unreadable. Never decodes pixels.

    A PNG's eXIf chunk may follow the pixel data; before ``load()`` such a PNG reads as upright (Pillow
    would otherwise decode it just to look), so ``decode_rgb``'s shape is the authority on orientation.
    """
    if im.format == "PNG" and "exif" not in im.info and not loaded:
        return 1
    try:
        value = int(im.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: treat as upright, consistently in probe and decode
        return 1
    return value if value in _ORIENTATION_TRANSPOSE else 1


def _format_name(im: Image.Image) -> str:
    return "jpeg" if im.format == "MPO" else str(im.format).lower()  # MPO: camera JPEG with extra frames


def probe_image(data: bytes, *, max_pixels: int, formats: Sequence[str] = DEFAULT_FORMATS) -> ImageInfo:
    """Read format and upright size from the header only; refuse bombs before any decoding.

    Args:
        data: the encoded file.
        max_pixels: refuse images whose header claims more pixels than this.
        formats: Pillow format ids allowed to open the bytes.

    Raises:
        ImageError: "empty file", "not an image" or "decompression bomb".
    """
    with _pillow_guard():
        im = _open(data, max_pixels, formats)
        width, height = im.size
        if _orientation(im, loaded=False) in _SWAPS_SIDES:
            width, height = height, width
        return ImageInfo(_format_name(im), width, height)


def check_geometry(width: int, height: int, *, min_side_px: int, max_aspect_ratio: float) -> None:
    """Refuse degenerate sizes. Both rules are invariant under rotation, so header sizes suffice.

    Raises:
        ImageError: "too small" or "extreme aspect ratio".
    """
    if min(width, height) < min_side_px:
        raise ImageError("too small", f"{width}x{height} px, min side {min_side_px}")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect_ratio:
        raise ImageError(
            "extreme aspect ratio", f"{width}x{height} px, aspect {aspect:.1f} > {max_aspect_ratio}"
        )


def _load(im: Image.Image) -> None:
    try:
        im.seek(0)  # animated GIF/PNG/WebP: the first frame
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as e:
        message = f"{type(e).__name__}: {e}"
        reason = "truncated image" if "truncat" in message.lower() else "corrupt image"
        raise ImageError(reason, message) from e


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3:4].astype(np.uint32)
    rgb = rgba[..., :3].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    """Any decoded mode -> (H, W, 3) uint8: 16-bit scaled, alpha composited on white, CMYK converted."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(im).astype(np.float64)
        gray = np.round(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)  # 65535 / 257 = 255 exactly
        return np.repeat(gray[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _composite_on_white(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.asarray(im)
    try:
        return np.asarray(im.convert("RGB"))  # L, 1, P, CMYK, YCbCr, LAB, HSV
    except Exception as e:
        raise ImageError("unsupported mode", f"{mode}: {type(e).__name__}: {e}") from e


def decode_rgb(data: bytes, *, max_pixels: int, formats: Sequence[str] = DEFAULT_FORMATS) -> np.ndarray:
    """Fully decode an untrusted image into an upright (H, W, 3) uint8 RGB array.

    Refuses bombs from the header, then decodes the first frame (animations), applies the EXIF orientation,
    converts CMYK, 16-bit and grayscale to 8-bit RGB and composites transparency on white.

    Raises:
        ImageError: "empty file", "not an image", "decompression bomb", "truncated image",
            "corrupt image" or "unsupported mode".
    """
    with _pillow_guard():
        im = _open(data, max_pixels, formats)
        _load(im)
        orientation = _orientation(im, loaded=True)
        if orientation in _ORIENTATION_TRANSPOSE:
            im = im.transpose(_ORIENTATION_TRANSPOSE[orientation])
        rgb = _to_rgb_array(im)
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def to_float_chw(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], the layout the model steps take."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {rgb.shape} dtype {rgb.dtype}")
    return np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
