"""The trainable models, one spec each: ``get_spec(mode)`` for the loop and the config checks."""

from __future__ import annotations

from jobs.specs.spec import TrainSpec, check_spec
from jobs.specs.stage_b import STAGE_B
from jobs.specs.stage_c import STAGE_C, STAGE_C_CONTROLNET, STAGE_C_LORA

SPECS: dict[str, TrainSpec] = {
    s.mode: check_spec(s) for s in (STAGE_C, STAGE_C_LORA, STAGE_C_CONTROLNET, STAGE_B)
}


def get_spec(mode: str) -> TrainSpec:
    try:
        return SPECS[mode]
    except KeyError:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(SPECS)}") from None
