"""Run one encode job in its own driver process (for the kill-and-resubmit test).

python -m tests.pipelines.encode_job SHARDS_DIR OUTPUT_DIR [BATCH_SIZE]
"""

from __future__ import annotations

import sys


def main(shards: str, output: str, batch: int = 3) -> None:
    import ray

    from pipelines.core.preprocess import PreprocessConfig
    from pipelines.core.sources import SourceConfig
    from pipelines.core.step import Resources
    from pipelines.encode.models import EncoderConfig
    from pipelines.encode.pipeline import EncodeConfig, run_encode

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    config = EncodeConfig(
        shards=SourceConfig(kind="webdataset", path=shards),
        output_dir=output,
        effnet=EncoderConfig(flavor="effnet/tiny"),
        clip_text=EncoderConfig(flavor="clip_text/tiny"),
        clip_image=EncoderConfig(flavor="clip_vision/tiny"),
        preprocess=PreprocessConfig(image_size_px=256),
        # 3: one shard (3 samples) per batch all the way down, so shards commit one after the other
        preprocess_resources=Resources(num_cpus=0.5, batch_size=batch),
        effnet_resources=Resources(num_cpus=0.25, batch_size=batch),
        clip_text_resources=Resources(num_cpus=0.25, batch_size=batch),
        clip_image_resources=Resources(num_cpus=0.25, batch_size=batch),
        write_resources=Resources(num_cpus=0.25, batch_size=batch),
    )
    print(run_encode(config), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:4]))
