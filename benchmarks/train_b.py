"""Stage B training step on the latent cache against the same step in memory and the official on-the-fly step.

    python benchmarks/train_b.py --out benchmarks/results/train_b.json [--sizes tiny narrow] [--quick]

Per ``--sizes`` set (a Stage B flavor and the encoders that feed it):

* ``tiny``: ``stage_b/tiny`` fed by ``stage_a/tiny``, ``effnet/tiny`` and ``clip_text/tiny``;
* ``narrow``: ``stage_b/700m-narrow``, the block structure of ``stage_b/700m`` (blocks, repeats, attention
  levels) at widths (64, 128, 256, 256), 4 heads, ``c_cond`` 256, with the released conditioning sizes
  (``c_clip`` 1280, ``c_effnet`` 16, ``c_in`` 4), fed by the released-size ``stage_a``, ``effnet`` and
  ``clip_text/bigg``. The flavor is registered by this script only (``register_narrow``; Ray only encodes
  here, with released encoder flavors, so no Ray worker needs it).

All weights are seeded random (step time does not depend on their values). Real photos (scikit-image) are
ingested and encoded into a cache with ``run_encode`` on a local Ray: Stage A latents of the S×S center crop
(``--stage-a-size``, per set; the official size is 1024) and Stage B's effnet conditioning at every size
training can draw (``stage_b_conditioning: exact``, ``stage_b_effnet_{s}`` for s = S/64 … S/32 − 1). Then one
fresh process per set, with ``--threads`` torch threads for everything, measures:

1. encoder peak memory: peak RSS (``VmHWM``, reset first) above the RSS before building the three encoders
   and running each on the full batch, before Stage B exists; their weight bytes beside it;
2. encoder cost per sample (what caching removes from the training node): each encoder on the full batch
   (best of 3 passes; effnet on the crops NEAREST-resized to the size s* whose s² is nearest the mean s² of
   the drawn sizes, scaled by the FLOP ratio to that mean), combined at the official fractions (Stage A
   encode and CLIP-bigG text on every sample, effnet on 90%); also their GFLOP per sample;
3. step times on one ``TrainLoop`` (mode ``stage_b``: same model, AdamW, gradient clipping, loss), the three
   paths interleaved step by step after ``--warmup`` steps of each, so that load from other jobs on the
   machine hits all alike (the order of the two cached paths alternates):
   - on cache: the step's micro-batch read from the cache by ``window_micro_batches`` (lazily, one window
     of files at a time, as the Ray Train reader does; the read time is timed per step) and then
     ``loop.micro_loss`` + backward + AdamW step on it;
   - in memory: the same step on the same micro-batch dicts read beforehand;
   - on the fly (official ``train_b``): under no_grad, Stage A ``encode`` of the S×S crops (the target),
     f ~ U(0.5, 1) once per batch, effnet on the crops NEAREST-resized to (⌊S·f/32⌋·32)² for the samples
     drawn with probability 90% (zeros for the rest), CLIP-bigG text on the full batch with 5% of captions
     replaced by ""; then ``diffusion_loss`` with pyramid noise + backward + AdamW step.
   Step seconds are medians over the ``--steps`` timed steps; each ratio is the median of per-step ratios
   (a burst of other jobs hits both sides of a ratio). The cache read per step is the mean over the timed
   steps (a window's files are read at its first micro-batch), added to each on-cache step; the ratio of
   the summed times is kept too.

bf16 autocast of the Stage B forward is off unless ``--bf16`` (the same for every path).

The narrow Stage B does ~19× fewer FLOPs per sample than ``stage_b/700m`` at the same crop size, so its measured
speed-up overstates the released models'. ``flop_projection`` gives, at equal FLOP/s,
1 + encoder GFLOP / Stage B GFLOP per sample (Stage B forward + backward, Stage A encode and effnet counted on
the meta device, CLIP-bigG text counted on the real pass) for the measured flavors at their crop size and
for ``stage_b/700m`` and ``stage_b/1.5b`` at the official 1024 px (and at the narrow set's crop size).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # the repo, and this folder (``import train`` when imported)

import numpy as np  # noqa: E402
import photos  # noqa: E402  (benchmarks/photos.py)
import torch  # noqa: E402
import train  # noqa: E402  (benchmarks/train.py: Clock, cached_step, the optimizer step, RSS helpers)
from local_ray import local_ray  # noqa: E402  (benchmarks/local_ray.py)

NARROW = "stage_b/700m-narrow"
SIZES: dict[str, dict[str, str]] = {
    "tiny": {"stage_b": "stage_b/tiny", "stage_a": "stage_a/tiny", "effnet": "effnet/tiny",
             "clip_text": "clip_text/tiny"},
    "narrow": {"stage_b": NARROW, "stage_a": "stage_a", "effnet": "effnet", "clip_text": "clip_text/bigg"},
}  # fmt: skip
ENCODERS = ("stage_a", "effnet", "clip_text")
CLIP_IMAGE = "clip_vision/tiny"  # encode always writes clip_img; Stage B never reads it
RELEASED = ("stage_b/700m", "stage_b/1.5b")
OFFICIAL_PX = 1024
CELL_PX = 32  # one effnet latent cell


def register_narrow() -> None:
    """Add ``stage_b/700m-narrow`` to the flavor registry of this process."""
    from stages import stage_b
    from stages.flavors import FLAVORS, Flavor

    config = dataclasses.replace(stage_b.FLAVORS["stage_b/700m"], c_cond=256, c_hidden=(64, 128, 256, 256),
                                 nhead=(-1, 2, 4, 4))  # fmt: skip
    FLAVORS.setdefault(NARROW, Flavor(NARROW, "stage_b", config, stage_b.StageB, ()))


@dataclasses.dataclass(frozen=True)
class Settings:
    images: int
    batch: int
    stage_a_size_px: dict[str, int]
    warmup: dict[str, int]
    steps: dict[str, int]
    threads: int
    bf16_autocast: bool


# --- the cache ----------------------------------------------------------------------------------------------
def build_cache(root: Path, flavors: dict[str, str], samples: list, side_px: int, batch: int) -> Path:
    """Ingest the photos and encode Stage A latents + Stage B conditioning (Ray must be up); the cache."""
    from pipelines.encode.models import EncoderConfig

    return train.build_cache(root, flavors, samples, side_px, batch, ENCODERS, stage_a_size_px=side_px,
                             clip_image=EncoderConfig(flavor=CLIP_IMAGE, batch_size=batch))  # fmt: skip


def train_config(cache: Path, out: Path, stage_b: str, settings: Settings, max_steps: int) -> Any:
    from jobs.train_config import ScalingSpec, TrainConfig
    from pipelines.train_data.batches import TrainDataConfig

    return TrainConfig(
        data=TrainDataConfig(path=str(cache)), output_dir=str(out), mode="stage_b", flavor=stage_b,
        allow_random_weights=True,
        batch_size=settings.batch, max_steps=max_steps, log_every=1, save_every=max_steps,
        bf16_autocast=settings.bf16_autocast, scaling=ScalingSpec(num_workers=1, cpus_per_worker=1.0),
    )  # fmt: skip


# --- FLOPs --------------------------------------------------------------------------------------------------
def _meta_gflops(flavor: str, run: Any, backward: bool = False) -> float:
    """GFLOP of ``run(model)`` with ``flavor`` built on the meta device (matmul/conv, 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    from stages.flavors import get_flavor

    model = get_flavor(flavor).build(device="meta")
    model = model.train() if backward else model.eval()
    with FlopCounterMode(display=False) as counter:
        if backward:
            run(model).float().pow(2).mean().backward()
        else:
            with torch.no_grad():
                run(model)
    return counter.get_total_flops() / 1e9


def stage_b_gflops(flavor: str, side_px: int) -> float:
    """Stage B forward + backward GFLOP per sample on an ``side_px``² crop (latent side/4), meta device."""
    from stages.flavors import get_flavor

    c, n = get_flavor(flavor).config, side_px // CELL_PX
    with torch.device("meta"):
        args = (torch.randn(2, c.c_in, side_px // 4, side_px // 4), torch.rand(2),
                torch.randn(2, c.c_effnet, 3 * n // 4, 3 * n // 4), torch.randn(2, 1, c.c_clip))  # fmt: skip
    return _meta_gflops(flavor, lambda model: model(*args), backward=True) / 2


def image_encoder_gflops(flavors: dict[str, str], side_px: int) -> dict[str, Any]:
    """Stage A encode of the ``side_px``² crop and effnet at each drawn size, GFLOP per sample (meta)."""
    from pipelines.encode.stage_b import cell_range

    meta = lambda h: torch.empty(1, 3, h, h, device="meta")  # noqa: E731
    by_cells = {s: _meta_gflops(flavors["effnet"], lambda m, s=s: m.encode(meta(s * CELL_PX)))
                for s in cell_range(side_px // CELL_PX)}  # fmt: skip
    return {"stage_a": _meta_gflops(flavors["stage_a"], lambda m: m.encode(meta(side_px))),
            "effnet_mean_over_drawn_sizes": statistics.mean(by_cells.values()), "effnet_by_cells": by_cells}  # fmt: skip


def combine(gflop: dict[str, float]) -> float:
    """Encoder GFLOP per sample at the official fractions (Stage A and text on all, effnet on 90%)."""
    from stages.objective import STAGE_B_EFFNET_PROBABILITY

    return gflop["stage_a"] + STAGE_B_EFFNET_PROBABILITY * gflop["effnet"] + gflop["clip_text"]


# --- in-process measurements (one fresh process per set) ----------------------------------------------------
def _encoder_pass(encoders: dict[str, Any], pixels: torch.Tensor, captions: list[str], cells: int) -> dict:
    """Each encoder on the full batch (effnet on the crops resized to ``cells``); the clock of each."""
    from pipelines.encode.stage_b import resize_nearest

    small = resize_nearest(pixels, cells)
    run = {"stage_a": lambda: encoders["stage_a"].encode(pixels), "effnet": lambda: encoders["effnet"].encode(small),
           "clip_text": lambda: encoders["clip_text"](captions)}  # fmt: skip
    clocks = {}
    with torch.no_grad():
        for role in ENCODERS:
            with train.Clock() as clocks[role]:
                run[role]()
    return clocks


def on_the_fly_step(
    loop: Any, encoders: dict[str, Any], pixels: torch.Tensor, captions: list[str], rng: np.random.Generator
) -> dict[str, float]:
    """The official train_b step: encoders under no_grad with the official draws, then the same update."""
    from pipelines.encode.stage_b import resize_nearest
    from stages.objective import CAPTION_DROPOUT, STAGE_B_EFFNET_PROBABILITY, diffusion_loss, stage_b_noise

    b, side = len(captions), pixels.shape[-1]
    drop = rng.random(b) < CAPTION_DROPOUT
    cells = int(side * rng.uniform(0.5, 1.0) // CELL_PX)  # train_b: (⌊H·f/32⌋·32)² px, one f per batch
    use = torch.from_numpy(rng.random(b) <= STAGE_B_EFFNET_PROBABILITY)
    with train.Clock() as step:
        with train.Clock() as enc, torch.no_grad():
            latents = encoders["stage_a"].encode(pixels)
            effnet = torch.zeros(b, encoders["effnet"].config.c_latent, cells, cells)
            if bool(use.any()):
                effnet[use] = encoders["effnet"].encode(resize_nearest(pixels, cells)[use])
            pooled = encoders["clip_text"](
                ["" if d else c for c, d in zip(captions, drop, strict=True)]
            ).clip_text_pooled
        conditions = {"effnet": effnet, "clip": pooled.reshape(b, 1, -1)}
        out = diffusion_loss(loop.model, loop.gdf, latents, conditions, epsilon=stage_b_noise(latents),
                             autocast_dtype=loop.autocast)  # fmt: skip
        train._optimizer_step(loop, out.loss)
    return {"step_s": step.wall, "step_cpu_s": step.cpu, "encoder_s": enc.wall, "encoder_cpu_s": enc.cpu,
            "effnet_images": int(use.sum()), "effnet_cells": cells}  # fmt: skip


def on_cache_step(loop: Any, reader: Any) -> dict[str, float]:
    """The next micro-batch from the cache reader (timed), then the cached step on it."""
    with train.Clock() as read:
        batch = next(reader)
    return train.cached_step(loop, batch) | {"read_s": read.wall, "read_cpu_s": read.cpu}


def _stats(rows: list[dict[str, float]], keys: tuple[str, ...]) -> dict[str, float]:
    return {f"{key}_{name}": fn(r[key] for r in rows) for key in keys
            for name, fn in (("min", min), ("median", statistics.median), ("mean", statistics.mean))}  # fmt: skip


def measure(size: str, cache: str, samples: list, settings: Settings, queue: Any) -> None:
    """Everything in-process for one set (run in a fresh spawned process); puts the result on ``queue``."""
    from torch.utils.flop_counter import FlopCounterMode

    from jobs.train import check_train, read_spec
    from jobs.train_loop import TrainLoop, World
    from pipelines.core.images import decode_rgb, to_float_chw
    from pipelines.core.preprocess import PreprocessConfig, crop_for_stage_a
    from pipelines.encode.stage_b import cell_range
    from pipelines.train_data.batches import window_micro_batches
    from stages.flavors import build_model
    from stages.objective import STAGE_B_EFFNET_PROBABILITY

    register_narrow()
    torch.set_num_threads(settings.threads)
    flavors, b, side = SIZES[size], settings.batch, settings.stage_a_size_px[size]
    warmup, steps = settings.warmup[size], settings.steps[size]
    preprocess = PreprocessConfig(mode="center", image_size_px=side, stage_a_size_px=side)
    with train.Clock() as decode:
        crops = [crop_for_stage_a(torch.from_numpy(to_float_chw(decode_rgb(img, max_pixels=10**8))),
                                  preprocess).pixels for _, img, _ in samples]  # fmt: skip
    captions = [caption for _, _, caption in samples]
    batches = [(torch.stack(crops[i : i + b]), captions[i : i + b]) for i in range(0, len(crops) - b + 1, b)]

    # FLOPs: Stage A and effnet at every drawn size on the meta device; the text encoder on a real pass
    image_gflop = image_encoder_gflops(flavors, side)
    drawn = cell_range(side // CELL_PX)
    mean_sq = statistics.mean(s * s for s in drawn)
    s_star = min(drawn, key=lambda s: (abs(s * s - mean_sq), s))

    # 1. encoder memory: nothing else heavy exists yet in this process
    train._reset_peak_rss()
    baseline = train._status_mib("VmRSS")
    encoders = {role: build_model(flavors[role])[0] for role in ENCODERS}
    weights_mib = sum(p.numel() * p.element_size() for m in encoders.values() for p in m.parameters()) / 2**20
    _encoder_pass(encoders, *batches[0], s_star)  # also the warm-up of every encoder
    encoder_peak = train._status_mib("VmHWM") - baseline
    # 2. encoder cost per sample (full batch each, after the warm-up; best of 3 passes)
    passes = [_encoder_pass(encoders, *batches[0], s_star) for _ in range(3)]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        encoders["clip_text"](batches[0][1])
    gflop = {"stage_a": image_gflop["stage_a"], "effnet": image_gflop["effnet_mean_over_drawn_sizes"],
             "clip_text": counter.get_total_flops() / b / 1e9}  # fmt: skip
    # effnet timed at s*, scaled to the mean over the drawn sizes by FLOPs
    scale = {"effnet": image_gflop["effnet_mean_over_drawn_sizes"] / image_gflop["effnet_by_cells"][s_star]}
    share = {"stage_a": 1.0, "effnet": STAGE_B_EFFNET_PROBABILITY, "clip_text": 1.0}
    per_sample = {role: {"s": min(p[role].wall for p in passes) / b * scale.get(role, 1.0),
                         "cpu_s": min(p[role].cpu for p in passes) / b * scale.get(role, 1.0),
                         "gflop": gflop[role]} for role in ENCODERS}  # fmt: skip

    # 3. step times on one TrainLoop, the three paths interleaved
    with tempfile.TemporaryDirectory() as tmp:
        config = train_config(Path(cache), Path(tmp), flavors["stage_b"], settings, warmup + steps)
        plan = check_train(config)
        spec = read_spec(config, plan)
        with train.Clock() as preload:
            in_memory = [mb for window in plan.windows for mb in window_micro_batches(window, spec)]
        reader = itertools.chain.from_iterable(window_micro_batches(w, spec) for w in plan.windows)
        loop = TrainLoop(config, World(), plan.cache.empty_caption, plan.columns)
        rng = np.random.default_rng(config.seed)
        paths = ("on_cache", "in_memory", "on_the_fly")
        timed: dict[str, list[dict[str, float]]] = {path: [] for path in paths}
        for i in range(warmup + steps):
            pixels, caps = batches[i % len(batches)]
            if i % 2 == 0:
                c_step, m_step = on_cache_step(loop, reader), train.cached_step(loop, in_memory[i])
            else:
                m_step, c_step = train.cached_step(loop, in_memory[i]), on_cache_step(loop, reader)
            f_step = on_the_fly_step(loop, encoders, pixels, caps, rng)
            if i >= warmup:
                for path, row in zip(paths, (c_step, m_step, f_step), strict=True):
                    timed[path].append(row)
    cache_rows, mem_rows, fly_rows = (timed[p] for p in paths)
    # a window's files are read at its first micro-batch: the read per step is the mean over the timed steps
    read_s = statistics.mean(r["read_s"] for r in cache_rows)
    read_cpu_s = statistics.mean(r["read_cpu_s"] for r in cache_rows)
    stat = {path: _stats(rows, ("step_s", "step_cpu_s")) for path, rows in timed.items()}
    on_cache = [c["step_s"] + read_s for c in cache_rows]
    on_cache_cpu = [c["step_cpu_s"] + read_cpu_s for c in cache_rows]
    ratio = statistics.median(c / m["step_s"] for c, m in zip(on_cache, mem_rows, strict=True))
    speedup = statistics.median(f["step_s"] / c for c, f in zip(on_cache, fly_rows, strict=True))
    n = steps * b
    queue.put({
        "flavors": flavors, "stage_a_size_px": side, "latent_shape": [4, side // 4, side // 4],
        "effnet_cells_drawn": list(drawn), "stage_b_params": sum(p.numel() for p in loop.module.parameters()),
        "columns": {k: list(v) for k, v in plan.columns.items()},
        "in_memory_step_s": stat["in_memory"]["step_s_median"],
        "on_cache_step_s_without_read": stat["on_cache"]["step_s_median"],
        "cache_read_s_per_step": read_s, "cache_read_cpu_s_per_step": read_cpu_s,
        "cache_read_s_per_step_preloaded": preload.wall / len(in_memory),
        "on_cache_step_with_read_s": statistics.median(on_cache),
        "ratio_on_cache_over_in_memory": ratio,
        "ratio_on_cache_over_in_memory_sums": (sum(on_cache)) / sum(m["step_s"] for m in mem_rows),
        "ratio_on_cache_over_in_memory_fastest": (stat["on_cache"]["step_s_min"] + read_s)
        / stat["in_memory"]["step_s_min"],
        "ratio_on_cache_over_in_memory_cpu_s": statistics.median(
            c / m["step_cpu_s"] for c, m in zip(on_cache_cpu, mem_rows, strict=True)),
        "on_the_fly_step_s": stat["on_the_fly"]["step_s_median"],
        "speedup_on_the_fly_over_on_cache": speedup, "ratio_on_cache_over_on_the_fly": 1 / speedup,
        "speedup_of_fastest_steps": stat["on_the_fly"]["step_s_min"] / (stat["on_cache"]["step_s_min"] + read_s),
        "speedup_cpu_s": statistics.median(f["step_cpu_s"] / c for c, f in zip(on_cache_cpu, fly_rows, strict=True)),
        "step_statistics": stat,
        "on_the_fly_encoder_s_per_step_median": statistics.median(f["encoder_s"] for f in fly_rows),
        "on_the_fly_encoder_s_per_sample_measured": sum(f["encoder_s"] for f in fly_rows) / n,
        "on_the_fly_encoder_cpu_s_per_sample_measured": sum(f["encoder_cpu_s"] for f in fly_rows) / n,
        "on_the_fly_effnet_fraction": sum(f["effnet_images"] for f in fly_rows) / n,
        "on_the_fly_effnet_cells": [f["effnet_cells"] for f in fly_rows],
        "encoder_s_per_sample": sum(share[r] * v["s"] for r, v in per_sample.items()),
        "encoder_cpu_s_per_sample": sum(share[r] * v["cpu_s"] for r, v in per_sample.items()),
        "encoder_gflop_per_sample": combine(gflop), "encoder_gflop_by_model": gflop,
        "encoder_per_sample_by_model": per_sample, "encoder_share_of_samples": share,
        "effnet_timed_at_cells": s_star, "effnet_gflop_by_cells": image_gflop["effnet_by_cells"],
        "decode_crop_s_per_sample": decode.wall / len(samples),
        "encoder_peak_mib": encoder_peak, "encoder_weights_mib": weights_mib,
        "step_times": {path: [r["step_s"] for r in rows] for path, rows in timed.items()},
        "read_times": [r["read_s"] for r in cache_rows],
        "steps_per_window": len(in_memory) / len(plan.windows),
    })  # fmt: skip


def in_fresh_process(size: str, cache: Path, samples: list, settings: Settings) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=measure, args=(size, str(cache), samples, settings, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


# --- report -------------------------------------------------------------------------------------------------
def projection(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Speed-up of caching by FLOPs (equal FLOP/s assumed): each measured set at its crop size, and the
    released Stage B flavors at 1024 px fed by the released encoders (CLIP-bigG text GFLOP from ``narrow``)."""
    out: dict[str, Any] = {}
    for r in results.values():
        stage_b = stage_b_gflops(r["flavors"]["stage_b"], r["stage_a_size_px"])
        r["stage_b_gflop_per_sample_fwd_bwd"] = stage_b
        out[r["flavors"]["stage_b"]] = {
            "side_px": r["stage_a_size_px"], "stage_b_gflop_per_sample_fwd_bwd": stage_b,
            "encoder_gflop_per_sample": r["encoder_gflop_per_sample"], "encoder_gflop_by_model": r["encoder_gflop_by_model"],
            "speedup": 1 + r["encoder_gflop_per_sample"] / stage_b,
        }  # fmt: skip
    if "narrow" in results:
        images = image_encoder_gflops(SIZES["narrow"], OFFICIAL_PX)
        gflop = {"stage_a": images["stage_a"], "effnet": images["effnet_mean_over_drawn_sizes"],
                 "clip_text": results["narrow"]["encoder_gflop_by_model"]["clip_text"]}  # fmt: skip
        side, narrow = results["narrow"]["stage_a_size_px"], results["narrow"]["encoder_gflop_per_sample"]
        for flavor in RELEASED:
            stage_b, at_side = stage_b_gflops(flavor, OFFICIAL_PX), stage_b_gflops(flavor, side)
            out[flavor] = {"side_px": OFFICIAL_PX, "stage_b_gflop_per_sample_fwd_bwd": stage_b,
                           "encoder_gflop_per_sample": combine(gflop), "encoder_gflop_by_model": gflop,
                           "speedup": 1 + combine(gflop) / stage_b,
                           f"at_{side}_px": {"stage_b_gflop_per_sample_fwd_bwd": at_side,
                                             "encoder_gflop_per_sample": narrow, "speedup": 1 + narrow / at_side}}  # fmt: skip
    return out


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| set | Stage B | crop px | in-memory step s | on-cache step s (read) | on cache / in memory "
        "| on-the-fly step s | on the fly / on cache (CPU s) | encoder s/sample (CPU s) | encoder peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, r in results.items():
        lines.append(
            f"| {size} | {r['flavors']['stage_b']} | {r['stage_a_size_px']} | {r['in_memory_step_s']:.3f} | "
            f"{r['on_cache_step_with_read_s']:.3f} ({r['cache_read_s_per_step']:.4f}) | "
            f"{r['ratio_on_cache_over_in_memory']:.3f} | {r['on_the_fly_step_s']:.3f} | "
            f"{r['speedup_on_the_fly_over_on_cache']:.2f}× ({r['speedup_cpu_s']:.2f}×) | "
            f"{r['encoder_s_per_sample']:.3f} ({r['encoder_cpu_s_per_sample']:.3f}) | {r['encoder_peak_mib']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["tiny", "narrow"])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2)
    per_set = {"nargs": 2, "metavar": ("TINY", "NARROW")}
    parser.add_argument("--stage-a-size", type=int, default=[256, 512], help="Stage A crop side per set "
                        f"(official: {OFFICIAL_PX}); a multiple of 64", **per_set)  # fmt: skip
    parser.add_argument("--warmup", type=int, default=[8, 2], help="untimed steps per set", **per_set)
    parser.add_argument("--steps", type=int, default=[64, 8], help="timed steps per set", **per_set)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every path")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast of the Stage B forward")
    parser.add_argument("--quick", action="store_true", help="4 photos, 128/256 px crops, fewer steps")
    parser.add_argument("--out", default=str(HERE / "results" / "train_b.json"))
    args = parser.parse_args()
    if args.quick:
        args.images, args.stage_a_size, args.warmup, args.steps = 4, [128, 256], [4, 1], [24, 5]
    if any(s % 64 for s in args.stage_a_size):
        parser.error("--stage-a-size: multiples of 64 (at least 2 effnet cells at f = 0.5)")
    by_set = lambda values: dict(zip(("tiny", "narrow"), values, strict=True))  # noqa: E731
    settings = Settings(args.images, args.batch, by_set(args.stage_a_size), by_set(args.warmup),
                        by_set(args.steps), args.threads, args.bf16)  # fmt: skip
    register_narrow()
    start, load_start = time.perf_counter(), os.getloadavg()
    samples = photos.samples(args.images)
    results: dict[str, dict[str, Any]] = {}
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        with train.Clock() as encode, local_ray():
            caches = {size: build_cache(root / size, SIZES[size], samples, settings.stage_a_size_px[size],
                                        args.batch) for size in args.sizes}  # fmt: skip
        for size in args.sizes:
            results[size] = in_fresh_process(size, caches[size], samples, settings)
            shown = ("in_memory_step_s", "on_cache_step_with_read_s", "ratio_on_cache_over_in_memory",
                     "on_the_fly_step_s", "speedup_on_the_fly_over_on_cache")  # fmt: skip
            print(f"{size}: {json.dumps({k: results[size][k] for k in shown})}", flush=True)
    flops = projection(results)
    report = {
        "benchmark": "train_b", "command": " ".join(["python", *sys.argv]), "settings": dataclasses.asdict(settings),
        "official_stage_a_size_px": OFFICIAL_PX, "bf16_autocast": args.bf16, "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or "cpu", "torch": torch.__version__, "ray": ray.__version__,
        "torch_threads": args.threads, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "encode_cache_s": encode.wall, "total_s": time.perf_counter() - start, "results": results,
        "flop_projection": flops,
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(table(results))
    print()
    print(
        "| Stage B | crop px | Stage B GFLOP/sample (fwd+bwd) | encoder GFLOP/sample | speed-up at equal FLOP/s |"
    )
    print("|---|---|---|---|---|")
    rows = [(flavor, p["side_px"], p) for flavor, p in flops.items()]
    rows += [
        (flavor, int(key[3:-3]), v)
        for flavor, p in flops.items()
        for key, v in p.items()
        if key.startswith("at_")
    ]
    for flavor, side, p in rows:
        print(
            f"| {flavor} | {side} | {p['stage_b_gflop_per_sample_fwd_bwd']:.1f} | "
            f"{p['encoder_gflop_per_sample']:.1f} | {p['speedup']:.3f}× |"
        )
    print(f"wrote {out} in {report['total_s']:.0f} s")


if __name__ == "__main__":
    main()
