"""A real latent cache for the training tests: 8 captioned scikit-image photos, encoded with tiny flavors.

``buckets`` mode puts the landscape photos (3:2) and the square ones in different buckets; the photos are
real (CC0, shipped by scikit-image), the tiny encoders are seeded random weights.
"""

from __future__ import annotations

from pathlib import Path

from pipelines.core.preprocess import PreprocessConfig
from pipelines.core.sources import SourceConfig
from pipelines.encode.models import EncoderConfig
from pipelines.encode.pipeline import EncodeConfig, run_encode
from pipelines.ingest.existing import IngestConfig, run_ingest
from tests.pipelines.photos import captions, photo_tar
from tests.tiny import encoders

CAPTIONED = ("chelsea", "astronaut", "rocket", "coffee", "camera", "page", "horse")


def build_cache(
    root: Path, *, mode: str = "buckets", image_size_px: int = 256, stage_a_size_px: int | None = None
) -> tuple[Path, Path]:
    """Ingest the photos into one shard and encode them; returns (image shards, latent cache).

    With ``stage_a_size_px`` the cache also holds Stage A latents of that crop and Stage B's effnet
    conditioning at every training size (``stage_b_conditioning: exact``, the default with Stage A).
    """
    names = tuple(n for n in CAPTIONED if n in captions())
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "photos.tar").write_bytes(photo_tar(names))
    shards = root / "shards"
    run_ingest(
        IngestConfig(source=SourceConfig(kind="webdataset", path=str(root / "src")), output_dir=str(shards))
    )
    cache = root / "latents"
    run_encode(
        EncodeConfig(
            shards=SourceConfig(kind="webdataset", path=str(shards)),
            output_dir=str(cache),
            preprocess=PreprocessConfig(
                mode=mode, image_size_px=image_size_px, stage_a_size_px=stage_a_size_px or 1024
            ),
            stage_a=EncoderConfig(flavor="stage_a/tiny") if stage_a_size_px else None,
            formats=("parquet", "webdataset"),
            **encoders(),
        )
    )
    return shards, cache
