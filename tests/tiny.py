"""The tiny models tests name explicitly (seeded random weights): no config field defaults to them."""

from __future__ import annotations

from typing import Any

from pipelines.encode.models import EncoderConfig
from pipelines.report.steps import ReconstructConfig


def encoders(**overrides: Any) -> dict[str, EncoderConfig]:
    """``effnet``, ``clip_text`` and ``clip_image`` for ``EncodeConfig(**encoders())``; overrides replace one."""
    return {
        "effnet": EncoderConfig(flavor="effnet/tiny"),
        "clip_text": EncoderConfig(flavor="clip_text/tiny"),
        "clip_image": EncoderConfig(flavor="clip_vision/tiny"),
    } | overrides


def reconstruct(**fields: Any) -> ReconstructConfig:
    """The report's Stage B + Stage A at their tiny flavors."""
    return ReconstructConfig(
        stage_b=EncoderConfig(flavor="stage_b/tiny", batch_size=4),
        stage_a=EncoderConfig(flavor="stage_a/tiny", batch_size=4),
        **fields,
    )
