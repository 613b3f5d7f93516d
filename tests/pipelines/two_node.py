"""Run ingest + score on a 2-node ``ray.cluster_utils.Cluster`` (one process; used by a test in a subprocess).

python -m tests.pipelines.two_node SRC_DIR OUT_DIR
"""

from __future__ import annotations

import sys


def main(src: str, out: str) -> None:
    import ray
    from ray.cluster_utils import Cluster
    from ray.data import DataContext

    from pipelines.core.sources import SourceConfig
    from pipelines.ingest.existing import IngestConfig, run_ingest
    from pipelines.score.pipeline import ScoreConfig, ScorerConfig, run_score

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        DataContext.get_current().enable_progress_bars = False
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        run_ingest(IngestConfig(source=SourceConfig(kind="webdataset", path=src), output_dir=f"{out}/shards"))
        run_score(
            ScoreConfig(
                shards=SourceConfig(kind="webdataset", path=f"{out}/shards"),
                output_dir=f"{out}/scores",
                scorer=ScorerConfig(flavor="clip_score/tiny"),
            )
        )
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
