"""The steps of a reconstruction report: the original crop of a cached sample, then Stage B + A and metrics.

``Reconstruct`` follows the official reconstruction: Stage B samples Stage A latents at 4/3 of the encoded
pixel size from the effnet latent and the pooled CLIP-bigG caption embedding (10 steps, cfg 1.1, shift 1),
Stage A decodes them, and the decode is resized (bilinear, antialias) back to the crop effnet saw, where
PSNR, SSIM and LPIPS compare it with the original crop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np

from pipelines.core.step import Batch, Step, healthy, object_column, reject
from pipelines.encode.models import EncoderConfig
from pipelines.encode.steps import PIXELS, tensor_column
from pipelines.train_data.crops import CropSpec, training_crops
from schemas.columns import CLIP_TEXT_POOLED, EFFNET, KEY, SOURCE_SHARD
from stages.image_metrics import LpipsConfig

ORIGINAL_PNG = "original_png"
RECON_PNG = "recon_png"
DIFF_PNG = "diff_png"
METRICS = ("psnr", "ssim", "lpips")
DIFF_GAIN = 4.0  # the difference image shows |recon − original| × 4


class CacheCrops(Step):
    """The crop effnet saw for each cached sample, recomputed from its source shard (``pixels``, float [0, 1])."""

    name = "crop"
    requires = (KEY, SOURCE_SHARD, EFFNET)
    produces = (PIXELS,)

    def __call__(self, batch: Batch) -> Batch:
        spec: CropSpec = self.config
        rows = list(healthy(batch))
        samples = {int(i): self._sample(batch, int(i)) for i in rows}
        crops: dict[int, np.ndarray] = {}
        try:
            crops = dict(zip(samples, training_crops(list(samples.values()), spec), strict=True))
        except (OSError, ValueError):  # find the rows at fault one by one
            for i, sample in samples.items():
                try:
                    crops[i] = training_crops([sample], spec)[0]
                except (OSError, ValueError) as exc:
                    reject(batch, i, self.name, "source_unavailable", str(exc))
        pixels = [crops[i].astype(np.float32) / 255 if i in crops else None for i in range(len(batch[KEY]))]
        return batch | {PIXELS: tensor_column(PIXELS, pixels)}

    @staticmethod
    def _sample(batch: Batch, i: int) -> tuple[str, str, tuple[int, int]]:
        from pipelines.core.preprocess import LATENT_CELL_PX

        _, h, w = np.asarray(batch[EFFNET][i]).shape
        return str(batch[SOURCE_SHARD][i]), str(batch[KEY][i]), (h * LATENT_CELL_PX, w * LATENT_CELL_PX)


@dataclass(frozen=True, kw_only=True)
class ReconstructConfig:
    """Stage B and Stage A (flavor + weights), the Stage B sampler settings and the LPIPS backbone."""

    stage_b: EncoderConfig
    stage_a: EncoderConfig
    timesteps: int = 10
    cfg: float = 1.1
    shift: float = 1.0
    seed: int = 42
    lpips: LpipsConfig = field(default_factory=LpipsConfig)

    def __post_init__(self) -> None:
        if not self.stage_b.flavor.startswith("stage_b"):
            raise ValueError(f"stage_b.flavor={self.stage_b.flavor!r} is not a stage_b flavor")
        if not self.stage_a.flavor.startswith("stage_a"):
            raise ValueError(f"stage_a.flavor={self.stage_a.flavor!r} is not a stage_a flavor")
        if self.stage_a.device != self.stage_b.device:
            raise ValueError(f"stage_a.device={self.stage_a.device!r} differs from stage_b.device")


def png(chw_uint8: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chw_uint8.transpose(1, 2, 0))).save(buffer, format="PNG")
    return buffer.getvalue()


def _uint8(images) -> np.ndarray:
    return (images.clamp(0, 1) * 255).round().byte().cpu().numpy()


class Reconstruct(Step):
    """Stage B sampling + Stage A decode of each row's effnet latent; PNGs of original/recon/diff and metrics."""

    name = "reconstruct"
    requires = (KEY, PIXELS, EFFNET, CLIP_TEXT_POOLED)
    produces = (ORIGINAL_PNG, RECON_PNG, DIFF_PNG, *METRICS)
    stateful = True

    def __init__(self, config: ReconstructConfig) -> None:
        super().__init__(config)
        from stages.gdf import stage_gdf
        from stages.image_metrics import ImageMetrics
        from stages.sampling import SamplerSettings

        self.stage_b, _ = config.stage_b.build()
        self.stage_a, _ = config.stage_a.build()
        self.gdf = stage_gdf()
        self.settings = SamplerSettings(timesteps=config.timesteps, cfg=config.cfg, shift=config.shift)
        self.metrics = ImageMetrics(config.lpips)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch[KEY])
        pngs = {c: [b""] * n for c in (ORIGINAL_PNG, RECON_PNG, DIFF_PNG)}
        values = {m: np.full(n, np.nan, np.float32) for m in METRICS}
        groups: dict[tuple, list[int]] = {}
        for i in healthy(batch):
            groups.setdefault(np.asarray(batch[EFFNET][i]).shape, []).append(int(i))
        for rows in groups.values():
            for start in range(0, len(rows), self.config.stage_b.batch_size):
                chunk = rows[start : start + self.config.stage_b.batch_size]
                try:
                    original, recon = self._reconstruct(batch, chunk)
                except (RuntimeError, ValueError) as exc:
                    for i in chunk:
                        reject(batch, i, self.name, "reconstruct_error", f"{type(exc).__name__}: {exc}")
                    continue
                scores = self.metrics(original, recon)
                diff = ((recon - original).abs() * DIFF_GAIN).clamp(0, 1)
                for j, i in enumerate(chunk):
                    for m in METRICS:
                        values[m][i] = float(scores[m][j])
                    for column, images in ((ORIGINAL_PNG, original), (RECON_PNG, recon), (DIFF_PNG, diff)):
                        pngs[column][i] = png(_uint8(images[j]))
        return batch | {c: object_column(v) for c, v in pngs.items()} | values

    def _reconstruct(self, batch: Batch, rows: list[int]):
        import torch
        from torchvision.transforms.v2 import functional as TF

        from stages.sampling import stage_b_latents, stage_b_size

        cfg: ReconstructConfig = self.config

        def stack(column: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([np.asarray(batch[column][i], np.float32) for i in rows]))

        effnet, pooled, original = stack(EFFNET), stack(CLIP_TEXT_POOLED), stack(PIXELS)
        device = torch.device(cfg.stage_b.device)
        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=cfg.stage_b.bf16_autocast):
            latents = stage_b_latents(
                self.stage_b, effnet.to(device), pooled, stage_b_size(effnet.shape[-2:]),
                gdf=self.gdf, settings=self.settings, seed=cfg.seed,
            )  # fmt: skip
            decoded = self.stage_a.decode(latents.to(device)).float().clamp(0, 1).cpu()
        recon = TF.resize(decoded, list(original.shape[-2:]), antialias=True).clamp(0, 1)
        return original, recon
