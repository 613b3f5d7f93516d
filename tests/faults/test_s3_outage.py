"""The S3 server restarts while a job writes: requests are retried, and a partial shard is never visible."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlparse

import fsspec
import pytest

from pipelines.core.sources import SourceConfig
from pipelines.ingest.existing import IngestConfig, run_ingest
from tests.faults.flaky_proxy import FlakyProxy
from tests.pipelines.photos import PHOTOS, photo_shards
from tests.s3 import moto_endpoint

BUCKET = "outage-test-bucket"


def contents(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p.removeprefix(f"{BUCKET}/{prefix}/"): fs.cat_file(p) for p in fs.find(f"{BUCKET}/{prefix}")}


@pytest.mark.timeout(400)
def test_s3_restart_mid_write_is_retried_and_never_shows_a_partial_shard(ray_local, tmp_path) -> None:
    src = tmp_path / "src"
    photo_shards(src, 8)
    source = SourceConfig(kind="webdataset", path=str(src))
    with moto_endpoint() as direct:
        fs = fsspec.filesystem("s3", endpoint_url=direct)
        fs.mkdir(BUCKET)
        run_ingest(IngestConfig(source=source, output_dir=f"s3://{BUCKET}/ref", output_endpoint_url=direct))
        reference = contents(fs, "ref")
        proxy = FlakyProxy(urlparse(direct).port)
        seen: dict[str, dict] = {}

        def restart_when_writing_starts() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not fs.find(f"{BUCKET}/run/_staging"):  # tasks are writing
                fs.invalidate_cache()
                time.sleep(0.01)
            proxy.outage(2.0)
            seen["during"] = contents(fs, "run")  # what a reader saw right after the restart

        watcher = threading.Thread(target=restart_when_writing_starts, daemon=True)
        watcher.start()
        try:
            summary = run_ingest(IngestConfig(source=source, output_dir=f"s3://{BUCKET}/run",
                                              output_endpoint_url=proxy.endpoint))  # fmt: skip
        finally:
            watcher.join(timeout=130)
            proxy.close()
        assert summary.n_samples == 8 * len(PHOTOS) and summary.n_rejected == 0
        assert proxy.dropped >= 1, "no connection was open when the server went away"
        during = {
            k: v for k, v in seen["during"].items() if not k.startswith("_staging/")
        }  # what readers see
        assert len(during) < len(reference), "the restart came after the job had written everything"
        for name, data in during.items():  # whatever was visible was whole
            assert data == reference[name], name
        assert "manifest.json" not in during
        final = contents(fs, "run")
        assert sorted(final) == sorted(reference)
        for name, data in final.items():
            if name != "manifest.json":
                assert data == reference[name], name
