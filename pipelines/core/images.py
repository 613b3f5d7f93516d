"""Safe probing and decoding of untrusted image bytes, and the one image-format policy (pure functions; no Ray).

**The format policy** (used by ingest validation, every shard reader, score, encode, report and training crops):

- Pillow identifies the bytes (``PIL.Image.open`` over all its plugins, header only); the file name or member
  extension never decides what the bytes are.
- ``SUPPORTED_FORMATS``: every format Pillow opens here except ``UNSUPPORTED_FORMATS`` (EPS runs Ghostscript;
  WMF, MPEG, BUFR, GRIB and HDF5 have no decoder in Pillow on Linux). Bytes in those are rejected as
  ``"format EPS not supported"``.
- ``DEFAULT_FORMATS``: what ingest accepts unless ``validate.formats`` says otherwise: the web's and datasets'
  raster formats (JPEG, PNG, WebP, AVIF, GIF, TIFF, BMP, JPEG 2000, PBM/PGM/PPM, TGA, ICO). Any other
  supported format is rejected as ``"format PCX not allowed (validate.formats)"`` until it is listed there.
  Steps after ingest (score, encode's decode, report, training crops) decode every supported format: they
  read what ingest let through.
- ``IMAGE_EXTENSIONS``: the file and WebDataset member extensions that hold an image (every extension Pillow
  registers for a format it opens, common ones first: a sample's image member is the first of these it has);
  ``SIDECAR_EXTENSIONS`` (``txt``, ``json``) hold the caption and metadata; ``member_extension`` names the
  member an ingested image is written as.

Every failure raises one exception type, :class:`ImageError`, whose ``reason`` is a short machine-friendly
string that steps store as a reject reason: ``"empty file"``, ``"not an image"`` (no Pillow plugin
recognises the bytes), ``"format X not allowed (validate.formats)"``, ``"format X not supported"``,
``"decompression bomb"``, ``"truncated image"``, ``"corrupt image"``, ``"unsupported mode"``,
``"too small"``, ``"extreme aspect ratio"``.

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

#: Formats Pillow opens but this project never decodes, with the reason shown in the reject detail.
UNSUPPORTED_FORMATS: dict[str, str] = {
    "EPS": "decoding EPS runs Ghostscript, an external program",
    "WMF": "Pillow decodes WMF/EMF only on Windows",
    "MPEG": "Pillow reads only the header of MPEG video",
    "BUFR": "Pillow has only a stub for BUFR (no decoder)",
    "GRIB": "Pillow has only a stub for GRIB (no decoder)",
    "HDF5": "Pillow has only a stub for HDF5 (no decoder)",
}
#: Every Pillow format id this project decodes (``validate.formats`` may list any of these).
SUPPORTED_FORMATS: tuple[str, ...] = tuple(f for f in Image.ID if f not in UNSUPPORTED_FORMATS)
#: What ingest accepts by default (``validate.formats``): the web's and datasets' raster formats.
DEFAULT_FORMATS: tuple[str, ...] = tuple(
    f
    for f in ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "TIFF", "BMP", "JPEG2000", "PPM", "TGA", "ICO")
    if f in Image.OPEN
)
#: Pillow's own default limit (~9459² px, 256 MiB as RGB); above it Pillow itself warns of a bomb.
PILLOW_MAX_PIXELS = 89_478_485

# The member extension an ingested image of each format is written as (else Pillow's first registered one).
_MEMBER_EXTENSION = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif", "JPEG2000": "jp2", "PPM": "pnm", "SGI": "sgi"}  # fmt: skip
_COMMON_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "avif", "gif", "tif", "tiff", "bmp", "jp2", "pnm", "ppm",
                      "pgm", "pbm", "tga", "ico")  # fmt: skip


def _registered_extensions() -> dict[str, str]:
    """extension (no dot, lower case) -> Pillow format id, for the formats Pillow opens (MPO is a JPEG)."""
    out = {ext.lstrip(".").lower(): fmt for ext, fmt in Image.registered_extensions().items()
           if fmt in Image.OPEN or fmt == "MPO"}  # fmt: skip
    for fmt in Image.OPEN:  # formats without a registered extension are written as their own name
        if fmt not in out.values():
            out.setdefault(fmt.lower(), fmt)
    return out


_EXTENSION_FORMATS = _registered_extensions()
#: Extensions (no dot, lower case) of files and WebDataset members that hold an image, common ones first.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(
    dict.fromkeys([*(e for e in _COMMON_EXTENSIONS if e in _EXTENSION_FORMATS), *sorted(_EXTENSION_FORMATS)])
)
#: Extensions of a sample's caption (``txt``) and metadata (``json``) next to its image.
SIDECAR_EXTENSIONS: tuple[str, ...] = ("txt", "json")


def member_extension(image_format: str) -> str:
    """The extension an image of ``image_format`` (a Pillow id or ``ImageInfo.format``) is stored under."""
    fmt = image_format.upper()
    if fmt in _MEMBER_EXTENSION:
        return _MEMBER_EXTENSION[fmt]
    return next((e for e, f in _EXTENSION_FORMATS.items() if f == fmt), fmt.lower())


def check_formats(formats: Sequence[str], field: str = "validate.formats") -> tuple[str, ...]:
    """``formats`` as upper-case Pillow ids; ValueError naming ``field`` for an unknown or unsupported one."""
    if isinstance(formats, str) or not formats:
        raise ValueError(f"{field}={formats!r} must be a non-empty list of {list(SUPPORTED_FORMATS)}")
    out = tuple(str(f).upper() for f in formats)
    for fmt in out:
        if fmt in UNSUPPORTED_FORMATS:
            raise ValueError(f"{field}: {fmt} is never decoded: {UNSUPPORTED_FORMATS[fmt]}")
        if fmt not in SUPPORTED_FORMATS:
            raise ValueError(f"{field}: unknown format {fmt!r}; Pillow ids: {list(SUPPORTED_FORMATS)}")
    return out


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
    """Identify the bytes as Pillow does (every plugin, header only), apply the format policy, and refuse
    images larger than ``max_pixels`` before decoding."""
    if data is None or len(data) == 0:
        raise ImageError("empty file")
    try:
        im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise
    except Exception as e:  # UnidentifiedImageError, SyntaxError, struct.error, ... from header parsing
        # drop object reprs ("<_io.BytesIO object at 0x...>") so the same input gives the same detail
        detail = re.sub(r"<[^>]* at 0x[0-9a-f]+>", "<bytes>", f"{type(e).__name__}: {e}")
        raise ImageError("not an image", detail) from e
    fmt = "JPEG" if im.format == "MPO" else str(im.format)  # MPO: a camera JPEG with extra frames
    if fmt in UNSUPPORTED_FORMATS:
        raise ImageError(f"format {fmt} not supported", UNSUPPORTED_FORMATS[fmt])
    if fmt not in formats:
        raise ImageError(
            f"format {fmt} not allowed (validate.formats)",
            f"Pillow reads a {fmt}; allowed: {', '.join(formats)}",
        )
    width, height = im.size
    if width < 1 or height < 1:
        raise ImageError("not an image", f"{fmt} header claims {width}x{height} px")
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


def probe_image(data: bytes, *, max_pixels: int, formats: Sequence[str] = SUPPORTED_FORMATS) -> ImageInfo:
    """Read format and upright size from the header only; refuse bombs before any decoding.

    Args:
        data: the encoded file.
        max_pixels: refuse images whose header claims more pixels than this.
        formats: Pillow format ids allowed (ingest passes ``validate.formats``; later steps every supported one).

    Raises:
        ImageError: "empty file", "not an image", "format X not allowed (validate.formats)",
            "format X not supported" or "decompression bomb".
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
        if im.tell():  # animated GIF/PNG/WebP: the first frame (a fresh image is on it already)
            im.seek(0)
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


def decode_rgb(data: bytes, *, max_pixels: int, formats: Sequence[str] = SUPPORTED_FORMATS) -> np.ndarray:
    """Fully decode an untrusted image into an upright (H, W, 3) uint8 RGB array.

    Refuses bombs from the header, then decodes the first frame (animations), applies the EXIF orientation,
    converts CMYK, 16-bit and grayscale to 8-bit RGB and composites transparency on white.

    Raises:
        ImageError: "empty file", "not an image", "format X not allowed (validate.formats)", "format X not
            supported", "decompression bomb", "truncated image", "corrupt image" or "unsupported mode".
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


def perceptual_hash(rgb: np.ndarray) -> int:
    """The 64-bit pHash (imagehash's: grayscale, 32×32 Lanczos, DCT, 8×8 low frequencies above their median) of a
    decoded (H, W, 3) uint8 image, as an unsigned int whose bits read row by row, most significant first."""
    import imagehash

    bits = imagehash.phash(Image.fromarray(rgb)).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")
