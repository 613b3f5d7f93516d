"""Score-pipeline throughput against the bare scorer forward at the same batch size.

    python benchmarks/score.py --flavor clip_score/l14 --images 48 --out benchmarks/results/score.json

The pipeline (read shard → decode → CLIP pass → write Parquet) runs on a local Ray with one scoring actor of
``--actor-cpus`` CPUs (Ray pins its torch threads to that); the bare forward runs ``ClipScorer.score`` on
already-decoded images with the same thread count and batch. Released-size weights are random (throughput
does not depend on their values); they are written to a temporary folder so the job config is the real one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import photos  # benchmarks/photos.py (scripts run from this folder)
import torch


def _weights(flavor: str, root: Path) -> tuple[str | None, str | None]:
    if flavor.endswith("/tiny"):
        return None, None
    from stages.scorers import FLAVORS, ClipScorer
    from stages.weights import save_weights

    scorer = ClipScorer(FLAVORS[flavor])
    save_weights(scorer.clip.state_dict(), root / "clip.safetensors")
    save_weights(scorer.aesthetic.state_dict(), root / "aesthetic.safetensors")
    return str(root / "clip.safetensors"), str(root / "aesthetic.safetensors")


def bare_forward(flavor: str, samples, batch: int, threads: int, clip: str | None, head: str | None) -> float:
    """Images/s of ClipScorer.score on decoded images (the physical limit of the pipeline)."""
    from pipelines.images import decode_rgb, to_float_chw
    from stages.scorers import FLAVORS, ClipScorer

    torch.set_num_threads(threads)
    config = FLAVORS[flavor]
    scorer = (
        ClipScorer(config)
        if clip is None
        else ClipScorer.load(config, clip_weights=clip, aesthetic_weights=head)
    )
    images = [torch.from_numpy(to_float_chw(decode_rgb(img, max_pixels=10**8))) for _, img, _ in samples]
    captions = [c for _, _, c in samples]
    scorer.score(images[:batch], captions[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        scorer.score(images[i : i + batch], captions[i : i + batch])
    return len(images) / (time.perf_counter() - start)


def pipeline(
    flavor: str, root: Path, batch: int, actor_cpus: float, clip: str | None, head: str | None
) -> float:
    """Images/s of the whole score job on the ingested shards (after the actor is up)."""
    import ray

    from pipelines.score import ScoreConfig, ScorerConfig, run_score
    from pipelines.sources import SourceConfig
    from pipelines.step import Resources

    config = ScoreConfig(
        shards=SourceConfig(kind="webdataset", path=str(root / "shards" / "*.tar"), batch_rows=batch),
        output_dir=str(root / "scores"),
        scorer=ScorerConfig(flavor=flavor, clip_weights=clip, aesthetic_weights=head),
        score_resources=Resources(batch_size=batch, num_cpus=actor_cpus, concurrency=1),
        read_resources=Resources(batch_size=1, concurrency=1, num_cpus=0.5),
        write_resources=Resources(batch_size=4096, num_cpus=0.5),
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    times, counts = [], []
    try:
        for copies in (1, 2):
            path = str(root / "shards" / "*.tar") if copies == 1 else str(root / "shards*" / "*.tar")
            shards = SourceConfig(kind="webdataset", path=path, batch_rows=batch)
            run = ScoreConfig(
                **{**config.__dict__, "shards": shards, "output_dir": str(root / f"scores{copies}")}
            )
            start = time.perf_counter()
            counts.append(run_score(run).n_scored)
            times.append(time.perf_counter() - start)
    finally:
        ray.shutdown()
    return (counts[1] - counts[0]) / (times[1] - times[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="clip_score/l14")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--actor-cpus", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/score.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        samples = photos.samples(args.images)
        (root / "src").mkdir()
        photos.write_tar(root / "src" / "photos.tar", samples)
        clip, head = _weights(args.flavor, root)
        import ray

        from pipelines.ingest import IngestConfig, run_ingest
        from pipelines.sources import SourceConfig

        ray.init(
            address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False
        )
        run_ingest(
            IngestConfig(
                source=SourceConfig(kind="webdataset", path=str(root / "src")),
                output_dir=str(root / "shards"),
            )
        )
        ray.shutdown()
        shutil.copytree(root / "shards", root / "shards_copy")  # the second run scores both copies
        threads = max(1, int(args.actor_cpus))
        bare = bare_forward(args.flavor, samples, args.batch, threads, clip, head)
        piped = pipeline(args.flavor, root, args.batch, args.actor_cpus, clip, head)
    report = {
        "benchmark": "score",
        "flavor": args.flavor,
        "images": args.images,
        "batch": args.batch,
        "torch_threads": threads,
        "bare_forward_images_per_s": bare,
        "pipeline_images_per_s": piped,
        "ratio_pipeline_over_bare": piped / bare,
        "goal": ">= 0.85",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
