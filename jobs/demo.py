"""``cascade demo``: the whole flow on bundled photos, ingest → score → dedup → filter → encode → train-c →
export → report, on a local Ray (or ``--address``), in a few minutes on 2 CPU cores. The photos include three
planted copies (exact, resized, recompressed) that dedup finds and filter drops.

Without ``--weights`` every model is a ``*/tiny`` flavor with seeded random weights: the demo proves the
plumbing, and every output says so. ``--weights DIR`` switches each stage to the released checkpoints,
found in DIR under their official file names (``stage_c_lite_bf16.safetensors``, ``text_encoder/``, ...),
plus the two scoring files (open_clip ViT-L/14 and the LAION aesthetic head). Missing files are listed
before any work starts.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from jobs.pipeline_jobs import JOBS, IngestJobConfig, init_ray
from jobs.train_config import PreviewConfig, TrainConfig
from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.sources import SourceConfig
from pipelines.dedup.pipeline import DedupConfig, SemanticConfig
from pipelines.encode.models import EncoderConfig
from pipelines.encode.pipeline import EncodeConfig
from pipelines.export.pipeline import ExportConfig
from pipelines.filter.pipeline import FilterConfig, Rule
from pipelines.ingest.existing import IngestConfig
from pipelines.report.pipeline import ReportConfig
from pipelines.report.steps import ReconstructConfig
from pipelines.score.pipeline import ScoreConfig, ScorerConfig
from pipelines.train_data.batches import TrainDataConfig
from stages.image_metrics import LpipsConfig

PHOTOS = Path(__file__).resolve().parent / "demo_data"
# Scoring files beside the Stable Cascade ones: open_clip's OpenAI ViT-L/14 and the LAION aesthetic head.
SCORER_FILES = {
    "clip_weights": ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "aesthetic_weights": ("sac+logos+ava1-l14-linearMSE.safetensors", "sac+logos+ava1-l14-linearMSE.pth"),
}
LPIPS_BACKBONE_FILE = "alexnet.safetensors"  # optional: torchvision AlexNet, for LPIPS in the report
RELEASED = {"stage_c": "stage_c/1b", "stage_b": "stage_b/700m", "stage_a": "stage_a", "effnet": "effnet",
            "clip_text": "clip_text/bigg", "clip_image": "clip_vision/l14", "previewer": "previewer"}  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Where the demo writes, which weights it uses, and how long it trains."""

    output_dir: str = "cascade-demo"
    weights: str | None = None
    train_steps: int = 30
    photos: str = str(PHOTOS)

    def __post_init__(self) -> None:
        if self.train_steps < 1:
            raise ValueError(f"train_steps={self.train_steps} must be >= 1")


def _released(weights_dir: str) -> dict[str, str]:
    """Role → path of each released file in ``weights_dir``; raises listing every missing file."""
    from stages.flavors import find_weights, get_flavor

    found, missing = {}, []
    for role, flavor in RELEASED.items():
        try:
            found[role] = find_weights(get_flavor(flavor), weights_dir)
        except FileNotFoundError:
            missing.append(f"{role}: {' or '.join(get_flavor(flavor).files)}")
    for role, names in SCORER_FILES.items():
        hit = next((Path(weights_dir) / n for n in names if (Path(weights_dir) / n).exists()), None)
        if hit is None:
            missing.append(f"{role}: {' or '.join(names)}")
        else:
            found[role] = str(hit)
    if missing:
        raise FileNotFoundError(f"--weights {weights_dir}: missing " + "; ".join(missing))
    lpips = Path(weights_dir) / LPIPS_BACKBONE_FILE
    if lpips.exists():
        found["lpips"] = str(lpips)
    return found


def demo_jobs(config: DemoConfig) -> list[tuple[str, Any]]:
    """The eight job configs, in order, as ``(job name, config)``; built (and so checked) before any work."""
    out = Path(config.output_dir).resolve()
    files = _released(config.weights) if config.weights else {}

    def encoder(role: str, tiny: str) -> EncoderConfig:
        return (
            EncoderConfig(flavor=RELEASED[role], weights=files[role]) if files else EncoderConfig(flavor=tiny)
        )

    shards = SourceConfig(kind="webdataset", path=str(out / "shards"))
    scorer = (ScorerConfig(flavor="clip_score/l14", clip_weights=files["clip_weights"],
                           aesthetic_weights=files["aesthetic_weights"])
              if files else ScorerConfig(flavor="clip_score/tiny"))  # fmt: skip
    rules = (Rule(field="aspect_ratio", op=">=", value=0.5), Rule(field="aspect_ratio", op="<=", value=2.0),
             Rule(field="caption_length", op=">=", value=10), Rule(field="duplicate_of", op="is null"))  # fmt: skip
    # semantic dedup compares CLIP-L embeddings: under random weights every photo looks alike, so it runs
    # only with the released scorer
    dedup = DedupConfig(scores_dir=str(out / "scores"), output_dir=str(out / "dedup"),
                        semantic=SemanticConfig(enabled=bool(files)))  # fmt: skip
    if files:
        rules += (Rule(field="aesthetic_score", op=">=", value=4.0),)
    preprocess = PreprocessConfig(mode="buckets", image_size_px=768 if files else 256)
    effnet, clip_text = encoder("effnet", "effnet/tiny"), encoder("clip_text", "clip_text/tiny")
    train = TrainConfig(
        data=TrainDataConfig(path=str(out / "latents")), output_dir=str(out / "train"),
        flavor=RELEASED["stage_c"] if files else "stage_c/tiny", weights=files.get("stage_c"),
        allow_random_weights=not files, batch_size=2, max_steps=config.train_steps, lr=1e-4 if files else 1e-3,
        save_every=config.train_steps, log_every=max(1, config.train_steps // 6),
        preview=PreviewConfig(every=config.train_steps, samples=2, timesteps=4 if not files else 20,
                              previewer=RELEASED["previewer"] if files else "previewer/tiny",
                              previewer_weights=files.get("previewer")),
    )  # fmt: skip
    reconstruct = ReconstructConfig(
        stage_b=encoder("stage_b", "stage_b/tiny"), stage_a=encoder("stage_a", "stage_a/tiny"),
        timesteps=10 if files else 4, lpips=LpipsConfig(backbone_weights=files.get("lpips")),
    )  # fmt: skip
    return [
        ("ingest", IngestJobConfig(existing=IngestConfig(source=SourceConfig(kind="folder", path=f"{config.photos}/*.jpg"),
                                                         output_dir=str(out / "shards")))),
        ("score", ScoreConfig(shards=shards, output_dir=str(out / "scores"), scorer=scorer)),
        ("dedup", dedup),
        ("filter", FilterConfig(scores_dir=str(out / "scores"), output_dir=str(out / "filtered"), rules=rules,
                                dedup_dir=str(out / "dedup"))),
        ("encode", EncodeConfig(shards=shards, output_dir=str(out / "latents"), preprocess=preprocess,
                                kept_keys=str(out / "filtered"), scores_dir=str(out / "scores"),
                                effnet=effnet,
                                clip_text=clip_text, clip_image=encoder("clip_image", "clip_vision/tiny"))),
        ("train-c", train),
        ("export", ExportConfig(latents=str(out / "latents"), output_dir=str(out / "export"))),
        ("report", ReportConfig(output_dir=str(out / "report"), latents=str(out / "latents"), num_samples=9,
                                worst_k=3, reconstruct=reconstruct)),
    ]  # fmt: skip


def _headline(name: str, summary: Any) -> str:
    s = dataclasses.asdict(summary) if dataclasses.is_dataclass(summary) else dict(summary)
    lines = {
        "ingest": lambda: f"{s['n_samples']} samples in {s['n_shards']} shard(s), {s['n_rejected']} rejected",
        "score": lambda: f"{s['n_scored']} scored, {s['n_rejected']} rejected",
        "dedup": lambda: f"{s['n_input'] - s['n_kept']} duplicate(s): "
        + ", ".join(f"{v} {k}" for k, v in s["removed"].items() if v),
        "filter": lambda: f"{s['n_kept']} of {s['n_input']} kept",
        "encode": lambda: f"{s['n_encoded']} encoded into buckets {s['buckets']}",
        "train-c": lambda: f"steps {s['start_step']}→{s['final_step']}, loss {s['last_metrics'].get('loss', float('nan')):.4f}",
        "export": lambda: f"{s['n_rows']} rows in {len(s['files'])} Parquet file(s)",
        "report": lambda: f"PSNR {s['psnr_mean']:.2f} dB, SSIM {s['ssim_mean']:.3f}, "
        + (f"LPIPS {s['lpips_mean']:.3f}" if s["lpips_mean"] is not None else "LPIPS skipped (no backbone weights)"),
    }  # fmt: skip
    return lines[name]()


def _where(name: str, summary: Any, config: Any) -> str:
    if name == "train-c":
        return summary.checkpoint or summary.run_dir
    if name == "ingest":
        return config.existing.output_dir
    if name == "report":
        return summary.html
    return config.output_dir


def run_demo(config: DemoConfig, address: str | None = None) -> dict[str, str]:
    """Run the eight jobs in order and print where each output lives; returns job → output location."""
    jobs = demo_jobs(config)  # every config is checked here, before Ray starts
    label = (
        "released weights from " + config.weights if config.weights else "tiny flavors, SEEDED RANDOM WEIGHTS"
    )
    print(f"cascade demo: {len(jobs)} jobs on {label}; outputs under {Path(config.output_dir).resolve()}")
    init_ray(address)
    import ray

    # One headline per job instead of Ray Data's live bars and the jobs' progress lines.
    ray.data.DataContext.get_current().enable_progress_bars = False
    where: dict[str, str] = {}
    with mock.patch.dict(os.environ, {"CASCADE_PROGRESS": "off"}):
        for i, (name, job_config) in enumerate(jobs, 1):
            start = time.monotonic()
            if JOBS[name].check is not None:
                JOBS[name].check(job_config)
            summary = JOBS[name].run(job_config)
            where[name] = _where(name, summary, job_config)
            print(
                f"[{i}/{len(jobs)}] {name:8s} {time.monotonic() - start:6.1f} s  {_headline(name, summary)}"
            )
    print("\noutputs:")
    for name, path in where.items():
        print(f"  {name:8s} {path}")
    if not config.weights:
        print(
            "\nThese models have random weights: the images and numbers test the pipeline, not Stable Cascade."
        )
    models = f"--weights {shlex.quote(config.weights)}" if config.weights else "--tiny"
    print(
        f"\nlook at them in the web app: cascade app {shlex.quote(str(Path(config.output_dir).resolve()))} {models}"
    )
    return where
