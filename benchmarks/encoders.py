"""Per-image cost of the encoders the cache replaces: forward time, peak memory, FLOPs and achieved FLOP/s.

These numbers are the physical limit the encode pipeline is later measured against.

    python benchmarks/encoders.py --out benchmarks/results/encoders.json [--sizes released tiny] [--device cuda]

Each measurement runs in its own subprocess so that peak memory (CPU: max RSS above the baseline after the
model is built; CUDA: ``max_memory_allocated``) belongs to one encoder only. FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode`` (matmul/conv FLOPs, 2 per multiply-add).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
from pathlib import Path

import torch
from steady import median_seconds  # benchmarks/steady.py

ENCODERS = {
    # name: (flavor by size, input description)
    "effnet": ({"released": "effnet", "tiny": "effnet/tiny"}, "image 768x768"),
    "clip_vision": ({"released": "clip_vision/l14", "tiny": "clip_vision/tiny"}, "image 224x224"),
    "clip_text": ({"released": "clip_text/bigg", "tiny": "clip_text/tiny"}, "77 tokens"),
    "stage_a_encode": ({"released": "stage_a", "tiny": "stage_a/tiny"}, "image 1024x1024"),
}


def _inputs_and_fn(encoder: str, model, batch: int, device: str):
    gen = torch.Generator().manual_seed(0)
    if encoder == "effnet":
        x = torch.rand(batch, 3, 768, 768, generator=gen).to(device)
        return lambda: model.encode(x)
    if encoder == "clip_vision":
        x = torch.rand(batch, 3, 224, 224, generator=gen).to(device)
        pixels = model.preprocess(x)
        return lambda: model.encode(pixels)
    if encoder == "clip_text":
        tokens = model.tokenize(["a photograph of an astronaut riding a horse on the moon"] * batch)
        return lambda: model.encode(tokens["input_ids"], tokens["attention_mask"])
    x = torch.rand(batch, 3, 1024, 1024, generator=gen).to(device)
    return lambda: model.encode(x)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(encoder: str, flavor: str, batch: int, reps: int, device: str, bf16: bool, queue) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    from stages.flavors import build_model

    torch.set_num_threads(torch.get_num_threads())
    model, _ = build_model(flavor, device=device)
    fn = _inputs_and_fn(encoder, model, batch, device)
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad(), autocast:
        baseline = _rss_mib()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        with FlopCounterMode(display=False) as counter:
            fn()
        seconds = median_seconds(lambda: (fn(), sync()), reps) / batch  # after one more warm-up call
    flops = counter.get_total_flops() / batch
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mib() - baseline
    queue.put(
        {
            "encoder": encoder,
            "flavor": flavor,
            "batch": batch,
            "params": sum(p.numel() for p in model.parameters()),
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
            "seconds_per_image": seconds,
            "images_per_second": 1 / seconds,
            "gflops_per_image": flops / 1e9,
            "achieved_gflops_per_second": flops / seconds / 1e9,
            "peak_memory_mib": peak,
            "peak_memory_kind": "cuda max_memory_allocated"
            if device.startswith("cuda")
            else "max RSS above baseline",
        }
    )


def run(sizes: list[str], batch: int, reps: int, device: str, bf16: bool) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = []
    for size in sizes:
        for encoder, (flavors, what) in ENCODERS.items():
            queue = ctx.Queue()
            proc = ctx.Process(
                target=_measure, args=(encoder, flavors[size], batch, reps, device, bf16, queue)
            )
            proc.start()
            row = queue.get()
            proc.join()
            row |= {"size": size, "input": what}
            results.append(row)
            print(
                f"{row['flavor']:<18} {what:<16} {row['seconds_per_image'] * 1e3:9.1f} ms/img "
                f"{row['gflops_per_image']:9.2f} GFLOP {row['achieved_gflops_per_second']:8.1f} GFLOP/s "
                f"{row['peak_memory_mib']:8.0f} MiB",
                flush=True,
            )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/encoders.json")
    parser.add_argument("--sizes", nargs="+", default=["released", "tiny"], choices=["released", "tiny"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = parser.parse_args()
    results = run(args.sizes, args.batch, args.reps, args.device, args.bf16)
    report = {
        "benchmark": "encoders",
        "device": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "bf16_autocast": args.bf16,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
