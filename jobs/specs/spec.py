"""A training spec: everything the generic loop needs to know about one trainable model (torchtitan-style).

The Ray Train loop (``jobs.train_loop``) knows no model: it asks the spec which cache columns to read and
which shapes they must have, how to build the frozen and trainable modules, the GDF and the objective of one
micro-batch, the FSDP units, the checkpoint file names, the preview, and the checks to make before any worker
starts. Adding a trainable model means adding a spec (``jobs.specs``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:
    from jobs.train_config import TrainConfig
    from jobs.train_loop import TrainLoop
    from pipelines.train_data.batches import Cache, MicroBatch
    from stages.gdf import GDF
    from stages.objective import StepLoss


@dataclass
class Built:
    """The modules of one worker.

    Attributes:
        trainable: the module whose ``requires_grad`` parameters the optimizer updates.
        module: the module the objective calls (wrapped by DDP/FSDP when there are several workers).
        saved: checkpoint file name → module; a module that is ``module`` itself is saved through the
            (FSDP-aware) full state dict, others (adapters) through their own ``state_dict``.
        frozen: helper models the objective uses and never trains (e.g. the super-resolution effnet).
    """

    trainable: nn.Module
    module: nn.Module
    saved: dict[str, nn.Module]
    frozen: dict[str, nn.Module] = field(default_factory=dict)


# (the loop, a micro-batch, the model to call) → the micro-batch's loss
Objective = Callable[["TrainLoop", "MicroBatch", nn.Module], "StepLoss"]


@dataclass(frozen=True, kw_only=True)
class TrainSpec:
    """One trainable model, declared.

    Attributes:
        name: the spec's name (``stage_c``, ``stage_c_lora``, ``stage_c_controlnet``, ``stage_b``).
        mode: ``TrainConfig.mode`` that selects it (set by its CLI job).
        command: the ``cascade`` subcommand that trains it.
        flavor_family: the flavors ``TrainConfig.flavor`` may name (``stage_c/...``).
        columns: ``(model config, cache shapes) → {column: expected shape}``: the cache columns a micro-batch
            carries and the per-sample shape each must have (for effnet, channels only: its size is the
            bucket's). Raises ``ValueError`` naming what the cache lacks.
        build: ``(config, device) → Built``: frozen and trainable modules, seeded or from ``config.weights``.
        gdf: ``config → GDF``: schedule, target, noise conditioning and loss weight.
        objective: the loss of one micro-batch, drawn from the RNG the loop seeded for it.
        checkpoint: the name of the main checkpoint file (``generator``, ``lora``, ``controlnet``).
        preview: ``(loop, micro-batch) → PNG bytes``.
        fsdp_units: module classes that become FSDP units; empty: this model does not train under FSDP.
        ema: whether an EMA of the module may be kept (saved as ``generator_ema``).
        images: whether micro-batches carry the training crops (``IMAGES``), e.g. for control inputs.
        sections: optional ``TrainConfig`` sections this spec needs (``controlnet``); others must be unset.
        checks: ``config → None`` checks that can fail before a worker starts, naming the field.
    """

    name: str
    mode: str
    command: str
    flavor_family: str
    columns: Callable[[Any, Mapping[str, tuple[int, ...]]], dict[str, tuple[int, ...]]] | None
    build: Callable[[TrainConfig, Any], Built] | None
    gdf: Callable[[TrainConfig], GDF] | None
    objective: Objective | None
    checkpoint: str
    preview: Callable[[TrainLoop, MicroBatch], bytes] | None
    fsdp_units: tuple[type[nn.Module], ...] = ()
    ema: bool = False
    images: bool = False
    sections: tuple[str, ...] = ()
    checks: tuple[Callable[[TrainConfig], None], ...] = ()

    @property
    def checkpoint_files(self) -> tuple[str, ...]:
        """The weight files a checkpoint of this spec holds (besides optimizer and trainer state)."""
        return (self.checkpoint, *(("generator_ema",) if self.ema else ()))


REQUIRED = ("name", "mode", "command", "flavor_family", "columns", "build", "gdf", "objective", "checkpoint",
            "preview")  # fmt: skip


def check_spec(spec: TrainSpec) -> TrainSpec:
    """Refuse a spec that leaves out something the loop needs, naming the piece."""
    for name in REQUIRED:
        value = getattr(spec, name)
        if value is None or value == "":
            raise ValueError(
                f"training spec {spec.name or '?'!r} declares no {name!r}, which the training loop needs"
            )
    if not all(isinstance(unit, type) and issubclass(unit, nn.Module) for unit in spec.fsdp_units):
        raise ValueError(f"training spec {spec.name!r}: fsdp_units must be nn.Module classes")
    return spec


def check_cache_columns(spec: TrainSpec, config: TrainConfig, cache: Cache) -> dict[str, tuple[int, ...]]:
    """The columns ``spec`` reads, checked against the cache's shapes; raises naming flavor, column and path."""
    from stages.flavors import get_flavor

    shapes = cache.shapes
    wanted = spec.columns(get_flavor(config.flavor).config, shapes)
    for name, shape in wanted.items():
        if shapes.get(name) != shape:
            raise ValueError(
                f"flavor={config.flavor!r} expects {name} of shape {shape}, but data.path={config.data.path!r} "
                f"holds {shapes.get(name)} (encoded with {dict(cache.metadata.encoder_flavors)})"
            )
    return wanted


def frozen_flavor(
    field: str, name: str | None, weights: str | None, use: str, weights_field: str = ""
) -> Any:
    """The flavor of a frozen helper model (``preview.previewer``, ``controlnet.effnet``), checked: named, known,
    and with its weights unless it is a ``*/tiny`` flavor (random weights, for tests and demos)."""
    from stages.flavors import get_flavor

    if name is None:
        raise ValueError(
            f"{field} is required {use} (a released flavor with {field}_weights, or a */tiny one)"
        )
    try:
        flavor = get_flavor(name)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None
    if weights is None and not flavor.tiny:
        raise ValueError(
            f"{weights_field or field + '_weights'} is required for {field}={name!r} (only */tiny flavors run on "
            "random weights)"
        )
    return flavor
