"""``cascade train-c`` / ``train-lora`` / ``train-controlnet`` / ``train-b``: Ray Train on a latent cache.

``check_train`` runs before Ray starts and refuses a bad config with the field named: an unknown flavor, a
missing cache or weights file, a cache whose tensor shapes do not fit the model, a failed check of the
mode's training spec (``jobs.specs``: a ControlNet that does not fit the Stage C, a preview decoder that does
not decode the model's latents), a resume checkpoint from another run. ``run_train`` then plans the data (see
``pipelines.train_data.batches``), builds one ordered Ray Dataset per rank and fits a ``TorchTrainer`` whose workers
run ``jobs.train_loop.TrainLoop`` (DDP on gloo or nccl; FSDP on request). Checkpoints are Ray Train
checkpoints named ``checkpoint_<step>`` under ``{output_dir}/{experiment_id}``; a rerun of the same config
resumes from the newest one exactly (same batches, same random draws).
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec

from jobs.specs import get_spec
from jobs.specs.spec import check_cache_columns
from jobs.train_checkpoint import complete_state
from jobs.train_config import TrainConfig
from pipelines.core.notice import notice
from pipelines.core.progress import Progress, polling
from pipelines.train_data.batches import (
    Cache,
    ReadSpec,
    WindowPlan,
    iter_rank,
    open_cache,
    plan_windows,
    rank_datasets,
)
from pipelines.train_data.crops import crop_spec
from stages.flavors import get_flavor

RESUME_FIELDS = ("mode", "flavor", "seed", "batch_size")


@dataclass(frozen=True)
class TrainPlan:
    cache: Cache
    columns: dict[str, tuple[int, ...]]  # what the spec reads, with the shapes checked against the cache
    windows: list[WindowPlan]
    resume: str | None
    start_step: int


@dataclass(frozen=True)
class TrainSummary:
    run_dir: str
    mode: str
    start_step: int
    final_step: int
    checkpoint: str | None
    metrics_csv: str
    last_metrics: dict[str, Any]


def _flavor(field: str, name: str) -> Any:
    try:
        return get_flavor(name)
    except ValueError as err:
        raise ValueError(f"{field}: {err}") from None


def _exists(field: str, uri: str | None, options: dict[str, Any]) -> None:
    if uri is None:
        return
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{field}={uri!r} does not exist")


def latest_checkpoint(config: TrainConfig) -> tuple[str | None, dict[str, Any] | None]:
    """The newest complete ``checkpoint_*`` directory of this run (URI) and its trainer state, if any (one
    that a killed run left half persisted is passed over, with a notice)."""
    fs, root = fsspec.core.url_to_fs(config.run_dir, **config.storage_options)
    for directory in sorted(fs.glob(f"{root}/checkpoint_*"), reverse=True):  # names carry the step, 8 digits
        state = complete_state(fs, directory)
        if state is not None:
            return (directory if "file" in _protocols(fs) else fs.unstrip_protocol(directory)), state
        notice(f"{directory} is an incomplete checkpoint (a run was stopped while it was saved): passed over")
    return None, None


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def check_cache_weights(config: TrainConfig, cache: Cache) -> None:
    meta = cache.metadata
    if meta.made_by_random_weights and not config.allow_random_weights:
        random = [f"{role}={f}" for role, f in sorted(meta.encoder_flavors.items()) if f.endswith("/tiny")]
        raise ValueError(
            f"data.path={config.data.path!r} was encoded with random-weight encoders ({', '.join(random)}): "
            "training on it learns nothing about real images; set allow_random_weights: true for a test run"
        )


def check_train(config: TrainConfig) -> TrainPlan:
    """Every check that can fail before a worker starts; returns the data plan and the resume point."""
    spec = get_spec(config.mode)
    _flavor("flavor", config.flavor)
    _exists("weights", config.weights, {})
    for check in spec.checks:
        check(config)
    cache = open_cache(config.data)
    check_cache_weights(config, cache)
    columns = check_cache_columns(spec, config, cache)
    resume, state = latest_checkpoint(config)
    start = 0
    if state is not None:
        for name in RESUME_FIELDS:
            if state.get(name) != getattr(config, name):
                raise ValueError(
                    f"{name}={getattr(config, name)!r}, but the run in {config.run_dir} was trained with "
                    f"{state.get(name)!r}; use another experiment_id or output_dir to start afresh"
                )
        start = int(state["step"])
    windows: list[WindowPlan] = []
    if start < config.max_steps:
        windows = plan_windows(
            cache.files, seed=config.seed, global_batch=config.batch_size, max_steps=config.max_steps,
            window_files=config.data.shuffle_window_files, start_step=start,
        )  # fmt: skip
    return TrainPlan(cache, columns, windows, resume, start)


def read_spec(config: TrainConfig, plan: TrainPlan) -> ReadSpec:
    return ReadSpec(
        files=plan.cache.files, columns=tuple(plan.columns), format=config.data.format,
        storage_options=config.data.storage_options,
        seed=config.seed, micro_batch=config.micro_batch, accum=config.grad_accum_steps,
        world=config.scaling.num_workers, rank=0, start_step=plan.start_step,
        crops=crop_spec(config.data.path, config.controlnet.images, config.data.storage_options)
        if get_spec(config.mode).images and config.controlnet is not None else None,
    )  # fmt: skip


def _storage(config: TrainConfig) -> tuple[str, Any]:
    """Ray Train's storage_path and filesystem (a pyarrow S3 filesystem for a custom endpoint)."""
    if "://" not in config.output_dir:
        return os.path.abspath(config.output_dir), None
    if config.storage_endpoint_url is None:
        return config.output_dir, None
    from pyarrow import fs

    endpoint = config.storage_endpoint_url
    scheme, _, host = endpoint.partition("://")
    s3 = fs.S3FileSystem(
        endpoint_override=host, scheme=scheme, region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    )
    return config.output_dir.split("://", 1)[1], s3


def newest_checkpoint(*checkpoints: Any) -> Any:
    """The checkpoint with the highest step (names are ``checkpoint_<step>``): Ray Train's own after a restart
    within this fit, or the newest one on storage that the driver found."""
    found = [c for c in checkpoints if c is not None]
    return max(found, key=lambda c: c.path.rstrip("/").rsplit("_", 1)[-1]) if found else None


def _checkpoint(uri: str | None, storage_fs: Any) -> Any:
    import ray.train

    if uri is None:
        return None
    return ray.train.Checkpoint(uri.split("://", 1)[1] if storage_fs is not None else uri, storage_fs)


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: build the loop (resuming from Ray's checkpoint) and train on this rank's data."""
    import ray.train
    import ray.train.torch

    from jobs.train_loop import TrainLoop, World

    config: TrainConfig = loop_config["config"]
    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()

    def report(metrics: dict[str, Any], directory: str | None, save: bool) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        name = f"checkpoint_{metrics['step']:08d}" if save else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    checkpoint = newest_checkpoint(ray.train.get_checkpoint(), loop_config["resume"])
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext(None) as resume_dir:
        world = World(rank, size, ray.train.torch.get_device(), report, resume_dir)
        loop = TrainLoop(config, world, loop_config["empty_caption"], loop_config["columns"])
    shard = ray.train.get_dataset_shard(f"rank_{rank}")
    loop.run(iter_rank(shard, config.data.prefetch_batches))


@contextlib.contextmanager
def watch_metrics(config: TrainConfig, start_step: int, every_s: float = 5.0) -> Iterator[Progress]:
    """Show training progress (step, loss, samples/s, ETA) from rank 0's ``metrics.csv``, read every
    ``every_s`` seconds on the driver while the workers train (one small read per poll, whatever the scale)."""
    progress = Progress(
        get_spec(config.mode).command, config.max_steps, unit="steps", rate_of="", initial=start_step
    )
    seen = [start_step]

    def read() -> None:
        try:
            with fsspec.open(f"{config.run_dir}/metrics.csv", "rt", **config.storage_options) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) > seen[0]]
        except (OSError, ValueError, KeyError):
            return  # not written yet, or mid-rewrite
        if rows:
            last = rows[-1]
            shown = {"loss": float(last["loss"]), "samples/s": float(last["samples_per_s"])}
            progress.update(int(last["step"]) - seen[0], show=shown)
            seen[0] = int(last["step"])

    with progress, polling(read, every_s):
        yield progress


def run_train(config: TrainConfig, plan: TrainPlan | None = None) -> TrainSummary:
    """Check and plan (unless ``plan`` is ``check_train``'s result already), then fit; returns where the
    checkpoints and metrics are."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    plan = plan or check_train(config)
    metrics_csv = f"{config.run_dir}/metrics.csv"
    if not plan.windows:
        return TrainSummary(
            config.run_dir, config.mode, plan.start_step, plan.start_step, plan.resume, metrics_csv, {}
        )

    storage_path, storage_fs = _storage(config)
    scaling = config.scaling
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": config, "empty_caption": plan.cache.empty_caption, "columns": plan.columns,
                           "resume": _checkpoint(plan.resume, storage_fs)},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(
            name=config.run_name, storage_path=storage_path, storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=FailureConfig(max_failures=scaling.max_failures),
        ),
        datasets=rank_datasets(plan.windows, read_spec(config, plan), config.data.read_cpus),
        dataset_config=DataConfig(datasets_to_split=[]),
    )  # fmt: skip
    with watch_metrics(config, plan.start_step):
        result = trainer.fit()
    checkpoint = result.checkpoint.path if result.checkpoint is not None else None
    final = (result.metrics or {}).get("step", plan.start_step)
    return TrainSummary(config.run_dir, config.mode, plan.start_step, final, checkpoint, metrics_csv,
                        dict(result.metrics or {}))  # fmt: skip
