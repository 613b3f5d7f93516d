"""Kill a worker node of a 3-node ``ray.cluster_utils.Cluster`` while a job runs (used by a test, in a subprocess).

python -m tests.faults.node_kill {encode|score} SHARDS_DIR OUT_DIR

The head has 1 CPU, the two workers 2 each. A watcher removes the first worker once the job is under way
(its first part staged, or 60 s for encode and 4 s for score), and prints a JSON line
with the kill time, the job's end time and the nodes alive afterwards.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path


def _started(out: Path) -> bool:
    """The first parts are staged: the models are running (both jobs stage, then commit per shard)."""
    return any(p.is_file() for p in (out / "_staging").rglob("*"))


def main(job: str, shards: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    from pipelines.core.preprocess import PreprocessConfig
    from pipelines.core.sources import SourceConfig
    from pipelines.encode.pipeline import EncodeConfig, run_encode
    from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score
    from tests.tiny import encoders

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    victim = cluster.add_node(num_cpus=2)
    cluster.add_node(num_cpus=2)
    killed: dict[str, float] = {}
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        DataContext.get_current().enable_progress_bars = False
        cluster.wait_for_nodes()
        source = SourceConfig(kind="webdataset", path=shards)

        def watch() -> None:
            start = time.monotonic()
            while not _started(Path(out)) and time.monotonic() - start < (60 if job == "encode" else 4):
                time.sleep(0.05)
            killed["done_before"] = len(list(Path(out).glob("_commits/0*.json")))  # shard records
            cluster.remove_node(victim, allow_graceful=False)
            killed["at"] = time.time()

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        if job == "encode":
            summary = run_encode(EncodeConfig(shards=source, output_dir=out, formats=("parquet",),
                                              preprocess=PreprocessConfig(image_size_px=128), **encoders()))  # fmt: skip
        else:
            summary = run_score(
                ScoreConfig(shards=source, output_dir=out, scorer=ScorerConfig(flavor="clip_score/tiny"))
            )
        finished = time.time()
        watcher.join(timeout=60)
        deadline = time.monotonic() + 60  # the GCS marks the killed node dead after its health checks fail
        while (alive := len([n for n in ray.nodes() if n["Alive"]])) > 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        print("NODE_KILL_RESULT", json.dumps({"killed_at": killed.get("at"), "finished_at": finished, "alive": alive, "done_before": killed.get("done_before"),
                          "summary": str(summary)}))  # fmt: skip
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
