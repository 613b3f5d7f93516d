"""The training loop one worker runs: a training spec's step on cached tensors, accumulation, checkpoints.

The loop is generic: the model, its objective, checkpoint names, FSDP units and preview come from the spec of
``config.mode`` (``jobs.specs``). It needs no Ray: ``World`` says who this worker is (rank, size, device) and how it reports, and the batches
are any iterator of micro-batches from ``pipelines.train_data.batches``. ``jobs.train`` runs it on Ray Train
workers (DDP over gloo or nccl); tests run it in-process.

Per micro-batch ``(step, micro)`` the RNG is seeded from ``(seed, step, micro)``, so caption dropout, image
use, t, noise and dropout masks depend on the sample's place in the plan only: one worker with accumulation
2k draws exactly what two workers with k draw, and a resumed run draws what the uninterrupted one did.
Gradients of the ``world × accum`` micro-batches are averaged (DDP averages ranks, each micro-loss is divided
by ``accum``). The adaptive loss weight is updated once per optimizer step with the per-sample losses of the
whole global batch, gathered from every rank, so all ranks hold the same buckets (the official trainer updates
per micro-step and per rank; with one worker and no accumulation the two are the same).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from torch import nn

from jobs.specs import get_spec
from jobs.train_checkpoint import read_checkpoint, write_checkpoint
from jobs.train_config import TrainConfig
from pipelines.core.latents_reader import to_float32
from pipelines.train_data.batches import MicroBatch
from stages.ema import update_weights_ema
from stages.flavors import build_model
from stages.objective import StepLoss

METRIC_FIELDS = ("step", "loss", "lr", "grad_norm", "samples_per_s", "data_wait_fraction", "elapsed_s")


@dataclass
class World:
    """This worker's place: rank, world size, device, and how metrics/checkpoints leave it.

    ``report(metrics, checkpoint_dir, save)`` is called by every rank at every checkpoint step (Ray Train's
    ``report`` is collective); ``checkpoint_dir`` is a local directory on rank 0, None elsewhere.
    """

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    report: Callable[[dict[str, Any], str | None, bool], None] = lambda metrics, checkpoint, save: None
    resume_dir: str | None = None

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)


def micro_seed(seed: int, step: int, micro: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro]).generate_state(1, np.uint64)[0] >> 1)


def lr_factor(step: int, warmup: int) -> float:
    """``GradualWarmupScheduler(multiplier=1)``: lr × step/warmup until ``warmup`` updates are done."""
    return 1.0 if warmup == 0 else min(1.0, step / warmup)


class TrainLoop:
    """Models, optimizer and state of one worker; ``run(batches)`` trains to ``config.max_steps``."""

    def __init__(
        self,
        config: TrainConfig,
        world: World,
        empty_caption: dict[str, np.ndarray],
        columns: dict[str, tuple[int, ...]],
    ) -> None:
        self.config, self.world, self.columns = config, world, columns
        self.spec = get_spec(config.mode)
        self.device = world.device
        built = self.spec.build(config, self.device)
        self.trainable, self.module, self.saved, self.frozen = (
            built.trainable,
            built.module,
            built.saved,
            built.frozen,
        )
        self.empty = {
            k: torch.from_numpy(np.asarray(v, np.float32)).to(self.device) for k, v in empty_caption.items()
        }
        self.gdf = self.spec.gdf(config)
        self.autocast = torch.bfloat16 if config.bf16_autocast else None
        self.ema = copy.deepcopy(self.module).eval().requires_grad_(False) if config.ema is not None else None
        self.step = 0
        self.metrics: MetricsLog | None = None
        self._frozen_models: dict[tuple[str, str | None], nn.Module] = {}
        checkpoint = read_checkpoint(world.resume_dir) if world.resume_dir is not None else None
        if checkpoint is not None:  # weights before sharding, the optimizer after (FSDP replaces parameters)
            self._load_weights(*checkpoint)
        self.model = self._parallel(self.module)
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay
        )
        if checkpoint is not None:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(self.model, self.optimizer, checkpoint[1], options=options)
        self._set_lr()

    # --- building -------------------------------------------------------------------------------------------
    def _parallel(self, module: nn.Module) -> nn.Module:
        if self.world.size == 1:
            return module
        if self.config.scaling.strategy == "fsdp":
            return _fsdp(module, self.spec.fsdp_units)
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def frozen_model(self, flavor: str, weights: str | None) -> nn.Module:
        """A model built once, on first use, in eval mode on this worker's device (preview decoders)."""
        if (flavor, weights) not in self._frozen_models:
            self._frozen_models[flavor, weights] = build_model(flavor, weights=weights, device=self.device)[0]
        return self._frozen_models[flavor, weights]

    # --- state ------------------------------------------------------------------------------------------------
    def _state_dicts(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """(weights by checkpoint name, name-keyed optimizer state); collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights = {  # the whole model through the (FSDP-aware) full state dict; adapters: their own weights
            name: get_model_state_dict(self.model, options=options)
            if module is self.module
            else module.state_dict()
            for name, module in self.saved.items()
        }
        if self.ema is not None:
            weights["generator_ema"] = self.ema.state_dict()
        return weights, get_optimizer_state_dict(self.model, self.optimizer, options=options)

    def _trainer_state(self) -> dict[str, Any]:
        adaptive = self.gdf.loss_weight.state_dict() if self.config.adaptive_loss_weight else None
        return {
            "step": self.step, "next_step": self.step, "mode": self.config.mode, "flavor": self.config.flavor,
            "seed": self.config.seed, "batch_size": self.config.batch_size, "world_size": self.world.size,
            "grad_accum_steps": self.config.grad_accum_steps, "adaptive_loss": adaptive,
        }  # fmt: skip

    def _load_weights(
        self, weights: dict[str, dict[str, torch.Tensor]], _optimizer: Any, state: dict
    ) -> None:
        for name, module in self.saved.items():
            module.load_state_dict(weights[name], strict=True)
        if self.ema is not None:
            self.ema.load_state_dict(weights["generator_ema"], strict=True)
        if state.get("adaptive_loss"):
            self.gdf.loss_weight.load_state_dict(state["adaptive_loss"])
        self.step = int(state["step"])

    def _set_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * lr_factor(self.step, self.config.warmup_updates)

    # --- one micro-batch --------------------------------------------------------------------------------------
    def tensor(self, batch: MicroBatch, name: str) -> torch.Tensor:
        """A micro-batch column as a float32 tensor on this worker's device."""
        return torch.from_numpy(to_float32(np.asarray(batch[name]))).to(self.device)

    def micro_loss(self, batch: MicroBatch, model: nn.Module | None = None) -> StepLoss:
        """The spec's objective on one micro-batch, drawn from the RNG seeded by (seed, step, micro)."""
        torch.manual_seed(micro_seed(self.config.seed, batch["step"], batch["micro"]))
        return self.spec.objective(self, batch, model or self.model)

    # --- the loop ---------------------------------------------------------------------------------------------
    def run(self, batches: Iterator[MicroBatch], *, progress: bool = True) -> list[dict[str, Any]]:
        """Train until ``max_steps``; returns the logged metric rows (rank 0's view)."""
        cfg, world = self.config, self.world
        accum = cfg.grad_accum_steps
        rows: list[dict[str, Any]] = []
        bar = _progress(progress and world.rank == 0, self.step, cfg.max_steps)
        if world.rank == 0:
            self.metrics = MetricsLog(cfg, self.step)
        losses, logsnrs, grad_norm = [], [], float("nan")
        window_start, wait, samples = time.perf_counter(), 0.0, 0
        started = window_start
        iterator = iter(batches)
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            wait += time.perf_counter() - t0
            if batch is None:
                raise RuntimeError(f"the data ran out at step {self.step} of {cfg.max_steps}")
            if batch["step"] < self.step:
                continue  # already trained (a restart inside a window)
            if batch["step"] > self.step:
                raise RuntimeError(
                    f"the data plan is at step {batch['step']} but the model at step {self.step}"
                )
            local = batch["micro"] - world.rank * accum
            last = local == accum - 1
            sync = contextlib.nullcontext() if last or world.size == 1 else _no_grad_sync(self.model)
            with sync:
                out = self.micro_loss(batch)
                (out.loss / accum).backward()
            losses.append(out.per_sample)
            logsnrs.append(out.logsnr)
            samples += len(out.per_sample)
            if not last:
                continue
            per_sample = world.all_gather(torch.cat(losses).float())
            if cfg.adaptive_loss_weight:
                self.gdf.loss_weight.update_buckets(world.all_gather(torch.cat(logsnrs).float()), per_sample)
            grad_norm = self._clip()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._set_lr()
            self._update_ema()
            losses, logsnrs = [], []
            bar.update(1)
            bar.set_postfix(loss=f"{per_sample.mean().item():.4f}")
            save = self.step % cfg.save_every == 0 or self.step == cfg.max_steps
            preview = cfg.preview.every and self.step % cfg.preview.every == 0
            if save or preview or self.step % cfg.log_every == 0:
                now = time.perf_counter()
                elapsed = now - window_start
                row = {"step": self.step, "loss": per_sample.mean().item(), "lr": self.optimizer.param_groups[0]["lr"],
                       "grad_norm": grad_norm, "samples_per_s": samples * world.size / elapsed,
                       "data_wait_fraction": wait / elapsed, "elapsed_s": now - started}  # fmt: skip
                rows.append(row)
                self._report(row, save, batch if preview else None)
                window_start, wait, samples = time.perf_counter(), 0.0, 0
        bar.close()
        return rows

    def _clip(self) -> float:
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        norm = nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor norm

    def _update_ema(self) -> None:
        ema = self.config.ema
        if self.ema is None or ema is None or self.step % ema.every:
            return
        update_weights_ema(self.ema, self.module, beta=ema.beta if self.step > ema.start_step else 0.0)

    def _report(self, row: dict[str, Any], save: bool, preview_batch: MicroBatch | None) -> None:
        """Log the row (CSV, TensorBoard); on a save step write the checkpoint and report both to Ray Train.

        Only save steps go to Ray Train: its ``report`` is collective and paced by the controller's poll
        interval (2 s by default), too slow to call every few steps without stalling training.
        """
        weights, optim_state = self._state_dicts() if save else (None, None)
        image = self.preview(preview_batch) if preview_batch is not None and self.world.rank == 0 else None
        if self.world.rank != 0:
            if save:
                self.world.report(row, None, True)
            return
        if self.metrics is not None:
            self.metrics.append(row)
        if image is not None:
            _write_bytes(f"{self.config.run_dir}/previews/step_{self.step:08d}.png", image, self.config)
        if not save:
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_checkpoint(tmp, weights, optim_state, self._trainer_state())
            if image is not None:
                with open(f"{tmp}/preview.png", "wb") as f:
                    f.write(image)
            self.world.report(row, tmp, True)

    # --- previews ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def preview(self, batch: MicroBatch) -> bytes:
        """The spec's preview grid (PNG) for the first samples of ``batch``."""
        return self.spec.preview(self, batch)

    @torch.no_grad()
    def sample(
        self, cond: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor], shape: torch.Size, *,
        timesteps: int, cfg: float,
    ) -> torch.Tensor:  # fmt: skip
        """x̂0 of GDF sampling (DDPM, shift 1, seeded by ``config.seed``) with the EMA model if there is one."""
        model = self.ema if self.ema is not None else self.module
        was_training = model.training
        model.eval()
        generator = torch.Generator(self.device).manual_seed(self.config.seed)
        *_, (x0, _, _) = self.gdf.sample(model, cond, shape, unconditional_inputs=uncond, timesteps=timesteps,
                                         cfg=cfg, shift=1.0, generator=generator)  # fmt: skip
        model.train(was_training)
        return x0


def _fsdp(module: nn.Module, units: tuple[type[nn.Module], ...]) -> nn.Module:
    """FSDP (``fully_shard``) as the official trainer configures it: one unit per module of the spec's
    ``fsdp_units`` (ResBlock, AttnBlock, TimestepBlock, FeedForwardBlock), gradients sharded but parameters
    kept after forward (SHARD_GRAD_OP), bf16 parameters and reductions. Works on CPU (gloo) and GPU (nccl)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for sub in list(module.modules()):
        if isinstance(sub, units):
            fully_shard(sub, reshard_after_forward=False, mp_policy=bf16)
    return fully_shard(module, reshard_after_forward=False, mp_policy=bf16)


@contextlib.contextmanager
def _no_grad_sync(model: nn.Module) -> Iterator[None]:
    """Skip the gradient all-reduce of an accumulation micro-step (DDP ``no_sync``, FSDP gradient sync)."""
    if hasattr(model, "no_sync"):
        with model.no_sync():
            yield
        return
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, start: int, total: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)


def _write_bytes(uri: str, data: bytes, config: TrainConfig) -> None:
    with fsspec.open(uri, "wb", **config.storage_options) as f:
        f.write(data)


class MetricsLog:
    """``{run_dir}/metrics.csv`` (rewritten whole, so it works on object stores) and TensorBoard if installed.

    A resumed run keeps the rows before its first step and replaces the rest.
    """

    def __init__(self, config: TrainConfig, start_step: int) -> None:
        self.uri = f"{config.run_dir}/metrics.csv"
        self.fs, self.path = fsspec.core.url_to_fs(self.uri, **config.storage_options)
        self.rows: list[dict[str, Any]] = []
        if self.fs.exists(self.path):
            text = self.fs.cat_file(self.path).decode()
            self.rows = [r for r in csv.DictReader(io.StringIO(text)) if int(r["step"]) <= start_step]
        self.tensorboard = _tensorboard(config.run_dir)

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append({k: row[k] for k in METRIC_FIELDS})
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        with self.fs.open(self.path, "wb") as f:
            f.write(out.getvalue().encode())
        if self.tensorboard is not None:
            for key in METRIC_FIELDS[1:]:
                if math.isfinite(row[key]):
                    self.tensorboard.add_scalar(f"train/{key}", row[key], row["step"])
            self.tensorboard.flush()


def _tensorboard(run_dir: str) -> Any:
    """A tensorboardX writer for a local run directory, if tensorboardX is installed."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        return None  # tensorboardX writes local event files
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # optional
        return None
    return SummaryWriter(f"{run_dir.removeprefix('file://')}/tensorboard")
