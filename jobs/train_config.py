"""Configuration of the training jobs (``cascade train-c``, ``train-lora``, ``train-controlnet``, ``train-b``).

Defaults are the official trainer's (spec §3): AdamW lr 1e-4 with torch's betas/eps and weight decay 0.01,
one warmup update, gradient clipping at 1.0, bf16 autocast, P2 loss weight unless ``adaptive_loss_weight``.
Every field is checked here, before Ray starts; the checks that need the cache run in ``jobs.train``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from jobs.config import TRAINED
from jobs.specs import get_spec
from pipelines.core.sources import SourceConfig
from pipelines.train_data.batches import TrainDataConfig

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True, kw_only=True)
class EmaConfig:
    """EMA of the generator (``stage_c`` mode): a hard copy until ``start_step``, then β-blends every ``every``."""

    start_step: int = 5000
    every: int = 100
    beta: float = 0.9

    def __post_init__(self) -> None:
        if self.every < 1 or self.start_step < 0:
            raise ValueError(f"every={self.every} must be >= 1 and start_step={self.start_step} >= 0")
        if not 0 <= self.beta <= 1:
            raise ValueError(f"beta={self.beta} must be in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Official LoRA: ``rank`` (alpha 1) on every module whose name contains one of ``filters``."""

    rank: int = 4
    filters: tuple[str, ...] = (".attn",)

    def __post_init__(self) -> None:
        if self.rank < 1 or not self.filters:
            raise ValueError(f"rank={self.rank} must be >= 1 and filters={self.filters!r} non-empty")


@dataclass(frozen=True, kw_only=True)
class ControlNetTrainConfig:
    """The ControlNet to train and where its control inputs come from.

    Attributes:
        flavor: ``controlnet/{canny,inpainting,super_resolution}`` (or their ``/tiny`` twins).
        weights: initial ControlNet weights (safetensors); None: seeded random init.
        images: where the image–text shards the cache was encoded from are now (None: the paths the cache
            recorded); the control input is computed from each sample's training crop of its original image
            (canny edges, inpainting mask + masked image, the low-res image's effnet latent).
        effnet: the effnet flavor for the super-resolution input (the low-res image's latent); required there.
        effnet_weights: its weights (required for a released flavor; must match the cache's effnet).
        offset_noise: GDF offset noise; None: the official value for the kind (0.1 inpainting/SR, 0 canny).
    """

    flavor: str = dataclasses.field(metadata=TRAINED)
    weights: str | None = None
    images: SourceConfig | None = None
    effnet: str | None = None
    effnet_weights: str | None = None
    offset_noise: float | None = None

    @property
    def kind(self) -> str:
        return self.flavor.split("/")[1]

    def __post_init__(self) -> None:
        parts = self.flavor.split("/")
        if parts[0] != "controlnet" or len(parts) < 2:
            raise ValueError(f"flavor={self.flavor!r} is not a controlnet flavor")
        if self.kind not in ("canny", "inpainting", "super_resolution"):
            raise ValueError(
                f"flavor={self.flavor!r}: trainable kinds are canny, inpainting, super_resolution"
            )

    @property
    def noise(self) -> float:
        if self.offset_noise is not None:
            return self.offset_noise
        return 0.0 if self.kind == "canny" else 0.1


@dataclass(frozen=True, kw_only=True)
class PreviewConfig:
    """Preview grids every ``every`` steps (0 turns them off): decoded samples next to the cached latents.

    Stage C's grids are decoded by the Previewer (``previewer``), Stage B's by Stage A (``stage_a``): name the
    one the mode needs when ``every`` > 0, with its weights (a ``*/tiny`` flavor runs on random weights).
    ``timesteps`` and ``cfg`` default to the official sampling of the model (Stage C 20 steps at cfg 5,
    Stage B 10 steps at cfg 1.1).
    """

    every: int = 0
    samples: int = 4
    timesteps: int | None = None
    cfg: float | None = None
    previewer: str | None = None
    previewer_weights: str | None = None
    stage_a: str | None = None
    stage_a_weights: str | None = None

    def __post_init__(self) -> None:
        if self.every < 0 or self.samples < 1 or (self.timesteps is not None and self.timesteps < 1):
            raise ValueError(f"every={self.every} >= 0, samples={self.samples} and timesteps >= 1 required")
        if self.previewer is not None and not self.previewer.startswith("previewer"):
            raise ValueError(f"previewer={self.previewer!r} is not a previewer flavor")


@dataclass(frozen=True, kw_only=True)
class ScalingSpec:
    """Ray Train workers: ``num_workers`` × (``cpus_per_worker``, one GPU if ``use_gpu``); DDP or FSDP."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    strategy: str = "ddp"
    max_failures: int = 0

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError(f"num_workers={self.num_workers} and cpus_per_worker must be positive")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r}; allowed: {', '.join(STRATEGIES)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A training run on cached latents.

    Attributes:
        data: the latent cache and how batches are drawn.
        output_dir: Ray Train storage (local or s3://): ``{output_dir}/{run_name}/checkpoint_<step>/``
            hold the safetensors checkpoints; ``metrics.csv`` and ``previews/`` sit beside them.
        flavor, weights: the flavor of the model the mode trains (Stage C; Stage B for ``stage_b``) and its
            initial weights (None: seeded random init, training from scratch). Required, like every model field:
            a ``*/tiny`` flavor is for tests and demos.
        allow_random_weights: train on a cache whose encoders ran on random weights (``*/tiny`` flavors without
            weights files, ``cascade.random_weights`` in its metadata); refused otherwise.
        mode: ``stage_c`` (full fine-tune), ``lora``, ``controlnet`` or ``stage_b``: the training spec
            (``jobs.specs``), set by the job.
        batch_size: samples per optimizer step over all workers (micro-batch = batch_size / workers / accum).
        grad_accum_steps: micro-batches per optimizer step on each worker.
        max_steps: optimizer steps of the whole run (a resumed run continues to this total).
        save_every, keep_checkpoints: checkpoint interval in steps (the last step always saves) and how many
            Ray Train keeps.
        log_every: steps between metric reports (CSV, Ray Train, TensorBoard if installed).
    """

    data: TrainDataConfig
    output_dir: str
    flavor: str = dataclasses.field(metadata=TRAINED)
    weights: str | None = None
    allow_random_weights: bool = False
    mode: str = "stage_c"
    experiment_id: str = ""
    batch_size: int = 32
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_updates: int = 1
    grad_clip: float = 1.0
    bf16_autocast: bool = True
    adaptive_loss_weight: bool = False
    seed: int = 42
    ema: EmaConfig | None = None
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    controlnet: ControlNetTrainConfig | None = None
    preview: PreviewConfig = dataclasses.field(default_factory=PreviewConfig)
    scaling: ScalingSpec = dataclasses.field(default_factory=ScalingSpec)
    save_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    storage_endpoint_url: str | None = None

    def __post_init__(self) -> None:
        spec = get_spec(self.mode)
        if not self.flavor.startswith(f"{spec.flavor_family}/"):
            raise ValueError(
                f"flavor={self.flavor!r} is not a {spec.flavor_family} flavor (mode {self.mode!r})"
            )
        for name in (
            "batch_size",
            "grad_accum_steps",
            "max_steps",
            "save_every",
            "keep_checkpoints",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        per_step = self.scaling.num_workers * self.grad_accum_steps
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of scaling.num_workers × grad_accum_steps "
                f"= {per_step}"
            )
        if self.lr <= 0 or self.warmup_updates < 0 or self.grad_clip <= 0:
            raise ValueError(f"lr={self.lr} and grad_clip={self.grad_clip} must be > 0, warmup_updates >= 0")
        if ("controlnet" in spec.sections) != (self.controlnet is not None):
            raise ValueError(
                "controlnet: required in mode 'controlnet' (cascade train-controlnet) and only there"
            )
        if self.scaling.strategy == "fsdp" and not spec.fsdp_units:
            raise ValueError(
                f"scaling.strategy='fsdp' trains the full models (stage_c, stage_b), not {self.mode!r} (as officially)"
            )
        if self.scaling.strategy == "fsdp" and (self.ema is not None or self.preview.every):
            raise ValueError(
                "scaling.strategy='fsdp' works without ema and previews (both need the full model)"
            )
        if self.ema is not None and not spec.ema:
            raise ValueError(
                f"ema: the official EMA is of a full generator (stage_c, stage_b), not {self.mode!r}"
            )

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.scaling.num_workers * self.grad_accum_steps)

    @property
    def storage_options(self) -> dict[str, str]:
        return {"endpoint_url": self.storage_endpoint_url} if self.storage_endpoint_url else {}

    @property
    def run_dir(self) -> str:
        return f"{self.output_dir.rstrip('/')}/{self.run_name}"

    @property
    def run_name(self) -> str:
        """The Ray Train run name: ``experiment_id``, or the mode when it is empty."""
        return self.experiment_id or self.mode
