"""Real photos for the benchmarks: scikit-image's sample images as JPEG samples, in WebDataset tars, ingested."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("chelsea", "astronaut", "rocket", "coffee", "camera", "hubble_deep_field")


def samples(n: int) -> list[tuple[str, bytes, str]]:
    """``n`` (key, JPEG bytes, caption) samples cycling through the photos."""
    from skimage import data as skdata

    out = []
    for i in range(n):
        name = PHOTOS[i % len(PHOTOS)]
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(getattr(skdata, name)())).convert("RGB").save(buffer, "JPEG", quality=90)
        out.append((f"{name}{i:05d}", buffer.getvalue(), f"a photo of {name.replace('_', ' ')}"))
    return out


def write_tar(path: Path, rows: list[tuple[str, bytes, str]]) -> None:
    from pipelines.core.shards import members_tar_bytes

    path.write_bytes(
        members_tar_bytes((key, {"jpg": image, "txt": caption.encode()}) for key, image, caption in rows)
    )


def ingest(samples: list[tuple[str, bytes, str]], root: Path, per_shard: int) -> Path:
    """Write ``samples`` as tars of ``per_shard`` under ``root/src`` and ingest them (Ray must be up).

    Returns the folder of the ingested shards, ``root/shards``.
    """
    from pipelines.core.sources import SourceConfig
    from pipelines.ingest.existing import IngestConfig, run_ingest

    (root / "src").mkdir(parents=True)
    for i in range(0, len(samples), per_shard):
        write_tar(root / "src" / f"{i // per_shard:05d}.tar", samples[i : i + per_shard])
    run_ingest(IngestConfig(source=SourceConfig(kind="webdataset", path=str(root / "src")),
                            output_dir=str(root / "shards")))  # fmt: skip
    return root / "shards"
