"""Generators of bad inputs for ingest/validate tests, with their expected outcomes in one table.

Every case is one sample (key, caption, image bytes) with exactly one defect, or a tricky but valid image
that must be accepted and decoded correctly. ``EXPECTED`` says what ``ValidateSamples`` with the default
``ValidateConfig`` makes of each: a reject reason, or ``""`` and the upright (width, height).

Use ``cases()`` for the samples, ``batch()`` for a step-ready dict, ``samples_tar()`` for the same samples as
an img2dataset-layout WebDataset tar (``key.jpg``/``key.txt``/``key.json``; the HTML case is named ``.jpg``)
and ``corrupt_tar()`` for an archive that ends in the middle of a member.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import tarfile
import zlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
GOOD_CAPTION = "A red square on a table — une tête rouge"
SOURCE = "tests/pipelines/corrupt.py"

# name -> (reject reason, or "" when accepted; (width, height) after EXIF orientation when accepted).
# Outcomes under the default ValidateConfig (min side 8 px, max aspect 20, max caption 10,000 bytes).
EXPECTED: dict[str, tuple[str, tuple[int, int] | None]] = {
    "good_jpeg": ("", (32, 24)),
    "duplicate_first": ("", (32, 24)),  # same key as duplicate_second, far apart (WebDataset groups runs)
    # image files
    "zero_byte": ("empty file", None),
    "missing_image": ("missing image", None),
    "truncated_jpeg": ("truncated image", None),  # 60% of a noise JPEG
    "truncated_png": ("truncated image", None),
    "html_named_jpg": ("not an image", None),  # a 404 page saved as key.jpg
    "cmyk_jpeg": ("", (16, 16)),  # decodes to red
    "png_16bit_gray": ("", (24, 8)),  # 3 bands 0 / 32896 / 65535 -> 0 / 128 / 255
    "png_16bit_rgb": ("", (24, 8)),  # same bands in every channel
    "palette_png_transparency": ("", (24, 8)),  # bands: transparent -> white, red, blue at alpha 128
    # image content
    "exif_rotated_jpeg": ("", (16, 32)),  # stored 32x16 (left red, right blue), orientation 6: top red
    "animated_gif": ("", (16, 16)),  # frame 0 red, frame 1 blue -> red
    "one_by_one_png": ("too small", None),
    "wide_10000x10_png": ("extreme aspect ratio", None),
    "bomb_png_header": ("decompression bomb", None),  # IHDR claims 100000x100000, valid CRC, no pixels
    "bomb_png_1bit": ("decompression bomb", None),  # a valid 10000x10000 1-bit PNG of ~12 KB
    # captions
    "caption_missing": ("missing caption", None),
    "caption_empty": ("empty caption", None),
    "caption_whitespace": ("empty caption", None),
    "caption_not_utf8": ("caption not utf-8", None),  # b"\xff\xfe\xfa"
    "caption_100kb": ("caption too long", None),
    # data files: the same key again, later in the same batch/tar; the first wins
    "duplicate_second": ("duplicate key", None),
}
DUPLICATE_KEY = "duplicate"


@dataclass(frozen=True)
class Case:
    """One sample of ``EXPECTED``: ``name`` is the table row, ``key`` the sample key (shared by duplicates)."""

    name: str
    key: str
    image: bytes | None
    caption: str | bytes | None
    ext: str = "jpg"

    @property
    def reason(self) -> str:
        return EXPECTED[self.name][0]

    @property
    def size(self) -> tuple[int, int] | None:
        return EXPECTED[self.name][1]


def _encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _bands(colors: list, height: int = 8, band: int = 8) -> np.ndarray:
    """Vertical bands of ``band`` px, one per colour (scalars or tuples)."""
    row = np.concatenate([np.full((band, *np.shape(c)), c) for c in colors])
    return np.repeat(row[None], height, axis=0)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, *, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG assembled by hand (valid CRCs), so headers can claim anything."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def good_jpeg() -> bytes:
    return _encode(Image.new("RGB", (32, 24), RED), "JPEG", quality=95)


def noise_jpeg(width: int = 64, height: int = 64) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "JPEG", quality=90)


def truncated_jpeg() -> bytes:
    data = noise_jpeg()
    return data[: int(len(data) * 0.6)]


def truncated_png() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _encode(Image.fromarray(pixels), "PNG")
    return data[: len(data) // 2]


def html_named_jpg() -> bytes:
    return b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def cmyk_jpeg() -> bytes:
    return _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # red


def png_16bit_gray() -> bytes:
    return _encode(Image.fromarray(_bands([0, 32896, 65535]).astype(np.uint16)), "PNG")


def png_16bit_rgb() -> bytes:
    values = _bands([0, 32896, 65535])  # (8, 24)
    rgb = np.repeat(values[..., None], 3, axis=2).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in rgb)
    return raw_png(24, 8, bit_depth=16, color_type=2, idat=zlib.compress(rows))


def palette_png_transparency() -> bytes:
    im = Image.fromarray(_bands([0, 1, 2]).astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, *RED, *BLUE])  # index 0 is black but fully transparent
    return _encode(im, "PNG", transparency=bytes([0, 255, 128]))


def exif_rotated_jpeg() -> bytes:
    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :16] = RED
    pixels[:, 16:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    return _encode(Image.fromarray(pixels), "JPEG", quality=95, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def one_by_one_png() -> bytes:
    return _encode(Image.new("RGB", (1, 1), RED), "PNG")


def wide_png() -> bytes:
    return _encode(Image.new("RGB", (10000, 10), RED), "PNG")


def bomb_png_header() -> bytes:
    return raw_png(100_000, 100_000, bit_depth=8, color_type=0, idat=zlib.compress(b"\x00" * 1024))


def bomb_png_1bit(side: int = 10_000) -> bytes:
    """A genuine, small (~12 KB) PNG that would decode to ``side``² pixels."""
    rows = (b"\x00" * (1 + side // 8)) * side
    return raw_png(side, side, bit_depth=1, color_type=0, idat=zlib.compress(rows, 9))


def long_caption(n_bytes: int = 100_000) -> str:
    words = "a very long alt text that some web page stuffed with keywords "
    return (words * (n_bytes // len(words) + 1))[:n_bytes]


@functools.cache
def cases() -> tuple[Case, ...]:
    """All cases in ``EXPECTED`` order (the two duplicates far apart, the second last)."""
    good = good_jpeg()
    images = {
        "good_jpeg": (good, "jpg"),
        "zero_byte": (b"", "jpg"),
        "missing_image": (None, "jpg"),
        "truncated_jpeg": (truncated_jpeg(), "jpg"),
        "truncated_png": (truncated_png(), "png"),
        "html_named_jpg": (html_named_jpg(), "jpg"),
        "cmyk_jpeg": (cmyk_jpeg(), "jpg"),
        "png_16bit_gray": (png_16bit_gray(), "png"),
        "png_16bit_rgb": (png_16bit_rgb(), "png"),
        "palette_png_transparency": (palette_png_transparency(), "png"),
        "exif_rotated_jpeg": (exif_rotated_jpeg(), "jpg"),
        "animated_gif": (animated_gif(), "gif"),
        "one_by_one_png": (one_by_one_png(), "png"),
        "wide_10000x10_png": (wide_png(), "png"),
        "bomb_png_header": (bomb_png_header(), "png"),
        "bomb_png_1bit": (bomb_png_1bit(), "png"),
    }
    captions = {
        "caption_missing": None,
        "caption_empty": "",
        "caption_whitespace": " \n\t ",
        "caption_not_utf8": b"\xff\xfe\xfa",
        "caption_100kb": long_caption(),
    }
    out = []
    for name in EXPECTED:
        image, ext = images.get(name, (good, "jpg"))
        key = DUPLICATE_KEY if name.startswith("duplicate_") else name
        out.append(Case(name, key, image, captions.get(name, GOOD_CAPTION), ext))
    return tuple(out)


def expected_counts(selected: tuple[Case, ...] | None = None) -> Counter:
    """Reject reasons -> count, with accepted rows counted under ``""``."""
    return Counter(c.reason for c in (cases() if selected is None else selected))


def batch(selected: tuple[Case, ...] | None = None) -> dict[str, np.ndarray]:
    """The cases as a samples batch (key, source, caption, image, meta_json), ready for a step."""
    rows = cases() if selected is None else selected

    def column(values: list) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    return {
        "key": column([c.key for c in rows]),
        "source": column([SOURCE] * len(rows)),
        "caption": column([c.caption for c in rows]),
        "image": column([c.image for c in rows]),
        "meta_json": column([json.dumps({"case": c.name}) for c in rows]),
    }


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def samples_tar(selected: tuple[Case, ...] | None = None) -> bytes:
    """The cases as a WebDataset tar in img2dataset's layout; absent images/captions have no member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for c in cases() if selected is None else selected:
            if c.image is not None:
                _add(tar, f"{c.key}.{c.ext}", c.image)
            if c.caption is not None:
                caption = c.caption.encode() if isinstance(c.caption, str) else c.caption
                _add(tar, f"{c.key}.txt", caption)
            _add(tar, f"{c.key}.json", json.dumps({"key": c.key, "case": c.name}).encode())
    return buf.getvalue()


# corrupt_tar(): members tar_ok_0.* and tar_ok_1.* are complete; the archive ends inside tar_cut.jpg
# (its .txt/.json never come). A reader must yield the two complete samples and record tar_cut as a
# reject (suggested reason "corrupt tar member") instead of crashing.
CORRUPT_TAR_COMPLETE = ("tar_ok_0", "tar_ok_1")
CORRUPT_TAR_CUT = "tar_cut"


def corrupt_tar() -> bytes:
    """A tar whose last image member is cut in the middle of its data (an interrupted download)."""
    buf = io.BytesIO()
    image = noise_jpeg()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key in (*CORRUPT_TAR_COMPLETE, CORRUPT_TAR_CUT):
            if key == CORRUPT_TAR_CUT:
                cut_at = buf.tell() + 512 + len(image) // 2  # one 512-byte header, then half the data
            _add(tar, f"{key}.jpg", image)
            _add(tar, f"{key}.txt", GOOD_CAPTION.encode())
            _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return buf.getvalue()[:cut_at]
