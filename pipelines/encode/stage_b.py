"""Stage B conditioning latents: the effnet latents official ``train_b.py`` computes on the fly, cached.

Official Stage B training (``reference/stable-cascade.md`` §3 "Stage B specifics") conditions on the effnet
latent of the Stage A crop (S×S px, S = 32·n, 1024 at the official settings) resized with NEAREST by a
factor f ~ U(0.5, 1) to (⌊S·f/32⌋·32)², i.e. ``effnet.encode(resize(images, (32s, 32s), NEAREST))`` with
s = ⌊n·f⌋ ∈ {⌊n/2⌋, …, n−1} latent cells (16…31 at 1024 px, equally likely for even n). The only randomness
is s, so storing the latent at every reachable s makes training draw exactly (``"exact"``); ``"subset"``
stores only some sizes and training uses the nearest stored one (ties to the smaller), a documented deviation.

Columns: ``stage_b_effnet_{s}`` (``schemas.columns.stage_b_effnet_column``), shape (16, s, s), one per stored
s, fixed per file (the Stage A crop is square and of one size). Files record how they were made in
``cascade.stage_b_conditioning`` (``conditioning_metadata``); the manifest repeats it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipelines.core.preprocess import LATENT_CELL_PX
from schemas.columns import stage_b_effnet_column
from schemas.specs import canonical_dtype

MODES = ("exact", "subset", "none")
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def cell_range(stage_a_cells: int) -> tuple[int, ...]:
    """Every s = ⌊n·f⌋ that f ∈ [0.5, 1) reaches for a Stage A crop of n cells: ⌊n/2⌋ … n−1."""
    return tuple(range(stage_a_cells // 2, stage_a_cells))


def default_subset(stage_a_cells: int) -> tuple[int, ...]:
    """(n/2, 3n/4, n−1), floored and deduplicated: (16, 24, 31) at 1024 px, (2, 3) at 128 px."""
    n = stage_a_cells
    return tuple(sorted({n // 2, 3 * n // 4, n - 1}))


def resolve(
    mode: str | None, cells: Sequence[int] | None, stage_a: bool, stage_a_size_px: int
) -> tuple[int, ...]:
    """The stored sizes of a config (``()`` for ``"none"``); ValueError naming the field on a bad config.

    Args:
        mode: ``stage_b_conditioning``: ``"exact"``, ``"subset"``, ``"none"``, or None (``"exact"`` with Stage A
            latents, else ``"none"``).
        cells: ``stage_b_cells`` (``"subset"`` only; None: ``default_subset``).
        stage_a: whether Stage A latents are encoded.
        stage_a_size_px: the Stage A crop side (``preprocess.stage_a_size_px``).
    """
    mode = effective_mode(mode, stage_a)
    if mode != "subset" and cells is not None:
        raise ValueError(
            f"stage_b_cells={cells!r} applies only to stage_b_conditioning='subset' (it is {mode!r})"
        )
    if mode == "none":
        return ()
    if not stage_a:
        raise ValueError(
            f"stage_b_conditioning={mode!r} needs Stage A latents (the Stage B training target): set stage_a "
            "to an encoder, or stage_b_conditioning: none"
        )
    n = stage_a_size_px // LATENT_CELL_PX
    if n < 2:
        raise ValueError(
            f"preprocess.stage_a_size_px={stage_a_size_px}: Stage B conditioning needs a crop of at least "
            f"{2 * LATENT_CELL_PX} px (⌊n·f⌋ ≥ 1 cell)"
        )
    if mode == "exact":
        return cell_range(n)
    if cells is None:
        return default_subset(n)
    return check_cells(cells, n)


def effective_mode(mode: str | None, stage_a: bool) -> str:
    """``stage_b_conditioning`` with its default filled in."""
    if mode is None:
        return "exact" if stage_a else "none"
    if mode not in MODES:
        raise ValueError(f"stage_b_conditioning={mode!r}; allowed: {', '.join(MODES)}")
    return mode


def check_cells(cells: Sequence[int], stage_a_cells: int) -> tuple[int, ...]:
    """``stage_b_cells`` as a tuple, each in [⌊n/2⌋, n−1], ascending and unique; ValueError naming the field."""
    lo, hi = stage_a_cells // 2, stage_a_cells - 1
    if isinstance(cells, str | bytes) or not isinstance(cells, Sequence) or not cells:
        raise ValueError(f"stage_b_cells={cells!r} must be a non-empty list of latent-cell sizes")
    bad = [s for s in cells if isinstance(s, bool) or not isinstance(s, int) or not lo <= s <= hi]
    if bad:
        raise ValueError(
            f"stage_b_cells={list(cells)!r}: {bad} outside [{lo}, {hi}] (⌊n·f⌋ for n = {stage_a_cells} cells, "
            "f in [0.5, 1)) or not ints"
        )
    if list(cells) != sorted(set(cells)):
        raise ValueError(f"stage_b_cells={list(cells)!r} must be ascending without repeats")
    return tuple(cells)


def bytes_per_sample(cells: Sequence[int], channels: int, dtype: str) -> int:
    """Stored tensor bytes the Stage B columns add per sample: Σ channels·s² × the dtype's size."""
    return sum(channels * s * s for s in cells) * _ITEMSIZE[canonical_dtype(dtype)]


def conditioning_metadata(
    mode: str, cells: Sequence[int], stage_a_size_px: int, channels: int, dtype: str
) -> dict[str, Any]:
    """The ``cascade.stage_b_conditioning`` value (file metadata and manifest) for a stored set of sizes."""
    n = stage_a_size_px // LATENT_CELL_PX
    return {
        "mode": mode,
        "cells": list(cells),
        "columns": [stage_b_effnet_column(s) for s in cells],
        "stage_a_cells": n,
        "drawn_cells": list(cell_range(n)),
        "encoder_role": "effnet",  # same flavor, weights and autocast as the effnet column
        "input": "stage_a crop (3, S, S) in [0, 1], torchvision resize to (32s, 32s), NEAREST",
        "draw": "f ~ U(0.5, 1), s = floor(stage_a_cells * f); subset: nearest stored s, ties to the smaller",
        "bytes_per_sample": bytes_per_sample(cells, channels, dtype),
    }


def resize_nearest(images_bchw: Any, cells: int) -> Any:
    """Official train_b.py's effnet input: ``resize(images, (32s, 32s), NEAREST)`` of [0, 1] images."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    side = cells * LATENT_CELL_PX
    # antialias is ignored for NEAREST; passed so torchvision never warns about its default
    return F.resize(images_bchw, [side, side], interpolation=InterpolationMode.NEAREST, antialias=False)
