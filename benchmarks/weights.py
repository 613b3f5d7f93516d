"""Random released-size weights written in the official layouts, so benchmark jobs load real files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path


def save_random_weights(flavors: Mapping[str, str], root: Path) -> dict[str, str | None]:
    """Per role: a safetensors file (or an HF folder for the CLIP conditioners); None for tiny flavors."""
    from stages.flavors import get_flavor
    from stages.weights import save_weights

    paths: dict[str, str | None] = {}
    for role, name in flavors.items():
        flavor = get_flavor(name)
        if flavor.tiny:
            paths[role] = None
            continue
        model = flavor.build()
        if flavor.family in ("clip_text", "clip_vision"):
            model.model.save_pretrained(root / role, safe_serialization=True)
            paths[role] = str(root / role)
        else:
            save_weights(model.state_dict(), root / f"{role}.safetensors")
            paths[role] = str(root / f"{role}.safetensors")
        del model
    return paths
