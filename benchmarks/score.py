"""Score-pipeline throughput against the bare scorer forward at the same batch size.

    python benchmarks/score.py --flavor clip_score/l14 --images 48 --out benchmarks/results/score.json

The pipeline (read shard → decode → CLIP pass → write Parquet) runs once on a local Ray with one scoring actor
of ``--actor-cpus`` CPUs (Ray pins its torch threads to that), over one input shard per batch; its steady
images/s comes from the times its parts were written (``steady.py``: start-up and pipeline fill excluded).
The bare forward runs ``ClipScorer.score`` on one batch of already-decoded images with the same thread count
(median of ``--reps``). Released-size weights are random (throughput does not depend on their values); they
are written to a temporary folder so the job config is the real one.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import photos  # benchmarks/photos.py (scripts run from this folder)
import torch
from local_ray import local_ray  # benchmarks/local_ray.py
from steady import median_seconds, steady_rate  # benchmarks/steady.py


def _weights(flavor: str, root: Path) -> tuple[str | None, str | None]:
    if flavor.endswith("/tiny"):
        return None, None
    from stages.scorers import FLAVORS, ClipScorer
    from stages.weights import save_weights

    scorer = ClipScorer(FLAVORS[flavor])
    save_weights(scorer.clip.state_dict(), root / "clip.safetensors")
    save_weights(scorer.aesthetic.state_dict(), root / "aesthetic.safetensors")
    return str(root / "clip.safetensors"), str(root / "aesthetic.safetensors")


def bare_forward(
    flavor: str, samples, batch: int, threads: int, reps: int, clip: str | None, head: str | None
) -> float:
    """Images/s of ClipScorer.score on one batch of decoded images (median of ``reps``; the physical limit)."""
    from pipelines.core.images import decode_rgb, to_float_chw
    from stages.scorers import FLAVORS, ClipScorer

    torch.set_num_threads(threads)
    config = FLAVORS[flavor]
    scorer = (
        ClipScorer(config)
        if clip is None
        else ClipScorer.load(config, clip_weights=clip, aesthetic_weights=head)
    )
    images = [
        torch.from_numpy(to_float_chw(decode_rgb(img, max_pixels=10**8))) for _, img, _ in samples[:batch]
    ]
    captions = [c for _, _, c in samples[:batch]]
    return batch / median_seconds(lambda: scorer.score(images, captions), reps)


def pipeline(
    flavor: str, root: Path, batch: int, actor_cpus: float, clip: str | None, head: str | None
) -> dict:
    """The score job once; its steady images/s from the parts it wrote (start-up and pipeline fill excluded)."""
    from pipelines.core.sources import SourceConfig
    from pipelines.core.step import Resources
    from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score

    config = ScoreConfig(
        shards=SourceConfig(kind="webdataset", path=str(root / "shards" / "*.tar"), batch_rows=batch),
        output_dir=str(root / "scores"),
        scorer=ScorerConfig(flavor=flavor, clip_weights=clip, aesthetic_weights=head),
        score_resources=Resources(batch_size=batch, num_cpus=actor_cpus, concurrency=1),
        read_resources=Resources(batch_size=1, concurrency=1, num_cpus=0.5),
        write_resources=Resources(batch_size=batch, num_cpus=0.5),
    )
    with local_ray():
        start = time.perf_counter()
        run_score(config)
        wall = time.perf_counter() - start
    return steady_rate((root / "scores").glob("part-*.parquet")) | {"job_wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="clip_score/l14")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8, help="rows per model batch, and per input shard")
    parser.add_argument("--reps", type=int, default=3, help="bare forward: median of this many batches")
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/score.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = photos.samples(args.images)
        clip, head = _weights(args.flavor, root)
        with local_ray():  # one shard per batch: every batch is one written part
            photos.ingest(samples, root, per_shard=args.batch)
        threads = max(1, int(args.actor_cpus))
        bare = bare_forward(args.flavor, samples, args.batch, threads, args.reps, clip, head)
        piped = pipeline(args.flavor, root, args.batch, args.actor_cpus, clip, head)
    report = {
        "benchmark": "score",
        "flavor": args.flavor,
        "images": args.images,
        "batch": args.batch,
        "torch_threads": threads,
        "bare_forward_images_per_s": bare,
        "pipeline_images_per_s": piped["rows_per_s"],
        "ratio_pipeline_over_bare": piped["rows_per_s"] / bare,
        "goal": ">= 0.85",
        "pipeline_run": piped,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
