"""Stage C training step on the latent cache against the official on-the-fly step, and Ray Train data wait.

    python benchmarks/train.py --out benchmarks/results/train.json [--sizes tiny narrow] [--quick]

Per ``--sizes`` set (a Stage C flavor and the encoders that feed it):

* ``tiny``: ``stage_c/tiny`` fed by ``effnet/tiny``, ``clip_text/tiny``, ``clip_vision/tiny``;
* ``narrow``: ``stage_c/1b-narrow``, the block structure of ``stage_c/1b`` at width 256 (4 heads) with the
  released conditioning sizes (1280/1280/768), fed by the released-size ``effnet``, ``clip_text/bigg`` and
  ``clip_vision/l14``. The flavor is registered by this script only (also in Ray workers, via a setup hook).

All weights are seeded random (step time does not depend on their values). Real photos (scikit-image) are
ingested and encoded into a cache with ``run_encode`` (center crops, ``--image-size`` px) on a local Ray.
Then one fresh process per set, with ``--threads`` torch threads for everything, measures:

1. encoder peak memory: peak RSS (``VmHWM``, reset first) above the RSS before building the three encoders
   and running each on the full batch (an upper bound: officially CLIP-L sees ~10% of it), before Stage C
   exists; the encoders' weight bytes are reported beside it;
2. encoder cost per sample (what caching removes from the training node): each encoder timed on the full
   batch (best of 3 passes), wall and process CPU seconds (all threads), combined at the official
   fractions (effnet and CLIP-bigG text on every sample, CLIP-L vision on 10%); also their GFLOP and the
   decode + crop seconds per sample (official: in DataLoader workers; also gone with the cache);
3. step times, the two paths interleaved step by step (after ``--warmup`` steps of each) so that load
   changes (other jobs on the machine) hit both alike, on one ``TrainLoop`` (same model, AdamW, gradient
   clipping, loss). Step seconds are medians over the ``--steps`` timed steps; the speed-up is the median
   of the per-step ratios (on-the-fly step i over the cached step i just before it, so a burst of other
   jobs on a shared machine hits both sides of a ratio); process-CPU ratios, the ratio of the fastest
   steps and every step time are kept too:
   - cached: ``loop.micro_loss`` on a micro-batch from ``window_micro_batches`` + backward + AdamW step,
     with the tensors in memory; the cache read (all windows read once, per micro-batch) is added for
     ``cached_step_with_read_s``;
   - on the fly (official ``train_c``): effnet on the full batch of crops (ImageNet-normalised inside
     ``encode``), CLIP-bigG text on the full batch of captions with 5% replaced by "", CLIP-L vision on the
     samples drawn with probability 10%, all under no_grad; then ``diffusion_loss`` + backward + AdamW step.
   The speed-up is on-the-fly step / (cached step + cache read).

Finally ``run_train`` (a real Ray Train run: 1 worker, Ray Data reading the cache) trains ``--ray-steps``
steps; its metrics rows give the data-wait fraction and samples/s (the first row, which includes start-up,
is left out). bf16 autocast of the Stage C forward is off unless ``--bf16`` (the same for every path).

The narrow Stage C does ~30× fewer FLOPs per sample than ``stage_c/1b``, so its measured speed-up
overstates the released models'. ``flop_projection`` therefore gives, at equal FLOP/s,
1 + encoder GFLOP / Stage C GFLOP per sample (Stage C forward + backward counted on the meta device at the
run's latent size) for the measured flavors and for ``stage_c/1b`` and ``stage_c/3.6b``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import photos  # noqa: E402  (benchmarks/photos.py)
import torch  # noqa: E402
from local_ray import local_ray  # noqa: E402  (benchmarks/local_ray.py)
from weights import save_random_weights  # noqa: E402  (benchmarks/weights.py)

NARROW = "stage_c/1b-narrow"
SIZES: dict[str, dict[str, str]] = {
    "tiny": {"stage_c": "stage_c/tiny", "effnet": "effnet/tiny", "clip_text": "clip_text/tiny",
             "clip_image": "clip_vision/tiny"},
    "narrow": {"stage_c": NARROW, "effnet": "effnet", "clip_text": "clip_text/bigg",
               "clip_image": "clip_vision/l14"},
}  # fmt: skip
ENCODERS = ("effnet", "clip_text", "clip_image")


def register_narrow() -> None:
    """Add ``stage_c/1b-narrow`` to the flavor registry of this process (a Ray worker setup hook too)."""
    from stages import stage_c
    from stages.flavors import FLAVORS, Flavor

    config = dataclasses.replace(stage_c.FLAVORS["stage_c/1b"], c_cond=256, c_hidden=(256, 256), nhead=(4, 4))
    FLAVORS.setdefault(NARROW, Flavor(NARROW, "stage_c", config, stage_c.StageC, ()))


@dataclasses.dataclass(frozen=True)
class Settings:
    images: int
    batch: int
    image_size_px: int
    warmup: dict[str, int]
    steps: dict[str, int]
    threads: int
    bf16_autocast: bool
    ray_steps: dict[str, int]


# --- the cache ----------------------------------------------------------------------------------------------
def build_cache(
    root: Path, flavors: dict[str, str], samples: list, image_size_px: int, batch: int,
    roles: tuple[str, ...] = ENCODERS, **options: Any,
) -> Path:  # fmt: skip
    """Ingest the photos and encode them with the set's encoders for ``roles`` (Ray must be up); returns the
    cache. ``options`` go to ``EncodeConfig`` (``stage_a_size_px`` to the preprocessing)."""
    from pipelines.core.preprocess import PreprocessConfig
    from pipelines.core.sources import SourceConfig
    from pipelines.encode.models import EncoderConfig
    from pipelines.encode.pipeline import EncodeConfig, run_encode

    shards = photos.ingest(samples, root, per_shard=len(samples))
    weights = save_random_weights({r: flavors[r] for r in roles}, root / "weights")
    encoders = {role: EncoderConfig(flavor=flavors[role], weights=weights[role], batch_size=batch)
                for role in roles}  # fmt: skip
    side = {"stage_a_size_px": options.pop("stage_a_size_px")} if "stage_a_size_px" in options else {}
    run_encode(
        EncodeConfig(
            shards=SourceConfig(kind="webdataset", path=str(shards)), output_dir=str(root / "cache"),
            preprocess=PreprocessConfig(mode="center", image_size_px=image_size_px, **side), formats=("parquet",),
            **encoders, **options,
        )
    )  # fmt: skip
    return root / "cache"


def train_config(
    cache: Path, out: Path, stage_c: str, settings: Settings, max_steps: int, log_every: int = 1
) -> Any:
    from jobs.train_config import ScalingSpec, TrainConfig
    from pipelines.train_data.batches import TrainDataConfig

    return TrainConfig(
        data=TrainDataConfig(path=str(cache)), output_dir=str(out), flavor=stage_c, allow_random_weights=True,
        batch_size=settings.batch, max_steps=max_steps, log_every=log_every, save_every=max_steps,
        bf16_autocast=settings.bf16_autocast, scaling=ScalingSpec(num_workers=1, cpus_per_worker=1.0),
    )  # fmt: skip


# --- in-process measurements (one fresh process per set) ----------------------------------------------------
def _status_mib(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of this process from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _reset_peak_rss() -> None:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0), so the next peak is this block's."""
    Path("/proc/self/clear_refs").write_text("5")


class Clock:
    """Wall and process-CPU (all threads) seconds of a block."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def _optimizer_step(loop: Any, loss: torch.Tensor) -> None:
    """What ``TrainLoop.run`` does after the micro-loss (one worker, no accumulation, no EMA)."""
    loss.backward()
    params = [p for p in loop.trainable.parameters() if p.requires_grad]
    torch.nn.utils.clip_grad_norm_(params, loop.config.grad_clip)
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)


def cached_step(loop: Any, batch: dict[str, Any]) -> dict[str, float]:
    with Clock() as step:
        _optimizer_step(loop, loop.micro_loss(batch).loss)
    return {"step_s": step.wall, "step_cpu_s": step.cpu}


def on_the_fly_step(
    loop: Any, encoders: dict[str, Any], pixels: torch.Tensor, captions: list[str], rng: np.random.Generator
) -> dict[str, float]:
    """The official train_c step: encoders under no_grad with the official draws, then the same update."""
    from stages.objective import CAPTION_DROPOUT, CLIP_IMG_PROBABILITY, diffusion_loss

    b = len(captions)
    drop = rng.random(b) < CAPTION_DROPOUT
    use_img = torch.from_numpy(rng.random(b) < CLIP_IMG_PROBABILITY)
    with Clock() as step:
        with Clock() as enc, torch.no_grad():
            latents = encoders["effnet"].encode(pixels)
            text, pooled = encoders["clip_text"](
                ["" if d else c for c, d in zip(captions, drop, strict=True)]
            )
            img = torch.zeros(b, encoders["clip_image"].config.projection_dim)
            if bool(use_img.any()):
                img[use_img] = encoders["clip_image"](pixels[use_img])
        conditions = {"clip_text": text, "clip_text_pooled": pooled, "clip_img": img.unsqueeze(1)}
        autocast = torch.bfloat16 if loop.config.bf16_autocast else None
        out = diffusion_loss(loop.model, loop.gdf, latents, conditions, autocast_dtype=autocast)
        _optimizer_step(loop, out.loss)
    return {"step_s": step.wall, "step_cpu_s": step.cpu, "encoder_s": enc.wall, "encoder_cpu_s": enc.cpu,
            "clip_images": int(use_img.sum())}  # fmt: skip


def _encoder_pass(
    encoders: dict[str, Any], pixels: torch.Tensor, captions: list[str], roles: tuple[str, ...] = ENCODERS
) -> dict[str, Clock]:
    """Each encoder on the full batch, as the encode pipeline calls it; the clock of each."""
    run = {"effnet": lambda: encoders["effnet"].encode(pixels), "clip_text": lambda: encoders["clip_text"](captions),
           "clip_image": lambda: encoders["clip_image"](pixels)}  # fmt: skip
    clocks = {}
    with torch.no_grad():
        for role in roles:
            with Clock() as clocks[role]:
                run[role]()
    return clocks


def _encoder_gflops(encoders: dict[str, Any], pixels: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """GFLOP per sample of each encoder (matmul/conv FLOPs, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    for role in ENCODERS:
        with FlopCounterMode(display=False) as counter:
            _encoder_pass(encoders, pixels, captions, roles=(role,))
        out[role] = counter.get_total_flops() / len(captions) / 1e9
    return out


def stage_c_gflops(flavor: str, latent_side: int) -> float:
    """Stage C forward + backward GFLOP per sample at ``latent_side``², counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.flavors import get_flavor

    spec = get_flavor(flavor)
    model, c = spec.build(device="meta").train(), spec.config
    with torch.device("meta"):
        args = (torch.randn(2, c.c_in, latent_side, latent_side), torch.rand(2), torch.randn(2, 77, c.c_clip_text),
                torch.randn(2, 1, c.c_clip_text_pooled), torch.randn(2, 1, c.c_clip_img))  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        model(*args).float().pow(2).mean().backward()
    return counter.get_total_flops() / 2 / 1e9


def measure(size: str, cache: str, samples: list, settings: Settings, queue: Any) -> None:
    """Everything in-process for one set (run in a fresh spawned process); puts the result on ``queue``."""
    from jobs.train import check_train, read_spec
    from jobs.train_loop import TrainLoop, World
    from pipelines.core.images import decode_rgb, to_float_chw
    from pipelines.core.preprocess import PreprocessConfig, crop_for_encoding
    from pipelines.train_data.batches import window_micro_batches
    from stages.flavors import build_model
    from stages.objective import CLIP_IMG_PROBABILITY

    register_narrow()
    torch.set_num_threads(settings.threads)
    flavors, b = SIZES[size], settings.batch
    warmup, steps = settings.warmup[size], settings.steps[size]
    preprocess = PreprocessConfig(mode="center", image_size_px=settings.image_size_px)
    with Clock() as decode:
        crops = [crop_for_encoding(torch.from_numpy(to_float_chw(decode_rgb(img, max_pixels=10**8))),
                                   preprocess).pixels for _, img, _ in samples]  # fmt: skip
    captions = [caption for _, _, caption in samples]
    batches = [(torch.stack(crops[i : i + b]), captions[i : i + b]) for i in range(0, len(crops) - b + 1, b)]

    # 1. encoder memory: nothing else heavy exists yet in this process
    _reset_peak_rss()
    baseline = _status_mib("VmRSS")
    encoders = {role: build_model(flavors[role])[0] for role in ENCODERS}
    weights_mib = sum(p.numel() * p.element_size() for m in encoders.values() for p in m.parameters()) / 2**20
    _encoder_pass(encoders, *batches[0])  # also the warm-up of every encoder
    encoder_peak = _status_mib("VmHWM") - baseline
    # 2. encoder cost per sample (full batch each, after the warm-up; best of 3 passes)
    passes = [_encoder_pass(encoders, *batches[0]) for _ in range(3)]
    share = {"effnet": 1.0, "clip_text": 1.0, "clip_image": CLIP_IMG_PROBABILITY}
    gflops = _encoder_gflops(encoders, *batches[0])
    per_sample = {role: {"s": min(p[role].wall for p in passes) / b,
                         "cpu_s": min(p[role].cpu for p in passes) / b, "gflop": gflops[role]}
                  for role in ENCODERS}  # fmt: skip

    # 3. step times on one TrainLoop, the two paths interleaved
    with tempfile.TemporaryDirectory() as tmp:
        config = train_config(Path(cache), Path(tmp), flavors["stage_c"], settings, warmup + steps)
        plan = check_train(config)
        spec = read_spec(config, plan)
        with Clock() as read:
            cached = [mb for window in plan.windows for mb in window_micro_batches(window, spec)]
        loop = TrainLoop(config, World(), plan.cache.empty_caption, plan.columns)
    rng = np.random.default_rng(config.seed)
    timed: dict[str, list[dict[str, float]]] = {"cached": [], "on_the_fly": []}
    for i in range(warmup + steps):
        pixels, caps = batches[i % len(batches)]
        c_step, f_step = cached_step(loop, cached[i]), on_the_fly_step(loop, encoders, pixels, caps, rng)
        if i >= warmup:
            timed["cached"].append(c_step)
            timed["on_the_fly"].append(f_step)
    read_s, read_cpu_s = read.wall / len(cached), read.cpu / len(cached)
    stat = {path: {f"{key}_{name}": fn(r[key] for r in rows) for key in ("step_s", "step_cpu_s")
                   for name, fn in (("min", min), ("median", statistics.median))}
            for path, rows in timed.items()}  # fmt: skip
    pairs = list(zip(timed["cached"], timed["on_the_fly"], strict=True))
    speedup = statistics.median(f["step_s"] / (c["step_s"] + read_s) for c, f in pairs)
    cached_s, fly_s = stat["cached"]["step_s_median"], stat["on_the_fly"]["step_s_median"]
    fly, n = timed["on_the_fly"], steps * b
    queue.put({
        "flavors": flavors, "stage_c_params": sum(p.numel() for p in loop.module.parameters()),
        "cached_step_s": cached_s, "cache_read_s_per_step": read_s, "cached_step_with_read_s": cached_s + read_s,
        "on_the_fly_step_s": fly_s, "speedup_on_the_fly_over_cached": speedup,
        "ratio_cached_over_on_the_fly": 1 / speedup,
        "speedup_vs_cached_in_memory": statistics.median(f["step_s"] / c["step_s"] for c, f in pairs),
        "speedup_of_fastest_steps": stat["on_the_fly"]["step_s_min"] / (stat["cached"]["step_s_min"] + read_s),
        "speedup_cpu_s": statistics.median(f["step_cpu_s"] / (c["step_cpu_s"] + read_cpu_s) for c, f in pairs),
        "step_statistics": stat,
        "on_the_fly_encoder_s_per_step_min": min(f["encoder_s"] for f in fly),
        "on_the_fly_encoder_s_per_sample_measured": sum(f["encoder_s"] for f in fly) / n,
        "on_the_fly_encoder_cpu_s_per_sample_measured": sum(f["encoder_cpu_s"] for f in fly) / n,
        "on_the_fly_clip_image_fraction": sum(f["clip_images"] for f in fly) / n,
        "encoder_s_per_sample": sum(share[r] * v["s"] for r, v in per_sample.items()),
        "encoder_cpu_s_per_sample": sum(share[r] * v["cpu_s"] for r, v in per_sample.items()),
        "encoder_gflop_per_sample": sum(share[r] * v["gflop"] for r, v in per_sample.items()),
        "encoder_per_sample_by_model": per_sample, "encoder_share_of_samples": share,
        "decode_crop_s_per_sample": decode.wall / len(samples),
        "encoder_peak_mib": encoder_peak, "encoder_weights_mib": weights_mib,
        "step_times": {path: [r["step_s"] for r in rows] for path, rows in timed.items()},
        "steps_per_window": len(cached) / len(plan.windows),
    })  # fmt: skip


def in_fresh_process(size: str, cache: Path, samples: list, settings: Settings) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(size, str(cache), samples, settings, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# --- Ray Train ----------------------------------------------------------------------------------------------
def ray_train(cache: Path, out: Path, stage_c: str, settings: Settings, steps: int) -> dict[str, Any]:
    """A real ``run_train`` on the cache (Ray must be up); data wait and samples/s from its metrics rows."""
    from jobs.train import run_train

    config = train_config(cache, out, stage_c, settings, steps, log_every=max(1, steps // 6))
    start = time.perf_counter()
    summary = run_train(config)
    wall = time.perf_counter() - start
    with open(summary.metrics_csv) as f:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    steady = rows[1:]
    return {
        "data_wait_fraction": statistics.mean(r["data_wait_fraction"] for r in steady),
        "data_wait_fraction_max": max(r["data_wait_fraction"] for r in steady),
        "samples_per_s": statistics.mean(r["samples_per_s"] for r in steady),
        "goal": "data_wait_fraction <= 0.05", "steps": steps, "log_every": config.log_every,
        "num_workers": 1, "cpus_per_worker": config.scaling.cpus_per_worker, "read_cpus": config.data.read_cpus,
        "prefetch_batches": config.data.prefetch_batches, "wall_s": wall, "rows": rows,
    }  # fmt: skip


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| set | Stage C | cached step s | on-the-fly step s | speed-up (CPU s) | encoder s/sample (CPU s) "
        "| encoder peak MiB | Ray data wait | Ray samples/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for size, r in results.items():
        ray = r["ray_train"]
        lines.append(
            f"| {size} | {r['flavors']['stage_c']} | {r['cached_step_with_read_s']:.3f} | "
            f"{r['on_the_fly_step_s']:.3f} | {r['speedup_on_the_fly_over_cached']:.2f}× ({r['speedup_cpu_s']:.2f}×) | "
            f"{r['encoder_s_per_sample']:.3f} ({r['encoder_cpu_s_per_sample']:.3f}) | "
            f"{r['encoder_peak_mib']:.0f} | {ray['data_wait_fraction']:.1%} | {ray['samples_per_s']:.2f} |"
        )
    return "\n".join(lines)


def projection(results: dict[str, dict[str, Any]], latent_side: int) -> dict[str, Any]:
    """Speed-up of caching by FLOPs (equal FLOP/s assumed) for each measured and each released Stage C.

    The released encoders' GFLOP/sample come from the ``narrow`` set (the released-size encoders).
    """
    out: dict[str, Any] = {}
    for size, r in results.items():
        stage_c = stage_c_gflops(r["flavors"]["stage_c"], latent_side)
        r["stage_c_gflop_per_sample_fwd_bwd"] = stage_c
        out[r["flavors"]["stage_c"]] = {"stage_c_gflop_per_sample_fwd_bwd": stage_c,
                                        "encoder_gflop_per_sample": r["encoder_gflop_per_sample"],
                                        "speedup": 1 + r["encoder_gflop_per_sample"] / stage_c}  # fmt: skip
        if size == "narrow":
            for flavor in ("stage_c/1b", "stage_c/3.6b"):
                gflops = stage_c_gflops(flavor, latent_side)
                out[flavor] = {"stage_c_gflop_per_sample_fwd_bwd": gflops,
                               "encoder_gflop_per_sample": r["encoder_gflop_per_sample"],
                               "speedup": 1 + r["encoder_gflop_per_sample"] / gflops}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "narrow"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=768, help="center-crop side (official: 768)")
    per_set = {"nargs": 2, "metavar": ("TINY", "NARROW")}
    parser.add_argument("--warmup", type=int, default=[10, 2], help="untimed steps per set", **per_set)
    parser.add_argument("--steps", type=int, default=[20, 8], help="timed steps per set", **per_set)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of both paths")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of the Stage C forward")
    parser.add_argument("--ray-steps", type=int, default=[60, 10], help="Ray Train steps per set", **per_set)
    parser.add_argument("--quick", action="store_true", help="4 photos at 384 px, fewer steps")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "train.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.warmup, args.steps, args.ray_steps = (
            4,
            384,
            [4, 2],
            [8, 3],
            [24, 6],
        )
    by_set = lambda values: dict(zip(("tiny", "narrow"), values, strict=True))  # noqa: E731
    settings = Settings(args.images, args.batch, args.image_size, by_set(args.warmup), by_set(args.steps),
                        args.threads, args.bf16, by_set(args.ray_steps))  # fmt: skip
    register_narrow()
    load_start = os.getloadavg()
    samples = photos.samples(args.images)
    results: dict[str, dict[str, Any]] = {}
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with local_ray():
            caches = {size: build_cache(root / size, SIZES[size], samples, args.image_size, args.batch)
                      for size in args.sizes}  # fmt: skip
        for size in args.sizes:
            results[size] = in_fresh_process(size, caches[size], samples, settings)
            shown = ("cached_step_with_read_s", "on_the_fly_step_s", "speedup_on_the_fly_over_cached")
            print(f"{size}: {json.dumps({k: results[size][k] for k in shown})}", flush=True)
        with local_ray(runtime_env={"worker_process_setup_hook": register_narrow}):
            for size in args.sizes:
                results[size]["ray_train"] = ray_train(caches[size], root / size / "runs", SIZES[size]["stage_c"],
                                                       settings, settings.ray_steps[size])  # fmt: skip
    flops = projection(results, args.image_size // 32)
    report = {
        "benchmark": "train", "command": " ".join(["python", *sys.argv]), "settings": dataclasses.asdict(settings),
        "bf16_autocast": args.bf16, "cpu_count": os.cpu_count(), "cpu": platform.processor() or "cpu",
        "torch": torch.__version__, "ray": ray.__version__, "torch_threads": args.threads,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "results": results,
        "flop_projection": flops,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print()
    print("| Stage C | Stage C GFLOP/sample (fwd+bwd) | encoder GFLOP/sample | speed-up at equal FLOP/s |")
    print("|---|---|---|---|")
    for flavor, p in flops.items():
        print(
            f"| {flavor} | {p['stage_c_gflop_per_sample_fwd_bwd']:.0f} | {p['encoder_gflop_per_sample']:.1f} | "
            f"{p['speedup']:.3f}× |"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
