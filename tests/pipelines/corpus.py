"""A corpus of every image kind Pillow's own test images cover, made by Pillow from a real photo, with the
outcome each sample must get, as each of the three source kinds.

``cases()`` are the samples: each format Pillow writes here (JPEG, PNG, WebP, AVIF, GIF, TIFF, BMP, ICO,
JPEG 2000, PBM/PGM/PPM, TGA) in the modes that matter (16-bit, CMYK, palette with transparency, alpha,
EXIF-rotated, animated), a caption-less sample, a format outside ``validate.formats`` (PCX), one never
decoded (EPS), an HTML page named ``.jpg``, a truncated JPEG, a key in a sub-folder and a repeated key (the
second copy is a PNG). ``EXPECTED`` gives each one's reject reason (``""``: accepted) and upright size under
``ValidateConfig(allow_empty_caption=True)``.

``write_webdataset``, ``write_parquet`` and ``write_folder`` lay the same samples out as a WebDataset tar, a
Parquet file with image bytes and an image folder; the folder also gets the odd files of ``FOLDER_ONLY``
(an unknown file type, a file without extension, captions and metadata without an image), each with the
reject it must get.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.core.shards import members_tar_bytes
from tests.pipelines.photos import captions, jpeg

PHOTO = "astronaut"  # scikit-image's photo (public domain), as RGB
SIZE = (64, 48)  # (width, height) of every generated image unless a case says otherwise
DUPLICATE = "dup"  # the repeated key: a JPEG first, then a PNG
NOT_ALLOWED = "format PCX not allowed (validate.formats)"

# name -> (reject reason, "" when accepted; upright (width, height) when accepted)
EXPECTED: dict[str, tuple[str, tuple[int, int] | None]] = {
    "jpeg_rgb": ("", SIZE),
    "jpeg_gray": ("", SIZE),
    "jpeg_cmyk": ("", SIZE),
    "jpeg_exif_rotated": ("", (48, 64)),  # stored 64x48 with orientation 6: shown upright as 48x64
    "png_rgb": ("", SIZE),
    "png_rgba": ("", SIZE),
    "png_palette_transparency": ("", SIZE),
    "png_16bit": ("", SIZE),
    "png_1bit": ("", SIZE),
    "gif_animated": ("", SIZE),
    "webp_lossy": ("", SIZE),
    "webp_lossless_rgba": ("", SIZE),
    "avif": ("", SIZE),
    "tiff_lzw": ("", SIZE),
    "tiff_16bit": ("", SIZE),
    "tiff_cmyk": ("", SIZE),
    "bmp_rgb": ("", SIZE),
    "bmp_palette": ("", SIZE),
    "ico": ("", SIZE),
    "jpeg2000": ("", SIZE),
    "pbm": ("", SIZE),
    "pgm": ("", SIZE),
    "ppm": ("", SIZE),
    "tga": ("", SIZE),
    "tga_rle": ("", SIZE),
    "caption_less": ("", SIZE),  # no caption at all: the empty caption
    "sub/nested": ("", SIZE),  # a key with a folder in it
    "pcx": (NOT_ALLOWED, None),
    "eps": ("format EPS not supported", None),
    "html_named_jpg": ("not an image", None),
    "truncated_jpeg": ("truncated image", None),
    "tiny_png": ("too small", None),
    f"{DUPLICATE}#1": ("", SIZE),
    "between": ("", SIZE),  # keeps the two copies of the repeated key apart in the tar
    f"{DUPLICATE}#2": ("duplicate key", None),
}

# Folder-only files -> the reject each must get (its key is its path below the folder).
FOLDER_ONLY: dict[str, str] = {
    "notes.bin": "unsupported file type .bin",
    "README": "unsupported file type (no extension)",
    "orphan.txt": "sidecar without image",
    "orphan.json": "sidecar without image",
}


@dataclass(frozen=True)
class Case:
    name: str  # the EXPECTED row
    key: str  # the sample key (the two duplicates share one)
    ext: str  # file / member extension
    image: bytes
    caption: str | None

    @property
    def reason(self) -> str:
        return EXPECTED[self.name][0]

    @property
    def size(self) -> tuple[int, int] | None:
        return EXPECTED[self.name][1]


@functools.cache
def photo() -> Image.Image:
    return Image.open(io.BytesIO(jpeg(PHOTO))).convert("RGB").resize(SIZE, Image.Resampling.LANCZOS)


def _save(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _rgba() -> Image.Image:
    im = photo().convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, SIZE[0], dtype=np.uint8), (SIZE[1], 1))  # fades left to right
    im.putalpha(Image.fromarray(alpha))
    return im


def _sixteen_bit() -> Image.Image:
    gray = np.asarray(photo().convert("L"), dtype=np.uint16) * 257
    return Image.fromarray(gray)  # mode I;16


def _palette_with_transparency() -> bytes:
    im = photo().convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return _save(im, "PNG", transparency=0)


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return _save(photo(), "JPEG", quality=90, exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [photo(), photo().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _images() -> dict[str, tuple[str, bytes]]:
    """name -> (extension, bytes) for every case."""
    rgb = photo()
    truncated = _save(rgb, "JPEG", quality=90)
    return {
        "jpeg_rgb": ("jpg", _save(rgb, "JPEG", quality=90)),
        "jpeg_gray": ("jpeg", _save(rgb.convert("L"), "JPEG", quality=90)),
        "jpeg_cmyk": ("jpg", _save(rgb.convert("CMYK"), "JPEG", quality=90)),
        "jpeg_exif_rotated": ("jpg", _exif_rotated()),
        "png_rgb": ("png", _save(rgb, "PNG")),
        "png_rgba": ("png", _save(_rgba(), "PNG")),
        "png_palette_transparency": ("png", _palette_with_transparency()),
        "png_16bit": ("png", _save(_sixteen_bit(), "PNG")),
        "png_1bit": ("png", _save(rgb.convert("1"), "PNG")),
        "gif_animated": ("gif", _animated_gif()),
        "webp_lossy": ("webp", _save(rgb, "WEBP", quality=80)),
        "webp_lossless_rgba": ("webp", _save(_rgba(), "WEBP", lossless=True)),
        "avif": ("avif", _save(rgb, "AVIF", quality=70)),
        "tiff_lzw": ("tif", _save(rgb, "TIFF", compression="tiff_lzw")),
        "tiff_16bit": ("tiff", _save(_sixteen_bit(), "TIFF")),
        "tiff_cmyk": ("tif", _save(rgb.convert("CMYK"), "TIFF")),
        "bmp_rgb": ("bmp", _save(rgb, "BMP")),
        "bmp_palette": ("bmp", _save(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "BMP")),
        "ico": ("ico", _save(_rgba(), "ICO", sizes=[SIZE])),
        "jpeg2000": ("jp2", _save(rgb, "JPEG2000")),
        "pbm": ("pbm", _save(rgb.convert("1"), "PPM")),
        "pgm": ("pgm", _save(rgb.convert("L"), "PPM")),
        "ppm": ("ppm", _save(rgb, "PPM")),
        "tga": ("tga", _save(rgb, "TGA")),
        "tga_rle": ("tga", _save(rgb, "TGA", compression="tga_rle")),
        "caption_less": ("jpg", _save(rgb.rotate(180), "JPEG", quality=90)),
        "sub/nested": ("png", _save(rgb.transpose(Image.Transpose.FLIP_TOP_BOTTOM), "PNG")),
        "pcx": ("pcx", _save(rgb, "PCX")),
        "eps": ("eps", _save(rgb, "EPS")),
        "html_named_jpg": ("jpg", b"<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n"),
        "truncated_jpeg": ("jpg", truncated[: len(truncated) * 6 // 10]),
        "tiny_png": ("png", _save(rgb.resize((4, 4)), "PNG")),
        f"{DUPLICATE}#1": ("jpg", _save(rgb.convert("L").convert("RGB"), "JPEG", quality=90)),
        "between": ("webp", _save(rgb.rotate(90, expand=False), "WEBP", quality=80)),
        f"{DUPLICATE}#2": ("png", _save(rgb, "PNG")),
    }


@functools.cache
def cases() -> tuple[Case, ...]:
    """Every sample, in ``EXPECTED`` order (the two copies of ``DUPLICATE`` apart, the JPEG first)."""
    caption = captions()[PHOTO]
    images = _images()
    out = []
    for name in EXPECTED:
        ext, data = images[name]
        key = name.split("#")[0]
        out.append(Case(name, key, ext, data, None if name == "caption_less" else f"{caption} ({name})"))
    return tuple(out)


def accepted() -> dict[str, Case]:
    """The accepted cases by key."""
    return {c.key: c for c in cases() if not c.reason}


def write_webdataset(root: Path) -> Path:
    """The samples as one WebDataset tar (``key.ext``, ``key.txt`` unless caption-less, ``key.json``)."""
    root.mkdir(parents=True, exist_ok=True)
    members = []
    for c in cases():
        parts = {c.ext: c.image}
        if c.caption is not None:
            parts["txt"] = c.caption.encode()
        parts["json"] = json.dumps({"case": c.name}).encode()
        members.append((c.key, parts))
    path = root / "corpus.tar"
    path.write_bytes(members_tar_bytes(members))
    return path


def write_parquet(root: Path) -> Path:
    """The samples as one Parquet file: key, image bytes, caption (null when caption-less)."""
    root.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "id": [c.key for c in cases()],
            "jpg": pa.array([c.image for c in cases()], pa.binary()),
            "text": pa.array([c.caption for c in cases()], pa.string()),
        }
    )
    path = root / "corpus.parquet"
    pq.write_table(table, path)
    return path


def write_folder(root: Path) -> Path:
    """The samples as an image folder (``key.ext`` + ``key.txt`` + ``key.json``) plus ``FOLDER_ONLY``'s files."""
    for c in cases():
        (root / c.key).parent.mkdir(parents=True, exist_ok=True)
        (root / f"{c.key}.{c.ext}").write_bytes(c.image)
        if c.caption is not None and not (root / f"{c.key}.txt").exists():  # the duplicates share one
            (root / f"{c.key}.txt").write_text(c.caption)
        if c.name != "jpeg_rgb":  # one sample without metadata
            (root / f"{c.key}.json").write_text(json.dumps({"case": c.name}))
    (root / "notes.bin").write_bytes(bytes(range(256)))
    (root / "README").write_text("A corpus of image kinds.\n")
    (root / "orphan.txt").write_text("a caption whose image is missing")
    (root / "orphan.json").write_text("{}")
    return root


def folder_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())
